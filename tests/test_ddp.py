"""DDP on CPU (gloo, 2 processes): one plan, computed on rank 0 and broadcast; identical masks everywhere."""

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


def test_plan_is_broadcast_and_masks_identical_despite_skewed_gradients(tmp_path, glue_dir):
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, "tests/ddp_probe.py", str(out), str(tmp_path / "run"), str(glue_dir)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads(Path(f"{out}.rank0").read_text())
    rank1 = json.loads(Path(f"{out}.rank1").read_text())
    assert rank0["events"] == rank1["events"] > 0
    assert rank0["applied"] == rank1["applied"], "both ranks must apply the same plans"
    assert all(row["masks_equal"] for row in rank0["rows"]), "masks differ between ranks after an event"
    assert any(row["lambda_differs"] for row in rank0["rows"]), "the skew did not make the ranks differ"
    applied = {str(r["step"]): {"prune": {k: [v] if isinstance(v, int) else v for k, v in r["pruned"].items()}}
               for r in rank0["applied"]}
    own = rank1["own_plans"]
    differs = [s for s in own if set(own[s]["prune"]) != set(applied.get(s, {}).get("prune", {}))]
    assert differs, "rank 1 would have planned the same anyway: the test would not catch a missing broadcast"


def test_run_py_with_trainer_ddp(tmp_path, glue_dir):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "run.py", "backbone=tiny_deberta", "task=rte", f"task.data_dir={glue_dir / 'RTE'}",
         "task.max_train_samples=128", "task.max_eval_samples=32", "task.batch_size=8", "allocator=flexlora",
         "allocator.t_init=2", "allocator.t_final=2", "allocator.delta_t=1", "allocator.budget_per_event=2",
         "logger=none", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=8",
         "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["events"] == 3 and metrics["steps"] == 8
    assert metrics["total_rank"] == 12 * 8
