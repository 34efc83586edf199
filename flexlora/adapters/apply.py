"""Apply an allocator's RankPlan to the adapters (allocators decide, adapters apply)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from flexlora.adapters.layer import SlotLoRALayer

if TYPE_CHECKING:
    from flexlora.allocators.plan import RankPlan


def apply_plan(
    adapters: Mapping[str, SlotLoRALayer], plan: RankPlan, generator: torch.Generator | None
) -> dict[str, list[int]]:
    """Prune, soft-mask and grow as planned; returns the slots whose rank status changed, per matrix.

    Soft masking (lambda = 0 on a live slot) is not a rank change and is not reported: it must not
    touch optimizer state (DESIGN.md 4.2). Matrices are visited in adapter order so the draws from
    ``generator`` are the same on every process.
    """
    unknown = (set(plan.prune) | set(plan.grow) | set(plan.zero_lambda)) - set(adapters)
    if unknown:
        raise KeyError(f"plan names matrices the model does not have: {sorted(unknown)[:5]}")
    touched: dict[str, list[int]] = {}
    for name, layer in adapters.items():
        slots: list[int] = []
        for slot in plan.prune.get(name, []):
            layer.prune(slot)
            slots.append(slot)
        if plan.zero_lambda.get(name):
            layer.zero_lambda(plan.zero_lambda[name])
        for _ in range(plan.grow.get(name, 0)):
            slots.append(layer.grow(plan.grow_spec, generator))
        if slots:
            touched[name] = slots
    return touched
