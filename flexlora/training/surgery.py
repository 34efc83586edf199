"""Optimizer-state surgery after a rank change: pure functions on (optimizer, parameter, slot indices).

For every touched slot (its row of A, its entry of lambda, its column of B) the Adam moments are zeroed
and the slot's step count restarts, so its next update is exactly a fresh Adam first step. Nothing else
changes: other slots, other parameters, the param groups and the LR scheduler are left as they are,
and the optimizer object is never rebuilt (DESIGN.md 3.4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.optim import Optimizer

from flexlora.adapters.layer import SlotLoRALayer


class SurgeryError(RuntimeError):
    pass


def reset_slots(optimizer: Optimizer, param: torch.Tensor, dim: int, slots: Sequence[int]) -> None:
    """Zero the moments and restart the step count of ``slots`` (indices along ``dim``) of ``param``."""
    if not slots:
        return
    state = optimizer.state.get(param)
    if not state:  # the optimizer has not stepped this tensor yet: nothing to reset
        return
    index = torch.as_tensor(list(slots), dtype=torch.long, device=param.device)
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].index_fill_(dim, index, 0.0)
    if "max_exp_avg_sq" in state:
        raise SurgeryError("amsgrad keeps a running maximum that cannot be reset per slot; disable amsgrad")
    steps = state.get("step")
    if steps is None or steps.dim() == 0:
        raise SurgeryError(
            f"{type(optimizer).__name__} keeps one step count per tensor, so a revived slot would get a wrongly "
            "bias-corrected update; use flexlora.training.optim.SlotAdamW (model.optimizer._target_)"
        )
    steps.index_fill_(0, index.to(steps.device), 0.0)


def reset_layer_slots(optimizer: Optimizer, layer: SlotLoRALayer, slots: Sequence[int]) -> None:
    for param, dim in layer.slot_params():
        reset_slots(optimizer, param, dim, slots)


def apply_surgery(
    optimizer: Optimizer, adapters: Mapping[str, SlotLoRALayer], touched: Mapping[str, list[int]]
) -> None:
    """Reset the optimizer state of every touched slot (the return value of ``apply_plan``)."""
    for name, slots in touched.items():
        reset_layer_slots(optimizer, adapters[name], slots)


def supports_slot_surgery(optimizer: Optimizer) -> bool:
    from flexlora.training.optim import SlotAdamW

    return isinstance(optimizer, SlotAdamW)
