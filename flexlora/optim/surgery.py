"""Optimizer-state surgery after a rank change: pure functions on (optimizer, parameter, slot changes).

Per-slot optimizer state follows the slots: a swap made to keep the live slots a contiguous prefix swaps
the slots' moments and step counts too, and every reset slot (pruned, now dead, or newly grown) gets zero
moments and a restarted step count, so its next update is exactly a fresh Adam first step. Nothing else
changes: other slots, other parameters, the param groups and the LR scheduler are left as they are, and
the optimizer object is never rebuilt (docs/architecture.md §2.4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.optim import Optimizer

from flexlora.adapters.layer import SlotLoRALayer
from flexlora.plan import SlotChange


class SurgeryError(RuntimeError):
    pass


def _step_counts(optimizer: Optimizer, state: dict) -> torch.Tensor:
    steps = state.get("step")
    if steps is None or steps.dim() == 0:
        raise SurgeryError(
            f"{type(optimizer).__name__} keeps one step count per tensor, so a revived slot would get a wrongly "
            "bias-corrected update; use flexlora.optim.SlotAdamW (model.optimizer._target_)"
        )
    return steps


def change_slots(optimizer: Optimizer, param: torch.Tensor, dim: int, change: SlotChange) -> None:
    """Make ``param``'s optimizer state follow ``change`` (indices along ``dim``)."""
    state = optimizer.state.get(param)
    if not state or not change:  # the optimizer has not stepped this tensor yet: nothing to move
        return
    if "max_exp_avg_sq" in state:
        raise SurgeryError("amsgrad keeps a running maximum that cannot be reset per slot; disable amsgrad")
    steps = _step_counts(optimizer, state)
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            change.apply_to(state[key], dim)
    change.apply_to(steps, 0)


def reset_slots(optimizer: Optimizer, param: torch.Tensor, dim: int, slots: Sequence[int]) -> None:
    """Zero the moments and restart the step count of ``slots`` (indices along ``dim``) of ``param``."""
    change_slots(optimizer, param, dim, SlotChange(reset=list(slots)))


def reset_layer_slots(optimizer: Optimizer, layer: SlotLoRALayer, slots: Sequence[int]) -> None:
    for param, dim in layer.slot_params():
        reset_slots(optimizer, param, dim, slots)


def apply_surgery(
    optimizer: Optimizer, adapters: Mapping[str, SlotLoRALayer], changes: Mapping[str, SlotChange]
) -> None:
    """Make the optimizer state of every touched matrix follow its SlotChange (from ``apply_plan``)."""
    for name, change in changes.items():
        for param, dim in adapters[name].slot_params():
            change_slots(optimizer, param, dim, change)


def supports_slot_surgery(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` keeps per-slot state that surgery can move: it declares ``slot_surgery = True``
    (SlotAdamW does; an optimizer with one vector of step counts per slot tensor in ``state["step"]`` and moments
    shaped like the parameter can declare it too)."""
    return bool(getattr(optimizer, "slot_surgery", False))
