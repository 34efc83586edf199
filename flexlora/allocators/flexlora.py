"""FlexLoRA (Liu, Si, Jia, 2026): entropy-guided prune-and-grow under a fixed total rank (docs/architecture.md §3.2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from flexlora.adapters.layer import SlotLoRALayer
from flexlora.allocators.base import Adapters, Allocator
from flexlora.allocators.config import FlexLoRAConfig
from flexlora.allocators.importance import SensitivityTracker, batched_importance
from flexlora.errors import FlexLoRAError
from flexlora.plan import RankPlan, SlotChange


def event_budget(schedule: str, b0: int, progress: float) -> int:
    """Matrices to shrink (and to grow) at an event, with p = progress through the event window."""
    if schedule == "constant":
        value = float(b0)
    elif schedule == "cubic":
        value = b0 * (1 - progress) ** 3
    else:
        assert schedule == "cubic_late", schedule
        value = b0 * (1 - progress**3)
    return round(value)


class FlexLoRAAllocator(Allocator):
    """At every event: score each matrix, shrink the b least important, grow the b most important.

    Events happen at t_init < t < T - t_final with (t - t_init) mod delta_t == 0. Importances are
    computed once per event before any change. The shrink set D holds the b lowest-scored matrices with
    live rank > 1; the grow set U the b highest-scored of the rest with a free slot. With
    ``direction=both`` the two sets are trimmed to equal size so the total live rank stays n * r0; the
    budget-matched ablations move only while the total is above (prune_only) or below (grow_only) n * r0,
    so all three end at n * r0.

    ``rank_one=reference`` reproduces what the released code's NaN entropy of a rank-1 matrix does under
    PyTorch's topk (NaN ranks above every number): never a shrink candidate, first in line to grow.
    ``importance=random`` scores matrices with uniform draws from the allocator's own seeded generator.
    """

    config: FlexLoRAConfig

    def __init__(self, config: FlexLoRAConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.tracker = SensitivityTracker(config.beta1, config.beta2) if config.importance == "sensitivity" else None
        self.generator = torch.Generator().manual_seed(seed + 104_729)  # importance=random only
        self.target_total = 0

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
        self.target_total = n * c.rank
        if c.direction != "both":
            needed = abs(sum(layer.live_rank for layer in adapters.values()) - self.target_total)
            reachable = sum(self.budget(step) for step in self.event_steps())
            if reachable < needed:
                verb = "remove" if c.direction == "prune_only" else "add"
                raise self.schedule_error(
                    f"direction={c.direction} must {verb} {needed} slots to end at n x rank = {self.target_total}, "
                    f"but its {len(self.event_steps())} events can {verb} at most {reachable}; raise "
                    f"allocator.budget_per_event, bring allocator.init_rank closer to allocator.rank, or"
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

    def importance(self, adapters: Adapters) -> dict[str, float | None]:
        """Per-matrix scores as logged (None where the score is undefined: entropy at rank 1 under
        rank_one=reference). Pure: importance=random is drawn from a copy of the generator."""
        scores, _ = self._scores(adapters, self._generator_copy())
        return {name: (None if math.isinf(v) else v) for name, v in scores.items()}

    def _generator_copy(self) -> torch.Generator:
        return torch.Generator().set_state(self.generator.get_state())

    def _scores(self, adapters: Adapters, generator: torch.Generator) -> tuple[dict[str, float], dict[str, int]]:
        """(decision score, live rank) per matrix; +inf marks a rank-1 matrix under rank_one=reference."""
        kind = self.config.importance
        ranks = {name: layer.live_rank for name, layer in adapters.items()}
        if kind == "random":
            draws = torch.rand(len(adapters), generator=generator, dtype=torch.float64).tolist()
            return dict(zip(adapters, draws, strict=True)), ranks
        if kind == "sensitivity":
            assert self.tracker is not None
            scores: dict[str, float] = {}
            for name, layer in adapters.items():
                live = self.tracker.triplet_scores(name, layer)[: layer.live_rank]
                scores[name] = float(live.double().mean()) if live.numel() else 0.0
            return scores, ranks
        scores = self._spectral_scores(adapters, kind)
        if kind == "entropy" and self.config.rank_one == "reference":
            scores = {name: (math.inf if ranks[name] == 1 else value) for name, value in scores.items()}
        return scores, ranks

    @staticmethod
    def _spectral_scores(adapters: Adapters, kind: str) -> dict[str, float]:
        """Importance per matrix, with one host transfer per group of equal slot capacity."""
        groups: dict[int, list[str]] = {}
        for name, layer in adapters.items():
            groups.setdefault(layer.max_rank, []).append(name)
        scores: dict[str, float] = {}
        for names in groups.values():
            layers = [adapters[n] for n in names]
            mask = torch.stack([layer.mask for layer in layers])
            lam = torch.stack([
                layer.lora_E.detach() if layer.lora_E is not None else torch.ones_like(layer.mask, dtype=torch.float64)
                for layer in layers
            ]).to(torch.float64)
            scores.update(zip(names, batched_importance(lam, mask, kind).tolist(), strict=True))  # type: ignore[arg-type]
        return {n: scores[n] for n in adapters}

    def plan(self, adapters: Adapters, step: int) -> RankPlan | None:
        """The event's decision. Pure except for importance=random, which advances its own generator."""
        if not self.is_event(step):
            return None
        c = self.config
        importance, ranks = self._scores(adapters, self.generator)
        b = self.budget(step)
        total = sum(ranks.values())
        if c.direction == "prune_only":
            b = min(b, total - self.target_total)
        elif c.direction == "grow_only":
            b = min(b, self.target_total - total)
        if b <= 0:
            return None
        order = {name: i for i, name in enumerate(adapters)}
        shrink: list[str] = []
        if c.direction in ("both", "prune_only"):
            ascending = sorted(adapters, key=lambda n: (importance[n], order[n]))
            shrink = [n for n in ascending if ranks[n] > 1][:b]
        grow: list[str] = []
        skipped_full = 0
        if c.direction in ("both", "grow_only"):
            descending = sorted(adapters, key=lambda n: (-importance[n], order[n]))
            for name in descending:
                if len(grow) == b:
                    break
                if name in shrink:
                    continue
                if ranks[name] >= adapters[name].max_rank:
                    skipped_full += 1
                    continue
                grow.append(name)
        if c.direction == "both":
            pairs = min(len(shrink), len(grow))
            shrink, grow = shrink[:pairs], grow[:pairs]
        if not shrink and not grow:
            return None
        prune = {n: [self._weakest_slot(adapters[n])] for n in shrink}
        return RankPlan(
            step=step, prune=prune, grow={n: 1 for n in grow}, grow_spec=c.grow_spec(),
            budget=total - len(shrink) + len(grow),
            importance={n: (None if math.isinf(v) else v) for n, v in importance.items()},
            skipped_full=skipped_full,
        )

    @staticmethod
    def _weakest_slot(layer: SlotLoRALayer) -> int:
        """The live slot with the smallest |lambda| (lowest index on ties)."""
        magnitude = layer.live_lambda().abs().double().cpu()
        return int(torch.argmin(magnitude))

    def on_applied(self, changes: Mapping[str, SlotChange]) -> None:
        if self.tracker is not None:
            self.tracker.follow(changes)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator"] = self.generator.get_state()
        if self.tracker is not None:
            state["tracker"] = self.tracker.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "generator" in state:
            self.generator.set_state(state["generator"])
        if self.tracker is not None and "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])
