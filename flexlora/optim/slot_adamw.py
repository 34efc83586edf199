"""AdamW with one step count per slot for adapter tensors (docs/architecture.md §2.4).

Adam's bias correction uses a step count. torch keeps one per tensor, so a slot revived after a prune
would see ``1 - beta^t`` of an old tensor with fresh, zeroed moments: its first updates would be several
times too large or too small. Here every tensor tagged with a slot axis (see
``flexlora.adapters.layer.slot_axis``) keeps a vector of step counts along that axis; surgery restarts the
counts of touched slots. Only the live prefix of a slot tensor is updated: dead slots get no Adam update
and no weight decay, so they keep exactly the values they had when they died (and the update costs what
the live rank costs, not what the capacity costs). Untagged tensors (the task head) follow torch's AdamW
arithmetic exactly. Every allocator uses this optimizer, LoRA included, so comparisons stay fair.

On the CPU a step runs as multi-tensor ``torch._foreach_*`` calls over all tensors of a param group: there
they are a C++ loop over the very kernels the per-tensor arithmetic calls, in the same order, so the results
are bit-identical to it (tests/test_optim_speed_equivalence.py holds a copy of that arithmetic as the
oracle). The bias corrections of all live slots are computed once per distinct step count instead of once
per tensor (one value for all when every live slot has the same count), and the views of the live prefixes
are kept between steps. Tensors on other devices keep the per-tensor arithmetic: there the foreach kernels
are other kernels (e.g. CUDA divides by a scalar as a multiplication by its reciprocal, its foreach
division does not), so a multi-tensor step would not round the same.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from flexlora.adapters.layer import SlotAxis, slot_axis

Hyper = tuple[float, float, float, float, float]  # lr, beta1, beta2, eps, weight decay


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
        states = self.state
        entries: dict[int, _Entry] = self.__dict__.setdefault("_entries", {})
        for group in self.param_groups:
            hyper: Hyper = (group["lr"], *group["betas"], group["eps"], group["weight_decay"])
            plain: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
            buckets: dict[tuple[torch.dtype, int, int], list[LiveViews]] = {}
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("SlotAdamW does not support sparse gradients")
                state = states[param]
                if not state:
                    state = self._init_state(param)
                entry = entries.get(id(param))
                if entry is None or not entry.current(param, state):
                    entry = entries[id(param)] = _Entry(param, state)
                if entry.bucket is None:
                    if entry.axis is not None and entry.live == 0:
                        continue
                    if param.is_cpu:
                        plain.append((param, grad, state))
                    else:
                        _step_one(param, grad, state, entry.axis, hyper)
                    continue
                views = entry.views
                buckets.setdefault(entry.bucket, []).append(
                    (views[0], grad.narrow(entry.axis.dim, 0, entry.live), views[1], views[2], views[3])
                )
            if plain:
                _adamw_plain(plain, hyper)
            if buckets:
                _adamw_live_slots(buckets, hyper)
        return loss


class _Entry:
    """What one parameter's update needs besides its gradient, kept between steps: its slot axis and, for a
    slot tensor on the CPU, views of the live prefix of the parameter, its moments and step counts.

    It is rebuilt when it is no longer current: the live count changed, the state holds other tensors
    (``load_state_dict``) or the parameter's data moved. Surgery works in place, so the views stay valid."""

    __slots__ = ("axis", "bucket", "data", "exp_avg", "exp_avg_sq", "live", "param", "state", "steps", "views")

    def __init__(self, param: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        self.param, self.state, self.data = param, state, param.data_ptr()
        self.exp_avg, self.exp_avg_sq, self.steps = state["exp_avg"], state["exp_avg_sq"], state["step"]
        self.axis = slot_axis(param)
        self.live = -1 if self.axis is None else self.axis.live.count
        self.bucket: tuple[torch.dtype, int, int] | None = None
        self.views: tuple[torch.Tensor, ...] = ()
        if self.axis is not None and self.live and param.is_cpu:
            dim, live = self.axis.dim, self.live
            self.bucket = (param.dtype, param.dim(), dim)
            self.views = (
                param.narrow(dim, 0, live),
                self.exp_avg.narrow(dim, 0, live),
                self.exp_avg_sq.narrow(dim, 0, live),
                self.steps[:live],
            )

    def current(self, param: torch.Tensor, state: dict[str, torch.Tensor]) -> bool:
        return (
            self.param is param
            and self.state is state
            and (self.axis is None or self.axis.live.count == self.live)
            and self.exp_avg is state["exp_avg"]
            and self.exp_avg_sq is state["exp_avg_sq"]
            and self.steps is state["step"]
            and self.data == param.data_ptr()
        )


LiveViews = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # param, grad, m, v, steps


def _moments(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    hyper: Hyper,
) -> None:
    """Weight decay and both moment updates (the first lines of torch's single-tensor AdamW), for many tensors.

    A Python number is passed to an op as a 0-dim float64 tensor (a "wrapped number"), which a foreach call
    would wrap again for every tensor: the factors are wrapped once here, as plain 0-dim float64 tensors. Both
    take part in type promotion alike (a 0-dim operand of the same category never changes the result dtype)
    and give the kernels the same value, so the arithmetic is that of the Python numbers."""
    lr, beta1, beta2, _, wd = hyper
    if wd != 0:  # multiplying by exactly 1.0 would change no bit
        torch._foreach_mul_(params, _number(1 - lr * wd))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, _number(beta2))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)


