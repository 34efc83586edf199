"""Bad input: one clear error each, no traceback, no run folder that looks finished."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from flexlora.errors import FlexLoRAError
from flexlora.train import build, train
from flexlora.training import RankAllocationCallback
from tests.helpers import tiny_run_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def cli(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", *overrides],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def assert_clean_failure(proc: subprocess.CompletedProcess, tmp_path: Path, *needles: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in output, output[-2000:]
    for needle in needles:
        assert needle in output, output[-2000:]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_cli_target_modules_matching_nothing(tmp_path, glue_dir):
    proc = cli(tmp_path, "backbone=tiny_deberta", "task=rte", f"task.data_dir={glue_dir / 'RTE'}",
               "backbone.target_modules=[qury_proj]")
    assert_clean_failure(proc, tmp_path, "match no linear layer", "query_proj", "backbone.target_modules")
    assert (tmp_path / "run" / "error.txt").is_file()


def test_cli_unknown_option(tmp_path):
    proc = cli(tmp_path, "task=glue_rte")
    assert_clean_failure(proc, tmp_path, "Could not find 'task/glue_rte'", "rte")
    proc = cli(tmp_path, "allocator=sora")
    assert_clean_failure(proc, tmp_path, "Could not find 'allocator/sora'", "flexlora")


def test_cli_schedule_without_event_window(tmp_path, glue_dir):
    proc = cli(tmp_path, "backbone=tiny_deberta", "task=rte", f"task.data_dir={glue_dir / 'RTE'}",
               "task.max_train_samples=64", "trainer.max_steps=10", "allocator.t_init=6", "allocator.t_final=4",
               "allocator.delta_t=1", "trainer.enable_progress_bar=false")
    assert_clean_failure(proc, tmp_path, "no allocation event fits", "T=10 optimizer steps", "allocator.t_init")


@pytest.fixture
def cfg(tmp_path, glue_dir):
    return lambda *o: tiny_run_config(tmp_path / "run", glue_dir, *o)


def test_max_rank_below_rank(cfg):
    with pytest.raises(FlexLoRAError, match=r"max_rank \(4\) < allocator.rank \(8\)"):
        build(cfg("allocator.max_rank=4"))


def test_budget_per_event_too_large(cfg):
    with pytest.raises(FlexLoRAError, match="budget_per_event=7 is too large for 12 adapted matrices"):
        train(cfg("allocator.budget_per_event=7"))


def test_adalora_schedule_too_long(cfg):
    with pytest.raises(FlexLoRAError, match="t_init must be < T - t_final"):
        train(cfg("allocator=adalora", "allocator.t_init=15", "allocator.t_final=10"))


def test_hub_unreachable_without_data_dir(cfg):
    with pytest.raises(FlexLoRAError, match=r"Pass task.data_dir="):
        train(cfg("task.data_dir=null"))


def test_hub_backbone_unreachable(cfg):
    with pytest.raises(FlexLoRAError, match="not in the local Hugging Face cache and the Hub is unreachable"):
        build(cfg("backbone=deberta_v3_base"))


def test_malformed_tsv_through_a_run(cfg, tmp_path, glue_dir):
    bad = tmp_path / "RTE"
    bad.mkdir()
    lines = (glue_dir / "RTE" / "train.tsv").read_text().splitlines(keepends=True)
    lines[5] = "5\tbroken row\n"
    (bad / "train.tsv").write_text("".join(lines))
    (bad / "dev.tsv").write_text((glue_dir / "RTE" / "dev.tsv").read_text())
    with pytest.raises(FlexLoRAError, match=r"RTE/train.tsv:6: expected 4 tab-separated fields"):
        train(cfg(f"task.data_dir={bad}"))


class PoisonAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.classifier.weight.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cfg, tmp_path):
    datamodule, module, trainer, _ = build(cfg("callbacks=default", "trainer.enable_progress_bar=false",
                                               "callbacks.model_checkpoint.every_n_train_steps=2"))
    trainer.callbacks.append(PoisonAt(5))
    with pytest.raises(FlexLoRAError, match="training loss is nan at optimizer step 6"):
        trainer.fit(module, datamodule=datamodule)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_sharded_strategies_are_refused():
    from lightning.pytorch.strategies import FSDPStrategy

    class FakeTrainer:
        strategy = FSDPStrategy()

    with pytest.raises(FlexLoRAError, match="shards parameters"):
        RankAllocationCallback().setup(FakeTrainer(), object(), "fit")
