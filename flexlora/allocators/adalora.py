"""AdaLoRA (Zhang et al., ICLR 2023) as in its reference code and peft's ``RankAllocator`` (DESIGN.md 4.2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from flexlora.allocators.base import Adapters, Allocator
from flexlora.allocators.config import AdaLoRAConfig
from flexlora.allocators.importance import SensitivityTracker
from flexlora.allocators.plan import RankPlan


class AdaLoRAAllocator(Allocator):
    """Sensitivity-scored soft masking on a cubic budget, then a fixed pattern for the last t_final steps.

    Phases (t = optimizer step, T total): t <= t_init no masking; t_init < t < T - t_final the soft
    budget ``b(t)`` shrinks cubically and every ``delta_t`` steps the lowest-scored triplets get
    lambda = 0 but stay live; at t = T - t_final the pattern is fixed at ``n * target_rank`` and the
    masked slots become dead (mask bit 0, optimizer state reset by surgery); scores stop updating there.
    """

    config: AdaLoRAConfig

    def __init__(self, config: AdaLoRAConfig) -> None:
        super().__init__(config)
        self.tracker = SensitivityTracker(config.beta1, config.beta2)
        self.initial_budget = 0
        self.target_budget = 0

    def _validate(self, adapters: Adapters) -> None:
        assert self.total_steps is not None
        if self.t_init >= self.total_steps - self.t_final:
            raise self.schedule_error("t_init must be < T - t_final so the budget can shrink to target_rank")
        self.initial_budget = sum(layer.live_rank for layer in adapters.values())
        self.target_budget = self.config.target_rank * len(adapters)

    @property
    def final_step(self) -> int:
        assert self.total_steps is not None
        return self.total_steps - self.t_final

    def budget(self, step: int) -> tuple[int, bool]:
        """(budget, mask now) for step t, exactly as peft's ``budget_schedule`` (int() truncation)."""
        if step <= self.t_init:
            return self.initial_budget, False
        if step > self.final_step:
            return self.target_budget, True
        progress = 1 - (step - self.t_init) / (self.final_step - self.t_init)
        budget = int((self.initial_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, step % self.config.delta_t == 0

    def observe(self, adapters: Adapters, step: int) -> None:
        if step < self.final_step:
            self.tracker.update(adapters)

    def slot_scores(self, adapters: Adapters) -> dict[str, torch.Tensor]:
        return {name: self.tracker.triplet_scores(name, layer) for name, layer in adapters.items()}

    def importance(self, adapters: Adapters) -> dict[str, float]:
        out = {}
        for name, scores in self.slot_scores(adapters).items():
            live = scores[adapters[name].mask]
            out[name] = float(live.mean()) if live.numel() else 0.0
        return out

    def _lowest(self, adapters: Adapters, count: int) -> dict[str, list[int]]:
        """The ``count`` live slots with the smallest triplet scores (stable order breaks ties)."""
        scores = self.slot_scores(adapters)
        flat, owners = [], []
        for name, layer in adapters.items():
            live = layer.live_slots()
            flat.append(scores[name][live].float().cpu())
            owners.extend((name, int(i)) for i in live)
        chosen: dict[str, list[int]] = {name: [] for name in adapters}
        if count <= 0 or not owners:
            return chosen
        order = torch.argsort(torch.cat(flat), stable=True)[:count]
        for idx in order.tolist():
            name, slot = owners[idx]
            chosen[name].append(slot)
        return {name: sorted(slots) for name, slots in chosen.items()}

    def plan(self, adapters: Adapters, step: int) -> RankPlan | None:
        if step == self.final_step:
            live_total = sum(layer.live_rank for layer in adapters.values())
            prune = self._lowest(adapters, live_total - self.target_budget)
            return RankPlan(step=step, prune=prune, budget=self.target_budget, importance=self.importance(adapters))
        if step >= self.final_step:
            return None
        budget, mask_now = self.budget(step)
        if not mask_now or step <= self.t_init:
            return None
        live_total = sum(layer.live_rank for layer in adapters.values())
        zero = self._lowest(adapters, live_total - budget)
        return RankPlan(step=step, zero_lambda=zero, budget=budget, importance=self.importance(adapters))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(tracker=self.tracker.state_dict(), initial_budget=self.initial_budget)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.tracker.load_state_dict(state["tracker"])
        self.initial_budget = state["initial_budget"]
