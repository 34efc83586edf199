"""The rank-allocation Callback: times the allocator, applies its plans, keeps the optimizer true, logs.

Per optimizer step t (``trainer.global_step`` counts them, never micro-batches):

* ``on_before_optimizer_step``: ``allocator.observe(adapters, t)`` with complete gradients (after
  accumulation and DDP all-reduce, unscaled, before clipping);
* ``on_train_batch_end`` once ``global_step`` has advanced to t: ``plan = allocator.plan(adapters, t)``
  on rank 0, broadcast to all ranks, applied to the adapters, optimizer-state surgery on the touched
  slots, then logged.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from flexlora.allocators import Allocator, build_allocator
from flexlora.errors import FlexLoRAError
from flexlora.events import apply_event
from flexlora.optim import supports_slot_surgery
from flexlora.plan import RankPlan
from flexlora.training.module import FlexLoRAModule

log = logging.getLogger(__name__)
SHARDED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLAFSDP")

EventListener = Callable[[dict[str, Any]], None]


class RankAllocationCallback(Callback):
    """Drives an allocator over training; its ``state_dict`` makes a resumed run continue exactly."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed + 7919)  # new-slot vectors: the run's own RNG
        self.allocator: Allocator | None = None
        self.events = 0
        self.last_step = 0
        self.records: list[dict[str, Any]] = []
        self.listeners: list[EventListener] = []
        self._pending_state: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup and validation
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in SHARDED_STRATEGIES):
            raise FlexLoRAError(
                f"trainer strategy {strategy} shards parameters, which rank allocation does not support yet "
                "(masks and optimizer surgery need whole tensors on every rank); use trainer=ddp or a single device"
            )
        if not isinstance(pl_module, FlexLoRAModule):
            raise FlexLoRAError("RankAllocationCallback needs a FlexLoRAModule")
        self.allocator = build_allocator(pl_module.allocator_config, seed=self.seed)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.allocator is not None and isinstance(pl_module, FlexLoRAModule)
        total = int(trainer.estimated_stepping_batches)
        self.allocator.bind(pl_module.adapters, total)
        if self.allocator.dynamic:
            for optimizer in trainer.optimizers:
                if not supports_slot_surgery(optimizer):
                    raise FlexLoRAError(
                        f"allocator {pl_module.allocator_config.name} changes ranks during training, which needs an "
                        f"optimizer with per-slot step counts; {type(optimizer).__name__} has one per tensor. "
                        "Use flexlora.optim.SlotAdamW (the default model.optimizer)"
                    )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resume: everything of the checkpoint is loaded by now, whatever the strategy's restore order.
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        if self._pending_rng is not None:  # resume: continue the dropout stream where the checkpoint left it
            _set_rng_state(self._pending_rng)
            self._pending_rng = None

    # ------------------------------------------------------------------ per step
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        assert self.allocator is not None and isinstance(pl_module, FlexLoRAModule)
        self.allocator.observe(pl_module.adapters, trainer.global_step + 1)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self.last_step:  # gradient accumulation: no optimizer step happened
            return
        self.last_step = step
        assert self.allocator is not None and isinstance(pl_module, FlexLoRAModule)
        plan = self.allocator.plan(pl_module.adapters, step) if trainer.is_global_zero else None
        plan = trainer.strategy.broadcast(plan, src=0)
        if plan is None or plan.is_empty():
            return
        apply_event(pl_module.adapters, plan, trainer.optimizers, self.generator, self.allocator)
        self.events += 1
        self._record(trainer, pl_module, plan)

    # ------------------------------------------------------------------ logging
    def _record(self, trainer: L.Trainer, pl_module: FlexLoRAModule, plan: RankPlan) -> None:
        ranks = pl_module.rank_pattern()
        record = {
            "step": plan.step,
            "event": self.events,
            "total_rank": sum(ranks.values()),
            "budget": plan.budget,
            "pruned": {k: len(v) for k, v in plan.prune.items() if v},
            "grown": {k: v for k, v in plan.grow.items() if v},
            "soft_masked": sum(len(v) for v in plan.zero_lambda.values()),
            "skipped_full": plan.skipped_full,
            "ranks": ranks,
            "importance": plan.importance,
        }
        self.records.append(record)
        metrics = {
            "alloc/events": float(self.events),
            "alloc/total_rank": float(record["total_rank"]),
            "alloc/pruned": float(sum(record["pruned"].values())),
            "alloc/grown": float(sum(record["grown"].values())),
            "alloc/skipped_full": float(plan.skipped_full),
        }
        if plan.budget is not None:
            metrics["alloc/budget"] = float(plan.budget)
        if trainer.is_global_zero:
            log.info(
                "step %d: allocation event %d: pruned %d, grown %d, soft-masked %d; total live rank %d (budget %s)",
                plan.step, self.events, metrics["alloc/pruned"], metrics["alloc/grown"], record["soft_masked"],
                record["total_rank"], plan.budget,
            )
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=plan.step)
            for listener in self.listeners:
                listener(record)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "allocator": self.allocator.state_dict() if self.allocator is not None else None,
            "generator": self.generator.get_state(),
            "events": self.events,
            "last_step": self.last_step,
            "records": self.records,
            "rng": _get_rng_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict
        self._pending_rng = state_dict.get("rng")

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.allocator is not None
        if state.get("allocator") is not None:
            self.allocator.load_state_dict(state["allocator"])
        self.generator.set_state(state["generator"])
        self.events = int(state["events"])
        self.last_step = int(state["last_step"])
        self.records = list(state.get("records", []))


def _get_rng_state() -> dict[str, Any]:
    """Global RNG states in types that ``torch.load(weights_only=True)`` accepts (no numpy arrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached": float(cached)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
