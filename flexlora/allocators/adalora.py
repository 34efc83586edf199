"""AdaLoRA (Zhang et al., ICLR 2023) as in its reference code and peft's ``RankAllocator``.

Algorithm: docs/architecture.md §3.1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from flexlora.allocators.base import Adapters, Allocator
from flexlora.allocators.config import AdaLoRAConfig
from flexlora.allocators.importance import SensitivityTracker
from flexlora.plan import RankPlan, SlotChange


class AdaLoRAAllocator(Allocator):
    """Sensitivity-scored soft masking on a cubic budget, then a fixed pattern for the last t_final steps.

    Phases (t = optimizer step, T total): t <= t_init no masking; t_init < t < T - t_final the soft
    budget ``b(t)`` shrinks cubically and every ``delta_t`` steps the lowest-scored triplets get
    lambda = 0 but stay live; at t = T - t_final the pattern is fixed at ``n * target_rank`` and the
    masked slots become dead (mask bit 0, optimizer state reset by surgery); scores stop updating there.
    """

    config: AdaLoRAConfig

    def __init__(self, config: AdaLoRAConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
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

    def _score_table(self, adapters: Adapters) -> tuple[torch.Tensor, torch.Tensor]:
        """Triplet scores and masks as (n, max slots) tensors, computed once per plan; padding is dead."""
        rows = [self.tracker.triplet_scores(name, layer) for name, layer in adapters.items()]
        masks = [layer.mask for layer in adapters.values()]
        width = max(row.numel() for row in rows)
        if any(row.numel() != width for row in rows):  # mixed slot capacities: pad with dead slots
            rows = [torch.nn.functional.pad(row, (0, width - row.numel())) for row in rows]
            masks = [torch.cat([mask, mask.new_zeros(width - mask.numel())]) for mask in masks]
        return torch.stack(rows).float(), torch.stack(masks)

    @staticmethod
    def _importance(adapters: Adapters, scores: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """Mean triplet score of each matrix's live slots (logged, not used for decisions)."""
        live = mask.sum(dim=1)
        means = torch.where(live > 0, (scores * mask).sum(dim=1) / live.clamp_min(1), torch.zeros_like(scores[:, 0]))
        return dict(zip(adapters, means.tolist(), strict=True))

    def importance(self, adapters: Adapters) -> dict[str, float]:
        return self._importance(adapters, *self._score_table(adapters))

    @staticmethod
    def _lowest(adapters: Adapters, scores: torch.Tensor, mask: torch.Tensor, count: int) -> dict[str, list[int]]:
        """The ``count`` live slots with the smallest triplet scores.

        Ties go to the earlier matrix, then the lower slot (a stable sort over the row-major table, the same
        order as peft's concatenation of per-matrix scores).
        """
        chosen: dict[str, list[int]] = {name: [] for name in adapters}
        if count <= 0:
            return chosen
        names = list(adapters)
        width = scores.shape[1]
        flat = scores.masked_fill(~mask, float("inf")).flatten()
        for idx in torch.argsort(flat, stable=True)[:count].tolist():
            chosen[names[idx // width]].append(idx % width)
        return {name: sorted(slots) for name, slots in chosen.items()}

    def plan(self, adapters: Adapters, step: int) -> RankPlan | None:
        if step > self.final_step:
            return None
        if step < self.final_step:
            budget, mask_now = self.budget(step)
            if not mask_now or step <= self.t_init:
                return None
        else:
            budget = self.target_budget
        scores, mask = self._score_table(adapters)
        live_total = int(mask.sum())
        lowest = self._lowest(adapters, scores, mask, live_total - budget)
        importance = self._importance(adapters, scores, mask)
        if step == self.final_step:  # the pattern is fixed: masked slots die
            return RankPlan(step=step, prune=lowest, budget=budget, importance=importance)
        return RankPlan(step=step, zero_lambda=lowest, budget=budget, importance=importance)

    def on_applied(self, changes: Mapping[str, SlotChange]) -> None:
        self.tracker.follow(changes)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(tracker=self.tracker.state_dict(), initial_budget=self.initial_budget)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.tracker.load_state_dict(state["tracker"])
        self.initial_budget = state["initial_budget"]
