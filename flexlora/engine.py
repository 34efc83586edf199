"""The rank-allocation engine: what drives an allocator over any training loop, with no loop of its own.

A loop tells the engine where it is, once per optimizer step t = 1..T (``t`` counts optimizer steps, never
micro-batches):

* :meth:`RankAllocationEngine.observe` after ``optimizer.step()``, while step t's gradients (accumulated,
  all-reduced, unscaled, clipped) are still on the parameters: the allocator scores the updated weights
  (peft's ``update_and_allocate`` order);
* :meth:`RankAllocationEngine.allocate` after the LR scheduler's step: the plan is decided on the main process,
  broadcast to all, applied (adapters, optimizer-state surgery or the released trainer's reset, the
  allocator's trackers) and recorded in the event log.

``step(t)`` does both for loops where the gradients survive the scheduler step (Lightning's, a plain loop).
:meth:`penalty` is the extra loss term of the SVD form. ``state_dict`` / ``load_state_dict`` carry everything
a resumed run needs. The Lightning callback and the Hugging Face ``TrainerCallback`` are thin adapters over
this class, so both make the same decisions. Plain torch: no Lightning, no Hydra.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer

from flexlora.adapters import SlotLoRALayer
from flexlora.allocators import Allocator, build_allocator
from flexlora.allocators.config import AllocatorConfig, allocator_config
from flexlora.errors import FlexLoRAError
from flexlora.eventlog import EventLog
from flexlora.events import apply_event
from flexlora.optim import supports_slot_surgery
from flexlora.optim.released import hold_peak_lr, reset_all_state
from flexlora.plan import RankPlan

log = logging.getLogger(__name__)

EventListener = Callable[[dict[str, Any]], None]
Broadcast = Callable[[Any], Any]


def _no_broadcast(value: Any) -> Any:
    return value


def torch_distributed_broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every process (``torch.distributed``), or ``value`` when not distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class RankAllocationEngine:
    """Scores, plans, applies and logs rank changes for one adapted model and its optimizer(s).

    ``adapters``: the model's :class:`SlotLoRALayer` by name (what :func:`flexlora.adapters.inject` returns).
    ``allocator``: an allocator config (dataclass or mapping with a ``name``). ``seed`` seeds the allocator and
    the generator of new-slot vectors. ``broadcast`` sends rank 0's plan to every process (default: the
    ``torch.distributed`` one when initialised); ``is_main`` says whether this process decides.
    """

    def __init__(
        self,
        adapters: Mapping[str, SlotLoRALayer],
        allocator: AllocatorConfig | Mapping[str, Any],
        *,
        seed: int = 0,
        broadcast: Broadcast | None = None,
        is_main: bool | None = None,
    ) -> None:
        self.adapters = dict(adapters)
        self.config: AllocatorConfig = allocator if isinstance(allocator, AllocatorConfig) else allocator_config(
            allocator)
        self.seed = seed
        self.allocator: Allocator = build_allocator(self.config, seed=seed)
        self.generator = torch.Generator().manual_seed(seed + 7919)  # new-slot vectors: the run's own RNG
        self.broadcast = broadcast or torch_distributed_broadcast
        if is_main is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            is_main = not distributed or torch.distributed.get_rank() == 0
        self.is_main = is_main
        self.optimizers: list[Optimizer] = []
        self.events = 0
        self.last_step = 0
        self.lr_held = False  # optimizer_state=released_reset, from the first event on
        self.event_log = EventLog()
        self.listeners: list[EventListener] = []
        self.last_plan: RankPlan | None = None
        self.recorder: Any = None  # a DeltaGradRecorder while the allocator needs dL/d(dW)

    # ------------------------------------------------------------------ lifecycle
    def bind(self, optimizers: Optimizer | Iterable[Optimizer], total_steps: int) -> None:
        """Fix the optimizer(s) and the run length T; raises when the optimizer cannot follow rank changes."""
        self.optimizers = [optimizers] if isinstance(optimizers, Optimizer) else list(optimizers)
        self.allocator.bind(self.adapters, int(total_steps))
        if "delta_grad" in self.allocator.requires and self.recorder is None:
            from flexlora.adapters.delta_grad import DeltaGradRecorder

            self.recorder = DeltaGradRecorder(self.adapters)
            self.allocator.connect(delta_grad=self.recorder)
        if self.allocator.dynamic:
            for optimizer in self.optimizers:
                if not supports_slot_surgery(optimizer):
                    raise FlexLoRAError(
                        f"allocator {self.config.name} changes ranks during training, which needs an optimizer "
                        f"with per-slot step counts; {type(optimizer).__name__} has one per tensor. "
                        "Use flexlora.optim.SlotAdamW"
                    )

    def start(self) -> None:
        """Begin the event log with the initial rank pattern (a fresh run; a resumed one restores its log)."""
        ranks = self.rank_pattern()
        self.event_log.reset([{"step": 0, "event": 0, "kind": "start", "total_rank": sum(ranks.values()),
                               "budget": None, "ranks": ranks, "importance": {}}])

    def end(self, step: int) -> None:
        self.close()
        ranks = self.rank_pattern()
        self.event_log.append({"step": int(step), "event": None, "kind": "end", "total_rank": sum(ranks.values()),
                               "budget": None, "ranks": ranks, "importance": {}})

    # ------------------------------------------------------------------ per step
    def penalty(self) -> torch.Tensor | None:
        """``orth_reg`` x the orthogonality penalty to add to the loss (None for LoRA or ``orth_reg`` 0)."""
        return self.allocator.penalty(self.adapters)

    def close(self) -> None:
        """Remove what ``bind`` attached to the model (gradient hooks)."""
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None

    def observe(self, step: int) -> None:
        """After optimizer step ``step``, with its gradients still on the parameters."""
        self.allocator.observe(self.adapters, int(step))

    def allocate(self, step: int) -> dict[str, Any] | None:
        """After the LR scheduler's step ``step``: decide (main process), broadcast, apply, log; returns the
        event's record, or None when nothing changed. Holds the peak LR under ``released_reset``."""
        self.last_step = int(step)
        plan = self.allocator.plan(self.adapters, self.last_step) if self.is_main else None
        plan = self.broadcast(plan)
        self.last_plan = plan
        record = None
        if plan is not None and not plan.is_empty():
            apply_event(self.adapters, plan, self.optimizers, self.generator, self.allocator)
            if getattr(self.config, "optimizer_state", "surgery") == "released_reset":
                reset_all_state(self.optimizers)
                self.lr_held = True
            self.events += 1
            record = self._record(plan)
        if self.lr_held:  # after the scheduler's step: what it set never reaches training
            hold_peak_lr(self.optimizers)
        if self.recorder is not None and not self.allocator.still_requires("delta_grad"):
            self.close()
        return record

    def step(self, step: int) -> dict[str, Any] | None:
        """:meth:`observe` then :meth:`allocate`, for loops that keep gradients past the scheduler step."""
        self.observe(step)
        return self.allocate(step)

    def rank_pattern(self) -> dict[str, int]:
        return {name: layer.live_rank for name, layer in self.adapters.items()}

    def _record(self, plan: RankPlan) -> dict[str, Any]:
        ranks = self.rank_pattern()
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
        if self.is_main:
            log.info(
                "step %d: allocation event %d: pruned %d, grown %d, soft-masked %d, skipped at capacity %d; "
                "total live rank %d (budget %s)", plan.step, self.events, sum(record["pruned"].values()),
                sum(record["grown"].values()), record["soft_masked"], plan.skipped_full, record["total_rank"],
                plan.budget,
            )
            for listener in self.listeners:
                listener(self.event_log.records[-1])
        return self.event_log.records[-1]

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "allocator": self.allocator.state_dict(),
            "generator": self.generator.get_state(),
            "events": self.events,
            "last_step": self.last_step,
            "lr_held": self.lr_held,
            "records": list(self.event_log.records),
            "rng": get_rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore after the model and optimizer are loaded (and after :meth:`bind`)."""
        if state.get("allocator") is not None:
            self.allocator.load_state_dict(state["allocator"])
        self.generator.set_state(state["generator"])
        self.events = int(state["events"])
        self.last_step = int(state["last_step"])
        self.lr_held = bool(state.get("lr_held", False))
        # the file is cut back to the checkpoint's events: what a killed run wrote later is redone, never doubled
        self.event_log.reset(state.get("records", []))
        if state.get("rng") is not None:  # continue the dropout stream where the checkpoint left it
            set_rng_state(state["rng"])


def get_rng_state() -> dict[str, Any]:
    """Global RNG states in types that ``torch.load(weights_only=True)`` accepts (no numpy arrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached": float(cached)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
