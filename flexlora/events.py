"""One allocation event, applied: the plan to the adapters, then the optimizer state and the allocator's trackers.

The Callback and the benchmarks both call :func:`apply_event`, so what is measured is what trains.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import torch
from torch.optim import Optimizer

from flexlora.adapters import SlotLoRALayer, apply_plan
from flexlora.faults import fault_point
from flexlora.optim import apply_surgery
from flexlora.plan import RankPlan, SlotChange


class FollowsSlots(Protocol):
    def on_applied(self, changes: Mapping[str, SlotChange]) -> None: ...


def apply_event(
    adapters: Mapping[str, SlotLoRALayer],
    plan: RankPlan,
    optimizers: Iterable[Optimizer],
    generator: torch.Generator | None,
    allocator: FollowsSlots | None = None,
) -> dict[str, SlotChange]:
    """Apply ``plan`` (masks, swaps, new vectors), then surgery on every optimizer, then let the allocator's
    per-slot state follow; returns the changes per matrix."""
    changes = apply_plan(adapters, plan, generator)
    fault_point("event")  # the most fragile moment: masks changed, optimizer state not yet
    for optimizer in optimizers:
        apply_surgery(optimizer, adapters, changes)
    if allocator is not None:
        allocator.on_applied(changes)
    return changes
