"""AdamW with one step count per slot for adapter tensors (DESIGN.md 3.4).

Adam's bias correction uses a step count. torch keeps one per tensor, so a slot revived after a prune
would see ``1 - beta^t`` of an old tensor with fresh, zeroed moments: its first updates would be several
times too large or too small. Here every tensor tagged with a slot axis (see
``flexlora.adapters.layer.slot_axis``) keeps a vector of step counts along that axis; surgery restarts the
counts of touched slots. Only the live prefix of a slot tensor is updated: dead slots get no Adam update
and no weight decay, so they keep exactly the values they had when they died (and the update costs what
the live rank costs, not what the capacity costs). Untagged tensors (the task head) follow torch's AdamW
arithmetic exactly. Every allocator uses this optimizer, LoRA included, so comparisons stay fair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from flexlora.adapters.layer import slot_axis


def slot_dim(param: torch.Tensor) -> int | None:
    axis = slot_axis(param)
    return axis.dim if axis is not None else None


class SlotAdamW(Optimizer):
    """Decoupled weight decay Adam (Loshchilov & Hutter) with per-slot step counts for adapter tensors."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr}, eps={eps} or weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _init_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[param]
        dim = slot_dim(param)
        steps = torch.zeros(param.shape[dim], dtype=torch.float32) if dim is not None else torch.tensor(0.0)
        state["step"] = steps
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("SlotAdamW does not support sparse gradients")
                state = self.state[param] if self.state[param] else self._init_state(param)
                axis = slot_axis(param)
                if axis is None:
                    _adamw_tensor(param, grad, state, lr, beta1, beta2, eps, wd)
                else:
                    _adamw_slots(param, grad, state, axis.dim, axis.live.count, lr, beta1, beta2, eps, wd)
        return loss


def _adamw_tensor(
    param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
    lr: float, beta1: float, beta2: float, eps: float, wd: float,
) -> None:
    """torch.optim.AdamW's single-tensor arithmetic, operation for operation."""
    steps, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
    steps += 1
    param.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    t = steps.item()
    step_size = lr / (1 - beta1**t)
    bias_correction2_sqrt = (1 - beta2**t) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _adamw_slots(
    param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], dim: int, live: int,
    lr: float, beta1: float, beta2: float, eps: float, wd: float,
) -> None:
    """AdamW on the live prefix of a slot tensor, with a bias correction per slot."""
    if live == 0:
        return
    param = param.narrow(dim, 0, live)
    grad = grad.narrow(dim, 0, live)
    exp_avg = state["exp_avg"].narrow(dim, 0, live)
    exp_avg_sq = state["exp_avg_sq"].narrow(dim, 0, live)
    steps = state["step"][:live]
    steps += 1
    param.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    shape = [1] * param.dim()
    shape[dim] = -1
    t = steps.to(device=param.device, dtype=torch.float64)
    step_size = (lr / (1 - beta1**t)).to(param.dtype).view(shape)
    bias_correction2_sqrt = (1 - beta2**t).sqrt().to(param.dtype).view(shape)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.sub_(exp_avg / denom * step_size)
