"""The released FlexLoRA trainer's optimizer dynamics, as an explicit mode (``optimizer_state: released_reset``).

The released code rebuilds the optimizer at every FlexLoRA event and at every AdaLoRA masking step. Its
id-to-index lookup never matches, so every parameter's Adam moments and step count restart at zero (the head's
too), and the LR scheduler keeps stepping the discarded optimizer: from the first event on, training runs at the
constant peak learning rate with weight decay 0. The published FlexLoRA and AdaLoRA numbers were made that way;
this mode reproduces it so a user can measure how much of a result it explains. Plain torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import Optimizer


@torch.no_grad()
def reset_all_state(optimizers: Iterable[Optimizer]) -> None:
    """Zero every parameter's moments and step counts (what a rebuilt optimizer starts with)."""
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
                value = state.get(key)
                if isinstance(value, torch.Tensor):
                    value.zero_()
                elif value is not None:
                    state[key] = 0


def hold_peak_lr(optimizers: Iterable[Optimizer]) -> None:
    """Every param group at its peak learning rate (the scheduler's ``initial_lr``) with weight decay 0.

    Call it after each LR-scheduler step: the scheduler still steps, but what it sets never reaches training,
    as with the released trainer's detached scheduler.
    """
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"])
            group["weight_decay"] = 0.0
