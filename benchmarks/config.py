"""Benchmark runs are composed exactly as ``run.py`` composes a run: Hydra + the ConfigStore schemas.

Nothing here builds a module by hand; ``flexlora.train.build`` turns these configs into the datamodule,
module, trainer and allocation callback that a real run gets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from benchmarks import REPO
from benchmarks.modes import ADALORA, RunSpec, StepSetup
from flexlora.conf_store import compose, to_plain

__all__ = ["COMMONSENSE_DIR", "allocator_values", "compose"]
# the commonsense sets: $FLEXLORA_COMMONSENSE_DIR as in conf/task/commonsense.yaml, else the shared data folder
_CANDIDATES = [p / "shared" / "data" / "commonsense" for p in (REPO.parent, REPO.parent.parent, Path("/work"))]
COMMONSENSE_DIR = Path(os.environ.get("FLEXLORA_COMMONSENSE_DIR") or next(
    (c for c in _CANDIDATES if (c / "boolq" / "test.json").is_file()), _CANDIDATES[0]))


def allocator_values(*overrides: str) -> dict[str, Any]:
    """The allocator group as a run would get it (budget interpolations resolved), e.g. for build_allocator."""
    return to_plain(compose(*overrides).allocator)


def task_overrides(setup: StepSetup) -> list[str]:
    if setup.task == "tweets":
        return ["task=tweets", f"task.max_length={setup.seq_len}", "task.max_eval_samples=32"]
    if setup.task == "commonsense":
        return ["task=commonsense", f"task.data_dir={COMMONSENSE_DIR}", "task.eval_sets=[boolq]",
                f"task.cutoff_len={setup.seq_len}", "task.max_eval_samples=8"]
    raise ValueError(f"no benchmark task {setup.task!r}")


def run_overrides(setup: StepSetup, spec: RunSpec) -> list[str]:
    """debug=tiny (no logger, no callbacks, no resume) with the part's backbone, task, sizes and schedule.

    Events fall at t_init + k delta_t: the last warm-up step and the last step of every timed group; the
    window (AdaLoRA's budget phase, FlexLoRA's events) ends after the last timed step.
    """
    dt, warm, total = setup.delta_t, setup.warm_steps, setup.total_steps
    overrides = [
        "debug=tiny", f"backbone={setup.backbone}", "trainer=cpu", *task_overrides(setup),
        f"task.batch_size={setup.batch_size}", f"task.max_train_samples={setup.batch_size * (total + 5)}",
        f"trainer.max_steps={total}", "trainer.max_epochs=-1", "++trainer.enable_checkpointing=false",
        "++trainer.limit_val_batches=0", "report.figures=false",
        f"allocator={spec.method}", f"allocator.rank={setup.rank}",
        f"allocator.t_init={warm - dt}", f"allocator.t_final={dt}", f"allocator.delta_t={dt}",
    ]
    if spec.method == ADALORA:
        overrides.append(f"allocator.target_rank={max(1, setup.rank // 2)}")
    if spec.capacity is not None:
        overrides.append(f"allocator.max_rank={spec.capacity * setup.rank}")
    return overrides


def run_config(setup: StepSetup, spec: RunSpec, output_dir: Path) -> DictConfig:
    return compose(*run_overrides(setup, spec), output_dir=output_dir)
