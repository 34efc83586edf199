"""AdamW with one step count per slot for adapter tensors (docs/architecture.md §2.4).

Adam's bias correction uses a step count. torch keeps one per tensor, so a slot revived after a prune
would see ``1 - beta^t`` of an old tensor with fresh, zeroed moments: its first updates would be several
times too large or too small. Here every tensor tagged with a slot axis (see
``flexlora.adapters.layer.slot_axis``) keeps a vector of step counts along that axis; surgery restarts the
counts of touched slots. Only the live prefix of a slot tensor is updated: dead slots get no Adam update
and no weight decay, so they keep exactly the values they had when they died (and the update costs what
the live rank costs, not what the capacity costs). Untagged tensors (the task head) follow torch's AdamW
arithmetic exactly. Every allocator uses this optimizer, LoRA included, so comparisons stay fair.

The update is torch's AdamW arithmetic, op for op: with every live slot at one step count (LoRA always, a
dynamic method until an event restarts some slots) the live prefix of a float32 tensor changes bit for bit as
under ``torch.optim.AdamW(foreach=True)`` (tests/test_optim_speed_equivalence.py checks it against torch).
With counts that differ, each slot gets its own factors and the same rounding. On the CPU a step runs as
multi-tensor ``torch._foreach_*`` calls over all tensors of a param group, the bias corrections are computed
once per distinct step count, and the views of the live prefixes are kept between steps. Tensors on other
devices take a per-tensor path with the same formulas.
"""

from __future__ import annotations

import itertools
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

    slot_surgery = True  # optimizer-state surgery can follow rank changes (flexlora.optim.supports_slot_surgery)

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
        state["exp_avg"] = _moment_zeros(param, dim)
        state["exp_avg_sq"] = _moment_zeros(param, dim)
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
            staged: list[_Entry] = []
            staged_grads: list[torch.Tensor] = []
            dense = True
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
                live_grad = grad if entry.full else grad.narrow(entry.axis.dim, 0, entry.live)
                if entry.staged is not None:
                    staged.append(entry)
                    staged_grads.append(live_grad)
                    live_grad = entry.staged[1]
                dense = dense and entry.dense
                buckets.setdefault(entry.bucket, []).append((views[0], live_grad, views[1], views[2], views[3]))
            if plain:
                _adamw_plain(plain, hyper)
            if buckets:
                if staged:
                    torch._foreach_copy_([e.staged[0] for e in staged], [e.live_param for e in staged])
                    torch._foreach_copy_([e.staged[1] for e in staged], staged_grads)
                _adamw_live_slots(buckets, hyper, dense)
                if staged:
                    torch._foreach_copy_([e.live_param for e in staged], [e.staged[0] for e in staged])
        return loss


