"""The rank-allocation Callback: times the allocator, applies its plans, keeps the optimizer true, logs.

Per optimizer step t (``trainer.global_step`` counts them, never micro-batches):

* ``on_train_batch_end`` once ``global_step`` has advanced to t (the optimizer and the LR scheduler have
  stepped; the gradients of step t are still there, accumulated, all-reduced, unscaled and clipped):
  ``allocator.observe(adapters, t)`` on the updated weights (peft's ``update_and_allocate`` order), then
  ``plan = allocator.plan(adapters, t)`` on rank 0, broadcast to all ranks, then
  :func:`flexlora.events.apply_event` (adapters, optimizer-state surgery, the allocator's trackers), then one
  record in the run's event log.

Like Lightning's own stateful callbacks it validates early (``setup``: strategy, module, optimizer) and
persists what a resume needs in its ``state_dict`` (allocator state, the new-slot generator, the event log,
the global RNG), restoring it once everything else is loaded (``on_train_start``).
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
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from typing_extensions import override

from flexlora.allocators import Allocator, build_allocator
from flexlora.errors import FlexLoRAError
from flexlora.eventlog import EventLog
from flexlora.events import apply_event
from flexlora.faults import fault_point
from flexlora.optim import supports_slot_surgery
from flexlora.optim.released import hold_peak_lr, reset_all_state
from flexlora.plan import RankPlan
from flexlora.training.module import AdaptedBackboneModule

log = logging.getLogger(__name__)
SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)

EventListener = Callable[[dict[str, Any]], None]


class RankAllocationCallback(Callback):
    """Drives an allocator over training; its ``state_dict`` makes a resumed run continue exactly."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed + 7919)  # new-slot vectors: the run's own RNG
        self.allocator: Allocator | None = None
        self.events = 0
        self.last_step = 0
        self.event_log = EventLog()  # the reporter gives it its file on rank 0
        self.listeners: list[EventListener] = []
        self.lr_held = False  # optimizer_state=released_reset, from the first event on
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup and validation
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, SHARDED_STRATEGIES):
            raise FlexLoRAError(
                f"trainer strategy {type(trainer.strategy).__name__} shards parameters, which rank allocation does "
                "not support yet (masks and optimizer surgery need whole tensors on every rank); use trainer=ddp "
                "or a single device"
            )
        if not isinstance(pl_module, AdaptedBackboneModule):
            raise FlexLoRAError("RankAllocationCallback needs an AdaptedBackboneModule")
        self.allocator = build_allocator(pl_module.allocator_config, seed=self.seed)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.allocator is not None and isinstance(pl_module, AdaptedBackboneModule)
        self.allocator.bind(pl_module.adapters, int(trainer.estimated_stepping_batches))
        if self.allocator.dynamic:
            for optimizer in trainer.optimizers:
                if not supports_slot_surgery(optimizer):
                    raise FlexLoRAError(
                        f"allocator {pl_module.allocator_config.name} changes ranks during training, which needs an "
                        f"optimizer with per-slot step counts; {type(optimizer).__name__} has one per tensor. "
                        "Use flexlora.optim.SlotAdamW (the default model.optimizer)"
                    )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, AdaptedBackboneModule)
        if self._pending_state is not None:  # resume: everything else of the checkpoint is loaded by now
            self._restore(self._pending_state)
            self._pending_state = None
            return
        ranks = pl_module.rank_pattern()
        self.event_log.reset([{"step": 0, "event": 0, "kind": "start", "total_rank": sum(ranks.values()),
                               "budget": None, "ranks": ranks, "importance": {}}])

    # ------------------------------------------------------------------ per step
    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        fault_point("step")
        step = trainer.global_step
        if step == self.last_step:  # gradient accumulation: no optimizer step happened
            return
        self.last_step = step
        assert self.allocator is not None and isinstance(pl_module, AdaptedBackboneModule)
        self.allocator.observe(pl_module.adapters, step)
        plan = self.allocator.plan(pl_module.adapters, step) if trainer.is_global_zero else None
        plan = trainer.strategy.broadcast(plan, src=0)
        if plan is not None and not plan.is_empty():
            apply_event(pl_module.adapters, plan, trainer.optimizers, self.generator, self.allocator)
            if getattr(pl_module.allocator_config, "optimizer_state", "surgery") == "released_reset":
                reset_all_state(trainer.optimizers)
                self.lr_held = True
            self.events += 1
            self._record(trainer, pl_module, plan)
        if self.lr_held:  # after the scheduler's step: what it set never reaches training
            hold_peak_lr(trainer.optimizers)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, AdaptedBackboneModule)
        if self._pending_state is not None:  # resumed from a checkpoint at the last step: training was skipped
            self._restore(self._pending_state)
            self._pending_state = None
        ranks = pl_module.rank_pattern()
        self.event_log.append({"step": trainer.global_step, "event": None, "kind": "end",
                               "total_rank": sum(ranks.values()), "budget": None, "ranks": ranks, "importance": {}})

    # ------------------------------------------------------------------ logging
    def _record(self, trainer: L.Trainer, pl_module: AdaptedBackboneModule, plan: RankPlan) -> None:
        ranks = pl_module.rank_pattern()
        record = {
            "step": plan.step,
            "event": self.events,
            "kind": "event",
            "total_rank": sum(ranks.values()),
            "budget": plan.budget,
            "pruned": {k: len(v) for k, v in plan.prune.items() if v},
            "grown": {k: v for k, v in plan.grow.items() if v},
            "soft_masked": sum(len(v) for v in plan.zero_lambda.values()),
            "skipped_full": plan.skipped_full,
            "ranks": ranks,
            "importance": plan.importance,
        }
        self.event_log.append(record)
        if not trainer.is_global_zero:
            return
        log.info(
            "step %d: allocation event %d: pruned %d, grown %d, soft-masked %d, skipped at capacity %d; "
            "total live rank %d (budget %s)", plan.step, self.events, sum(record["pruned"].values()),
            sum(record["grown"].values()), record["soft_masked"], plan.skipped_full, record["total_rank"], plan.budget,
        )
        metrics = {
            "alloc/events": float(self.events),
            "alloc/total_rank": float(record["total_rank"]),
            "alloc/pruned": float(sum(record["pruned"].values())),
            "alloc/grown": float(sum(record["grown"].values())),
            "alloc/skipped_full": float(plan.skipped_full),
        }
        if plan.budget is not None:
            metrics["alloc/budget"] = float(plan.budget)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=plan.step)
        for listener in self.listeners:
            listener(self.event_log.records[-1])

    # ------------------------------------------------------------------ checkpoint state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "allocator": self.allocator.state_dict() if self.allocator is not None else None,
            "generator": self.generator.get_state(),
            "events": self.events,
            "last_step": self.last_step,
            "lr_held": self.lr_held,
            "records": list(self.event_log.records),
            "rng": _get_rng_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.allocator is not None
        if state.get("allocator") is not None:
            self.allocator.load_state_dict(state["allocator"])
        self.generator.set_state(state["generator"])
        self.events = int(state["events"])
        self.last_step = int(state["last_step"])
        self.lr_held = bool(state.get("lr_held", False))
        # the file is cut back to the checkpoint's events: what a killed run wrote later is redone, never doubled
        self.event_log.reset(state.get("records", []))
        if state.get("rng") is not None:  # continue the dropout stream where the checkpoint left it
            _set_rng_state(state["rng"])


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
