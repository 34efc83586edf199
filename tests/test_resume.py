"""Checkpoint and resume: a run interrupted after a checkpoint continues exactly as if never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from flexlora.train import build
from tests.helpers import tiny_run_config

pytestmark = pytest.mark.slow  # end-to-end tier: python -m pytest (README)

REPO = Path(__file__).resolve().parents[1]


class Interrupt(RuntimeError):
    pass


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Interrupt(f"simulated crash before step {self.step + 1}")


class EventMasks(L.Callback):
    """The masks right after every optimizer step (so after every event)."""

    def __init__(self) -> None:
        self.masks: dict[int, dict[str, list[bool]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.masks[trainer.global_step] = {k: v.mask.tolist() for k, v in pl_module.adapters.items()}


def run(cfg, *extra: L.Callback, ckpt_path: str | None = None):
    datamodule, module, trainer, allocation = build(cfg)
    masks = EventMasks()
    trainer.callbacks[:0] = [*extra, masks]
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, trainer, allocation, masks


@pytest.mark.parametrize("allocator", ["flexlora", "adalora"])
def test_resume_in_process_matches_uninterrupted(tmp_path, glue_dir, allocator):
    overrides = [f"allocator={allocator}", "allocator.t_init=2", "allocator.t_final=4", "allocator.delta_t=2",
                 "trainer.max_steps=24", "callbacks=default", "trainer.enable_progress_bar=false",
                 "callbacks.model_checkpoint.every_n_train_steps=5", "trainer.deterministic=true"]
    if allocator == "flexlora":
        overrides.append("allocator.budget_per_event=2")
    ref_module, _, ref_alloc, ref_masks = run(tiny_run_config(tmp_path / "ref", glue_dir, *overrides))

    interrupted = tiny_run_config(tmp_path / "cut", glue_dir, *overrides)
    with pytest.raises(Interrupt):
        run(interrupted, StopAt(13))
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 10
    resumed = tiny_run_config(tmp_path / "cut", glue_dir, *overrides)
    module, trainer, allocation, masks = run(resumed, ckpt_path=str(last))

    assert trainer.global_step == 24
    assert allocation.events == ref_alloc.events > 0
    for step in range(11, 25):
        assert masks.masks[step] == ref_masks.masks[step], f"rank pattern differs after step {step}"
    ref_state, state = ref_module.trained_state_dict(), module.trained_state_dict()
    assert ref_state.keys() == state.keys()
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=0, atol=1e-6, msg=key)
    assert [r["step"] for r in allocation.event_log.events()] == [r["step"] for r in ref_alloc.event_log.events()]


def test_checkpoint_holds_only_trained_tensors_for_pretrained_backbones(tmp_path, glue_dir):
    _, module, _, _ = build(tiny_run_config(tmp_path / "r", glue_dir, "backbone=minilm", "allocator=lora"))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    saved = checkpoint["state_dict"]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable <= set(saved)
    assert {f"model.{n}.mask" for n in module.adapters} <= set(saved)
    assert not any(n in saved for n, p in module.named_parameters() if not p.requires_grad)
    assert sum(v.numel() for v in saved.values()) < 0.1 * sum(v.numel() for v in module.state_dict().values())
    with pytest.raises(Exception, match="lacks"):
        module.on_load_checkpoint({"state_dict": {}})


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before writing {path}")
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear in {timeout}s")


def test_kill_9_and_resume_from_last(tmp_path, glue_dir):
    args = [sys.executable, "run.py", "backbone=tiny_deberta", "task=rte", f"task.data_dir={glue_dir / 'RTE'}",
            "task.max_train_samples=512", "task.max_eval_samples=32", "task.batch_size=4", "allocator=flexlora",
            "allocator.t_init=5", "allocator.t_final=5", "allocator.delta_t=3", "logger=none",
            "trainer.max_steps=120", "trainer.enable_progress_bar=false",
            "callbacks.model_checkpoint.every_n_train_steps=10", "trainer.deterministic=true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    ref = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'ref'}"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([*args, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for(run_dir / "checkpoints" / "last.ckpt", proc, timeout=300)
        time.sleep(0.1)  # let the first write finish; the next checkpoint is 10 steps away
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()
    resumed = subprocess.run([*args, f"hydra.run.dir={run_dir}", "ckpt_path=last"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    got = json.loads((run_dir / "metrics.json").read_text())
    assert got["rank_pattern"] == want["rank_pattern"]
    assert got["events"] == want["events"] and got["steps"] == 120
    assert got["final"] == pytest.approx(want["final"], abs=1e-6)
    events = [json.loads(x)["step"] for x in (run_dir / "ranks.jsonl").read_text().splitlines()]
    ref_events = [json.loads(x)["step"] for x in (tmp_path / "ref" / "ranks.jsonl").read_text().splitlines()]
    assert events == ref_events