def _moment_zeros(param: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Zero moments for ``param``; for a tensor whose slots run along an inner axis (lora_B) and are not all
    live, laid out with the slot axis outermost, so that the live prefix of a moment is one dense block.

    The live prefix of a row-major lora_B is a strided view with rows of ``live`` elements: every elementwise
    op over it runs a short inner loop per row, and more so the larger the capacity. With the moments dense,
    the step copies the parameter's and the gradient's live prefixes into dense buffers of the same layout,
    runs every op there and copies the parameter back (exact copies, the same arithmetic)."""
    if dim is None or dim == 0 or slot_axis(param).live.count == param.shape[dim]:
        return torch.zeros_like(param, memory_format=torch.preserve_format)
    return torch.zeros_like(param.movedim(dim, 0), memory_format=torch.contiguous_format).movedim(0, dim)


def _is_dense(tensor: torch.Tensor) -> bool:
    """Whether the elements fill one block of memory without gaps, in any order of the axes."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride(), strict=True), key=lambda pair: pair[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


class _Entry:
    """What one parameter's update needs besides its gradient, kept between steps: its slot axis and, for a
    slot tensor on the CPU, views of the live prefix of the parameter, its moments and step counts, and
    dense staging buffers where the parameter's live prefix and its moments' are laid out differently.

    It is rebuilt when it is no longer current: the live count changed, the state holds other tensors
    (``load_state_dict``) or the parameter's data moved. Surgery works in place, so the views stay valid."""

    __slots__ = (
        "axis", "bucket", "data", "dense", "exp_avg", "exp_avg_sq", "full", "live", "live_param", "param", "staged",
        "state", "steps", "views",
    )

    def __init__(self, param: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        self.param, self.state, self.data = param, state, param.data_ptr()
        self.exp_avg, self.exp_avg_sq, self.steps = state["exp_avg"], state["exp_avg_sq"], state["step"]
        self.axis = slot_axis(param)
        self.live = -1 if self.axis is None else self.axis.live.count
        self.bucket: tuple[torch.dtype, int, int] | None = None
        self.views: tuple[torch.Tensor, ...] = ()
        self.full = self.axis is not None and self.live == param.shape[self.axis.dim]  # every slot live: no views
        self.staged: tuple[torch.Tensor, torch.Tensor] | None = None
        self.live_param = param
        self.dense = True
        if self.axis is not None and self.live and param.is_cpu:
            dim, live = self.axis.dim, self.live
            self.bucket = (param.dtype, param.dim(), dim)
            self.live_param = param.narrow(dim, 0, live)
            exp_avg, exp_avg_sq = self.exp_avg.narrow(dim, 0, live), self.exp_avg_sq.narrow(dim, 0, live)
            target = self.live_param
            if self.live_param.stride() != exp_avg.stride() and _is_dense(exp_avg):
                self.staged = (torch.empty_like(exp_avg), torch.empty_like(exp_avg))
                target = self.staged[0]
            self.dense = _is_dense(exp_avg_sq)
            self.views = (target, exp_avg, exp_avg_sq, self.steps[:live])

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
    scalars: torch.dtype,
) -> None:
    """Weight decay and both moment updates (the first lines of torch's single-tensor AdamW), for many tensors.

    A Python number is passed to an op as a 0-dim float64 tensor (a "wrapped number"), which a foreach call
    would wrap again for every tensor: the factors are made 0-dim tensors once here (see ``_number``)."""
    lr, beta1, beta2, _, wd = hyper
    if wd != 0:  # multiplying by exactly 1.0 would change no bit
        torch._foreach_mul_(params, _number(1 - lr * wd, scalars))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, _number(beta2, scalars))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)


def _number(value: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Python number as a 0-dim tensor for a foreach op: float64 in general, or the dtype of every tensor the
    op runs on (``_scalar_dtype``). A 0-dim operand never changes the result dtype of a float op and reaches the
    kernel rounded to the tensors' dtype either way, so the arithmetic is that of the Python number; made in
    that dtype, it skips one cast per tensor and op."""
    return torch.tensor(value, dtype=dtype)


def _scalar_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    dtypes = set(dtypes)
    return torch.float32 if dtypes == {torch.float32} else torch.float64


def _adamw_plain(items: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]], hyper: Hyper) -> None:
    """torch.optim.AdamW's single-tensor arithmetic, operation for operation, for untagged tensors."""
    lr, beta1, beta2, eps, _ = hyper
    params, grads = [p for p, _, _ in items], [g for _, g, _ in items]
    steps = [s["step"] for _, _, s in items]
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for _, _, s in items], [s["exp_avg_sq"] for _, _, s in items]
    torch._foreach_add_(steps, 1)
    _moments(params, grads, exp_avgs, exp_avg_sqs, hyper, _scalar_dtype(p.dtype for p in params))
    counts = [t.item() for t in steps]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [(1 - beta2**t) ** 0.5 for t in counts])
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, [-(lr / (1 - beta1**t)) for t in counts])


