"""The rank-allocation Callback: a thin Lightning adapter over :class:`flexlora.engine.RankAllocationEngine`.

Per optimizer step t (``trainer.global_step`` counts them, never micro-batches), ``on_train_batch_end`` runs
once ``global_step`` has advanced to t: the optimizer and the LR scheduler have stepped and the gradients of
step t are still there (accumulated, all-reduced, unscaled, clipped), so ``engine.observe(t)`` then
``engine.allocate(t)`` (decide on rank 0, broadcast through the strategy, apply, log). Like Lightning's own
stateful callbacks it validates early (``setup``: strategy, module; ``on_fit_start``: optimizer) and persists
what a resume needs in its ``state_dict`` (the engine's), restoring it once everything else is loaded
(``on_train_start``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from typing_extensions import override

from flexlora.engine import EventListener, RankAllocationEngine
from flexlora.errors import FlexLoRAError
from flexlora.eventlog import EventLog
from flexlora.faults import fault_point
from flexlora.training.module import AdaptedBackboneModule

SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


class RankAllocationCallback(Callback):
    """Drives an allocator over training; its ``state_dict`` makes a resumed run continue exactly."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.engine: RankAllocationEngine | None = None
        self.event_log = EventLog()  # the reporter gives it its file on rank 0; the engine writes to it
        self.listeners: list[EventListener] = []
        self._pending_state: dict[str, Any] | None = None

    # the engine's state, under the names the reporter, tests and probes read
    allocator = property(lambda self: self.engine.allocator if self.engine else None)
    events = property(lambda self: self.engine.events if self.engine else 0)
    generator = property(lambda self: self.engine.generator if self.engine else None)
    lr_held = property(lambda self: self.engine.lr_held if self.engine else False)

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
        self.engine = RankAllocationEngine(
            pl_module.adapters, pl_module.allocator_config, seed=self.seed,
            broadcast=lambda value: trainer.strategy.broadcast(value, src=0), is_main=trainer.is_global_zero,
        )
        self.engine.event_log = self.event_log
        self.engine.listeners = self.listeners

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.engine is not None
        self.engine.bind(trainer.optimizers, int(trainer.estimated_stepping_batches))

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.engine is not None
        if self._pending_state:  # resume: everything else of the checkpoint is loaded by now
            self.engine.load_state_dict(self._pending_state)
            self._pending_state = None
            return
        self.engine.start()

    # ------------------------------------------------------------------ per step
    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        fault_point("step")
        assert self.engine is not None
        step = trainer.global_step
        if step == self.engine.last_step:  # gradient accumulation: no optimizer step happened
            return
        self.engine.observe(step)
        record = self.engine.allocate(step)
        if record is not None and trainer.is_global_zero:
            self._log_metrics(trainer, record)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.engine is not None
        if self._pending_state:  # resumed from a checkpoint at the last step: training was skipped
            self.engine.load_state_dict(self._pending_state)
            self._pending_state = None
        self.engine.end(trainer.global_step)

    def _log_metrics(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        metrics = {
            "alloc/events": float(record["event"]),
            "alloc/total_rank": float(record["total_rank"]),
            "alloc/pruned": float(sum(record["pruned"].values())),
            "alloc/grown": float(sum(record["grown"].values())),
            "alloc/skipped_full": float(record["skipped_full"]),
        }
        if record["budget"] is not None:
            metrics["alloc/budget"] = float(record["budget"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=record["step"])

    # ------------------------------------------------------------------ checkpoint state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            return {}
        return self.engine.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict


__all__ = ["RankAllocationCallback"]
