"""FlexLoRA (Liu, Si, Jia, 2026): entropy-guided prune-and-grow under a fixed total rank (DESIGN.md 4.3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from flexlora.adapters.layer import SlotLoRALayer
from flexlora.allocators.base import Adapters, Allocator
from flexlora.allocators.config import FlexLoRAConfig
from flexlora.allocators.importance import SensitivityTracker, batched_importance
from flexlora.allocators.plan import RankPlan
from flexlora.errors import FlexLoRAError


def event_budget(schedule: str, b0: int, progress: float) -> int:
    """Matrices to shrink (and to grow) at an event, with p = progress through the event window."""
    if schedule == "constant":
        value = float(b0)
    elif schedule == "cubic":
        value = b0 * (1 - progress) ** 3
    elif schedule == "cubic_late":
        value = b0 * (1 - progress**3)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return round(value)


class FlexLoRAAllocator(Allocator):
    """At every event: score each matrix, shrink the b least important, grow the b most important.

    Events happen at t_init < t < T - t_final with (t - t_init) mod delta_t == 0. Importances are
    computed once per event before any change. The shrink set D holds the b lowest-scored matrices with
    live rank > 1; the grow set U the b highest-scored of the rest with a free slot. With
    ``direction=both`` the two sets are trimmed to equal size so the total live rank stays n * r0.
    """

    config: FlexLoRAConfig

    def __init__(self, config: FlexLoRAConfig) -> None:
        super().__init__(config)
        self.tracker = SensitivityTracker(config.beta1, config.beta2) if config.importance == "sensitivity" else None

    def _validate(self, adapters: Adapters) -> None:
        c = self.config
        if self.first_event_step() >= self.window_end():
            raise self.schedule_error(
                "no allocation event fits: the first event t_init + delta_t must be < T - t_final"
            )
        sets = 2 if c.direction == "both" else 1
        n = len(adapters)
        if sets * c.budget_per_event > n:
            raise FlexLoRAError(
                f"allocator.budget_per_event={c.budget_per_event} is too large for {n} adapted matrices: "
                f"direction={c.direction} needs {sets} x budget_per_event <= {n}; "
                f"set allocator.budget_per_event <= {n // sets}"
            )

    def first_event_step(self) -> int:
        return self.t_init + self.config.delta_t

    def window_end(self) -> int:
        assert self.total_steps is not None
        return self.total_steps - self.t_final

    def is_event(self, step: int) -> bool:
        return self.t_init < step < self.window_end() and (step - self.t_init) % self.config.delta_t == 0

    def event_steps(self) -> list[int]:
        return list(range(self.first_event_step(), self.window_end(), self.config.delta_t))

    def budget(self, step: int) -> int:
        progress = (step - self.t_init) / (self.window_end() - self.t_init)
        return event_budget(self.config.schedule, self.config.budget_per_event, progress)

    def observe(self, adapters: Adapters, step: int) -> None:
        if self.tracker is not None and step < self.window_end():
            self.tracker.update(adapters)

    def importance(self, adapters: Adapters) -> dict[str, float]:
        """Score every matrix; spectral scores in one batched pass per slot capacity (see batched_importance)."""
        kind = self.config.importance
        if kind == "sensitivity":
            assert self.tracker is not None
            scores: dict[str, float] = {}
            for name, layer in adapters.items():
                live = self.tracker.triplet_scores(name, layer)[layer.mask]
                scores[name] = float(live.double().mean()) if live.numel() else 0.0
            return scores
        values, _ = self._spectral_scores(adapters, kind)
        return values

    @staticmethod
    def _spectral_scores(adapters: Adapters, kind: str) -> tuple[dict[str, float], dict[str, int]]:
        """(importance, live rank) per matrix, with one host transfer per group of equal slot capacity."""
        groups: dict[int, list[str]] = {}
        for name, layer in adapters.items():
            groups.setdefault(layer.max_rank, []).append(name)
        scores: dict[str, float] = {}
        ranks: dict[str, int] = {}
        for names in groups.values():
            layers = [adapters[n] for n in names]
            mask = torch.stack([layer.mask for layer in layers])
            lam = torch.stack([
                layer.lora_E.detach() if layer.lora_E is not None else torch.ones_like(layer.mask, dtype=torch.float64)
                for layer in layers
            ]).to(torch.float64)
            group_scores = batched_importance(lam, mask, kind).tolist()  # type: ignore[arg-type]
            group_ranks = mask.sum(dim=1).tolist()
            scores.update(zip(names, group_scores, strict=True))
            ranks.update(zip(names, group_ranks, strict=True))
        return {n: scores[n] for n in adapters}, {n: ranks[n] for n in adapters}

    def plan(self, adapters: Adapters, step: int) -> RankPlan | None:
        if not self.is_event(step):
            return None
        b = self.budget(step)
        c = self.config
        if c.importance == "sensitivity":
            importance = self.importance(adapters)
            ranks = {name: layer.live_rank for name, layer in adapters.items()}
        else:
            importance, ranks = self._spectral_scores(adapters, c.importance)
        if b <= 0:
            return None
        order = {name: i for i, name in enumerate(adapters)}
        ascending = sorted(adapters, key=lambda n: (importance[n], order[n]))
        shrink: list[str] = []
        if c.direction in ("both", "prune_only"):
            shrink = [n for n in ascending if ranks[n] > 1][:b]
        grow: list[str] = []
        if c.direction in ("both", "grow_only"):
            descending = sorted(adapters, key=lambda n: (-importance[n], order[n]))
            grow = [n for n in descending if n not in shrink and ranks[n] < adapters[n].max_rank][:b]
        if c.direction == "both":
            pairs = min(len(shrink), len(grow))
            shrink, grow = shrink[:pairs], grow[:pairs]
        if not shrink and not grow:
            return None
        prune = {n: [self._weakest_slot(adapters[n])] for n in shrink}
        total = sum(ranks.values()) - len(shrink) + len(grow)
        return RankPlan(
            step=step, prune=prune, grow={n: 1 for n in grow}, grow_spec=c.grow_spec(), budget=total,
            importance=importance,
        )

    @staticmethod
    def _weakest_slot(layer: SlotLoRALayer) -> int:
        """The live slot with the smallest |lambda| (lowest index on ties)."""
        live = layer.live_slots()
        magnitude = layer.live_lambda().abs().double().cpu()
        return int(live[int(torch.argmin(magnitude))])

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.tracker is not None:
            state["tracker"] = self.tracker.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if self.tracker is not None and "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])
