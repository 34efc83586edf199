"""The Hugging Face Trainer path makes run.py's decisions: same model, batches, seed and schedule give the same
rank pattern after every event and the same losses (issue 20). Dropout is off on both sides: the two loops
draw their dropout masks from different RNG streams, which is a difference of the loops, not of allocation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import TrainingArguments

from flexlora.engine import RankAllocationEngine
from flexlora.integrations.transformers import FlexLoRATrainer
from flexlora.train import build
from tests.helpers import tiny_run_config

pytestmark = pytest.mark.slow  # end-to-end tier: python -m pytest (README)

REPO = Path(__file__).resolve().parents[1]
NO_DROPOUT = ("++backbone.config.hidden_dropout_prob=0.0", "++backbone.config.attention_probs_dropout_prob=0.0")


class Recorder(L.Callback):
    """Keeps every training batch (in order) and the training loss of each step."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items() if k != "idx"})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class Replay(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i]


class InOrderTrainer(FlexLoRATrainer):
    """Replays pre-collated batches in their recorded order (one dataset item = one batch)."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(self.train_dataset)


@pytest.mark.parametrize("allocator, clip, accumulate", [("flexlora", None, 1), ("adalora", 1.0, 1),
                                                         ("flexlora", 1.0, 2)])
def test_hf_trainer_and_run_py_give_the_same_rank_pattern_after_every_event(tmp_path, glue_dir, allocator, clip,
                                                                             accumulate):
    overrides = [f"allocator={allocator}", *NO_DROPOUT, "trainer.max_steps=16",
                 f"trainer.accumulate_grad_batches={accumulate}"]
    if clip is not None:
        overrides.append(f"trainer.gradient_clip_val={clip}")
    if allocator == "adalora":
        overrides += ["allocator.t_init=2", "allocator.t_final=4"]
    cfg = tiny_run_config(tmp_path / "lightning", glue_dir, *overrides)
    datamodule, module, trainer, allocation = build(cfg)
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    trainer.fit(module, datamodule=datamodule)
    reference = allocation.event_log.events()
    assert len(reference) >= 5, "the comparison needs events"

    _, twin, _, _ = build(tiny_run_config(tmp_path / "hf", glue_dir, *overrides))
    engine = RankAllocationEngine(twin.adapters, twin.allocator_config, seed=int(cfg.seed))
    total = len(recorder.batches) // accumulate
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=total, per_device_train_batch_size=1,
        gradient_accumulation_steps=accumulate,
        learning_rate=1e-3, warmup_steps=round(0.06 * total), lr_scheduler_type="linear", weight_decay=0.01,
        adam_epsilon=1e-6, max_grad_norm=clip or 0.0, seed=int(cfg.seed), save_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, logging_strategy="no",
    )
    hf = InOrderTrainer(engine=engine, model=twin.model, args=args, train_dataset=Replay(recorder.batches),
                        data_collator=lambda items: items[0])
    losses: list[float] = []
    original = hf.compute_loss

    def recording(*a, **k):
        loss = original(*a, **k)
        losses.append(float(loss.detach()))
        return loss

    hf.compute_loss = recording
    hf.train()

    events = engine.event_log.events()
    assert [e["step"] for e in events] == [e["step"] for e in reference]
    for ours, theirs in zip(events, reference, strict=True):
        assert ours["ranks"] == theirs["ranks"], f"rank pattern differs after the event at step {ours['step']}"
    lightning_losses = [loss * accumulate for loss in recorder.losses]  # Lightning reports loss / accumulate
    assert losses == pytest.approx(lightning_losses, rel=1e-5, abs=1e-6)
    assert engine.rank_pattern() == module.rank_pattern()


def _hf_ddp(tmp_path, mode: str) -> tuple[dict, dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    prefix = tmp_path / mode
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "tests/hf_ddp_probe.py",
               str(prefix), mode]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # A C++ thread-teardown abort in gloo at process exit (not a decision of ours) was seen once on a loaded CI
        # machine; one rerun tells that flake from a real failure, which repeats deterministically.
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tuple(json.loads(Path(f"{prefix}.rank{r}").read_text()) for r in (0, 1))


def test_hf_trainer_under_torchrun_applies_rank_zeros_plan_on_every_process(tmp_path):
    rank0, rank1 = _hf_ddp(tmp_path, "broadcast")
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["events"] == rank1["events"] > 0
    assert rank0["log"] == rank1["log"] and rank0["ranks"] == rank1["ranks"]
    local0, local1 = _hf_ddp(tmp_path, "local")  # control: without the broadcast the skewed rank plans its own
    assert local0["log"] != local1["log"], "the skew did not make the ranks differ: the test would not catch it"