def _adamw_live_slots(
    buckets: dict[tuple[torch.dtype, int, int], list[LiveViews]], hyper: Hyper, dense: bool
) -> None:
    """AdamW on the live prefixes of slot tensors, with a bias correction per slot.

    The update is torch's AdamW arithmetic (``param.addcdiv_(exp_avg, denom, value=-step_size)``). When every
    live slot has one count (LoRA always; a dynamic method until an event restarts some slots) the factors are
    scalars and the ops are torch's AdamW ops, one for one. Otherwise a bucket (the tensors of one dtype whose
    slots run along the same axis) gets its per-slot factors as one vector split into broadcastable views, and
    the step size is applied to ``exp_avg`` before the division: ``(-s * m) / d`` rounds as torch's kernel does
    with a scalar ``-s``."""
    params, grads, exp_avgs, exp_avg_sqs, steps = (
        list(x) for x in zip(*itertools.chain(*buckets.values()), strict=True)
    )
    scalars = _scalar_dtype(dtype for dtype, _, _ in buckets)
    # an add with one 0-dim tensor reads it back as a Python number and re-wraps it per tensor (a cast each);
    # a list of them reaches the kernels as it is
    torch._foreach_add_(steps, [_number(1.0, torch.float32)] * len(steps))  # exact: integer counts
    _moments(params, grads, exp_avgs, exp_avg_sqs, hyper, scalars)
    counts = torch.cat(steps)
    low, high = torch.aminmax(counts)
    eps = [_number(hyper[3], scalars)] * len(params)
    if low == high and all(dtype in _SCALAR_PATH_DTYPES for dtype, _, _ in buckets):
        size, correction = _bias_factors([low.item()], hyper)[0]
        denoms = _square_roots(exp_avg_sqs, dense)
        torch._foreach_div_(denoms, [_number(correction, scalars)] * len(denoms))
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, size)
        return
    distinct, inverse = torch.unique(counts, return_inverse=True)
    factors = torch.tensor(_bias_factors(distinct.tolist(), hyper), dtype=torch.float64).T  # (2, distinct)
    sizes: list[torch.Tensor] = []
    corrections: list[torch.Tensor] = []
    start = 0
    for (dtype, ndim, dim), bucket in buckets.items():
        lives = [item[4].shape[0] for item in bucket]
        per_slot = factors.to(dtype)[:, inverse[start : start + sum(lives)]]
        start += sum(lives)
        shape = [2] + [1] * ndim
        shape[1 + dim] = -1
        per_slot = per_slot.view(shape)
        sizes += per_slot[0].split(lives, dim)
        corrections += per_slot[1].split(lives, dim)
    denoms = _square_roots(exp_avg_sqs, dense)
    torch._foreach_div_(denoms, corrections)
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avgs, sizes), denoms)


# Dtypes whose kernels divide by a scalar exactly as by a one-element tensor (bf16/fp16 multiply by its reciprocal).
_SCALAR_PATH_DTYPES = (torch.float32, torch.float64)


def _square_roots(exp_avg_sqs: list[torch.Tensor], dense: bool) -> list[torch.Tensor]:
    """``sqrt(exp_avg_sq)`` into new tensors.

    A square root over a strided input with gaps (the live prefix of a row-major lora_B) takes a slow path:
    multiplying by 1.0 (exact) copies into a contiguous tensor, and the square root runs in place there."""
    if dense:
        return torch._foreach_sqrt(exp_avg_sqs)
    roots = torch._foreach_mul(exp_avg_sqs, _number(1.0, exp_avg_sqs[0].dtype))
    torch._foreach_sqrt_(roots)
    return roots


def _bias_factors(counts: Sequence[float], hyper: Hyper) -> list[tuple[float, float]]:
    """For each step count t, torch AdamW's factors in Python floats: the signed step size
    ``-(lr / (1 - beta1^t))`` and ``(1 - beta2^t) ** 0.5``. Kernels cast them to the parameter dtype."""
    lr, beta1, beta2, _, _ = hyper
    return [((lr / (1 - beta1**t)) * -1, (1 - beta2**t) ** 0.5) for t in counts]


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
    factors = torch.tensor(_bias_factors(steps.tolist(), hyper), dtype=torch.float64, device=param.device)
    size, correction = factors.to(param.dtype).T.reshape(2, *shape)
    denom = (exp_avg_sq.sqrt() / correction).add_(eps)
    param.addcdiv_(exp_avg * size, denom)