def _number(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def _adamw_plain(items: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]], hyper: Hyper) -> None:
    """torch.optim.AdamW's single-tensor arithmetic, operation for operation, for untagged tensors."""
    lr, beta1, beta2, eps, _ = hyper
    params, grads = [p for p, _, _ in items], [g for _, g, _ in items]
    steps = [s["step"] for _, _, s in items]
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for _, _, s in items], [s["exp_avg_sq"] for _, _, s in items]
    torch._foreach_add_(steps, 1)
    _moments(params, grads, exp_avgs, exp_avg_sqs, hyper)
    counts = [t.item() for t in steps]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [(1 - beta2**t) ** 0.5 for t in counts])
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, [-(lr / (1 - beta1**t)) for t in counts])


def _adamw_live_slots(buckets: dict[tuple[torch.dtype, int, int], list[LiveViews]], hyper: Hyper) -> None:
    """AdamW on the live prefixes of slot tensors, with a bias correction per slot.

    A bucket holds the tensors of one dtype whose slots run along the same axis: its per-slot factors are one
    vector, split into broadcastable views in one call."""
    params, grads, exp_avgs, exp_avg_sqs, steps = (
        list(x) for x in zip(*itertools.chain(*buckets.values()), strict=True)
    )
    torch._foreach_add_(steps, _number(1.0))  # exact: integer counts
    _moments(params, grads, exp_avgs, exp_avg_sqs, hyper)
    counts = torch.cat(steps)
    low, high = torch.aminmax(counts)
    uniform = bool(low == high)  # every live slot has one count (LoRA always, FlexLoRA between events)
    distinct, inverse = (low.view(1), None) if uniform else torch.unique(counts, return_inverse=True)
    factors = _bias_factors(distinct.tolist(), hyper)  # (2, distinct) float64: step size, sqrt(1 - beta2^t)
    denoms: list[torch.Tensor] = []
    sizes: list[torch.Tensor] = []
    start = 0
    for (dtype, ndim, dim), bucket in buckets.items():
        if inverse is None:
            size, correction = factors.to(dtype)[:, 0]
            bucket_sizes, corrections = [size] * len(bucket), [correction] * len(bucket)
        else:
            lives = [item[4].shape[0] for item in bucket]
            per_slot = factors.to(dtype)[:, inverse[start : start + sum(lives)]]
            start += sum(lives)
            shape = [2] + [1] * ndim
            shape[1 + dim] = -1
            per_slot = per_slot.view(shape)
            bucket_sizes, corrections = per_slot[0].split(lives, dim), per_slot[1].split(lives, dim)
        denoms += _denominators([item[3] for item in bucket], corrections, hyper[3])
        sizes += bucket_sizes
    updates = torch._foreach_div(exp_avgs, denoms)
    torch._foreach_mul_(updates, sizes)
    torch._foreach_sub_(params, updates)


def _denominators(
    exp_avg_sqs: list[torch.Tensor], corrections: Sequence[torch.Tensor], eps: float
) -> list[torch.Tensor]:
    """``sqrt(exp_avg_sq) / correction + eps``, in place on the square roots as the per-tensor arithmetic.

    A square root over a strided input (the live prefix of lora_B) takes a slow path: multiplying by 1.0
    (exact) copies into a contiguous tensor, and the square root runs in place there."""
    if all(t.is_contiguous() for t in exp_avg_sqs):
        roots = torch._foreach_sqrt(exp_avg_sqs)
    else:
        roots = torch._foreach_mul(exp_avg_sqs, _number(1.0))
        torch._foreach_sqrt_(roots)
    torch._foreach_div_(roots, list(corrections))
    torch._foreach_add_(roots, _number(eps))
    return roots


def _bias_factors(counts: Sequence[float], hyper: Hyper) -> torch.Tensor:
    """For each step count t: ``lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)`` in float64.

    The per-tensor arithmetic computed them on float64 tensors: ``lr / x`` on a tensor is
    ``x.reciprocal() * lr``, and a short vector goes through the scalar libm ``pow`` that Python's ``**`` calls
    too; the results are cast to the parameter dtype by the caller, as before."""
    lr, beta1, beta2, _, _ = hyper
    sizes = [(1.0 / (1 - beta1**t)) * lr for t in counts]
    corrections = [math.sqrt(1 - beta2**t) for t in counts]  # IEEE square root: correctly rounded everywhere
    return torch.tensor([sizes, corrections], dtype=torch.float64)


def _step_one(
    param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], axis: SlotAxis | None, hyper: Hyper
) -> None:
    """The per-tensor arithmetic (used off the CPU)."""
    lr, beta1, beta2, eps, wd = hyper
    steps, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
    if axis is None:
        steps += 1
        param.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        t = steps.item()
        step_size = lr / (1 - beta1**t)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        return
    dim, live = axis.dim, axis.live.count
    if live == 0:
        return
    param, grad = param.narrow(dim, 0, live), grad.narrow(dim, 0, live)
    exp_avg, exp_avg_sq, steps = exp_avg.narrow(dim, 0, live), exp_avg_sq.narrow(dim, 0, live), steps[:live]
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
