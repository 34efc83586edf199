"""Apply an allocator's RankPlan to the adapters (allocators decide, adapters apply)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from flexlora.adapters.layer import SlotLoRALayer
from flexlora.plan import RankPlan, SlotChange


def apply_plan(
    adapters: Mapping[str, SlotLoRALayer], plan: RankPlan, generator: torch.Generator | None
) -> dict[str, SlotChange]:
    """Prune, soft-mask and grow as planned; returns what changed in each touched matrix.

    Prunes run from the highest slot index down, so every planned index still names the slot the allocator
    meant when its turn comes (a prune only moves slots above it). Soft masking (lambda = 0 on a live slot)
    is not a rank change and is not reported: it must not touch optimizer state (docs/architecture.md §3.1). Matrices
    are visited in adapter order so the draws from ``generator`` are the same on every process.
    """
    unknown = (set(plan.prune) | set(plan.grow) | set(plan.zero_lambda)) - set(adapters)
    if any(plan.grow.values()) and plan.grow_spec is None:
        raise ValueError("a plan that grows slots needs a grow_spec (how new slots are initialised)")
    if unknown:
        raise KeyError(f"plan names matrices the model does not have: {sorted(unknown)[:5]}")
    changes: dict[str, SlotChange] = {}
    for name, layer in adapters.items():
        change = SlotChange()
        if plan.zero_lambda.get(name):
            layer.zero_lambda(plan.zero_lambda[name])
        for slot in sorted(plan.prune.get(name, []), reverse=True):
            i, last = layer.prune(slot)
            if i != last:
                change.swaps.append((i, last))
            change.reset.append(last)
        for _ in range(plan.grow.get(name, 0)):
            change.reset.append(layer.grow(plan.grow_spec, generator))
        if change:
            changes[name] = change
    return changes
