"""End to end through the real entry point, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end tier: python -m pytest (README)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def run_py(run_dir: Path, *overrides: str) -> dict:
    proc = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={run_dir}", "logger=none",
                           "trainer.enable_progress_bar=false", *overrides],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def test_run_py_tiny_deberta_on_real_rte(tmp_path, glue_dir):
    """One multirun process, three jobs (lora, flexlora, adalora), each checked as a user would read it."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", f"hydra.sweep.dir={sweep}", "logger=none", "trainer.enable_progress_bar=false",
         "backbone=tiny_deberta", "task=rte", f"task.data_dir={glue_dir / 'RTE'}", "allocator=lora,flexlora,adalora",
         "allocator.t_init=2", "allocator.t_final=2", "allocator.delta_t=1", "trainer.max_steps=24"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {json.loads(p.read_text())["config"]["allocator"]["name"]: (p.parent, json.loads(p.read_text()))
            for p in sweep.glob("*/metrics.json")}
    assert set(runs) == {"lora", "flexlora", "adalora"}
    for allocator, (run_dir, metrics) in runs.items():
        ranks = metrics["rank_pattern"]
        assert len(ranks) == 12 and metrics["steps"] == 24
        assert 0.0 <= metrics["final"]["val/accuracy"] <= 1.0 and "val/loss" in metrics["final"]
        assert metrics["trainable_params"] > 0
        assert sum(ranks.values()) == metrics["total_rank"]
        r0 = metrics["config"]["allocator"]["rank"]
        if allocator == "lora":
            assert metrics["events"] == 0 and set(ranks.values()) == {r0}
        elif allocator == "flexlora":
            assert metrics["events"] == 19 and metrics["total_rank"] == 12 * r0 and len(set(ranks.values())) > 1
        else:
            assert metrics["events"] > 0
            assert metrics["total_rank"] == 12 * metrics["config"]["allocator"]["target_rank"]
        lines = (run_dir / "ranks.jsonl").read_text().splitlines()
        assert sum(json.loads(x)["kind"] == "event" for x in lines) == metrics["events"]
    assert "allocation event 19" in proc.stdout + proc.stderr  # events are visible in the console log


def test_run_py_tweets_task_offline(tmp_path):
    metrics = run_py(tmp_path / "run", "backbone=tiny_deberta", "task=tweets", "trainer.max_steps=3",
                     "task.max_eval_samples=64", "allocator=lora")
    assert set(metrics["final"]) == {"val/loss", "val/accuracy", "val/f1"}
