"""The slot adapter layer: a frozen linear map plus a low-rank update with fixed slot capacity.

Every adapted matrix holds ``max_rank`` slots. A slot ``i`` is the triplet (row ``i`` of ``lora_A``,
entry ``i`` of ``lora_E``, column ``i`` of ``lora_B``). Shapes never change during training (docs/architecture.md
§2.1), which keeps the optimizer, DDP buckets and checkpoints valid. The live slots are always the
contiguous prefix ``0 .. r-1``: pruning a slot swaps it with the last live one first, growing activates
slot ``r``. The forward runs on views of that prefix, so slot capacity costs memory, not compute, and a
dead slot adds exactly zero to the output and receives exactly zero gradient.

Two forms share the layer:

* ``lora``: ``dW = (alpha / r) B A`` with A Kaiming-uniform and B = 0 (Hu et al., 2021).
* ``svd``:  ``dW = (alpha / r0) P diag(lambda) Q`` with lambda = 0 and P, Q ~ N(0, 0.02^2) (AdaLoRA).
  ``lora_B`` is P, ``lora_E`` is lambda, ``lora_A`` is Q.

The scale ``alpha / r0`` is constant (docs/architecture.md §2.2): it does not follow the live rank, so growing a
slot with lambda = 0 leaves the output bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from flexlora.plan import GrowSpec

AdapterForm = Literal["lora", "svd"]

# Parameters carry the dimension that indexes their slots and the layer's live-slot count; the slot-aware
# optimizer and the optimizer-state surgery read them from here instead of guessing from names.
SLOT_AXIS_ATTR = "_flexlora_slot_axis"


@dataclass
class LiveSlots:
    """The live rank of one layer, shared (by reference) between the layer and its slot parameters."""

    count: int


@dataclass(frozen=True)
class SlotAxis:
    dim: int
    live: LiveSlots


def slot_axis(param: torch.Tensor) -> SlotAxis | None:
    """How ``param`` is indexed by slots (None for tensors that are not part of a slot adapter)."""
    return getattr(param, SLOT_AXIS_ATTR, None)


def base_in_out(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or transformers' ``Conv1D`` (weight stored (in, out))."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, Conv1D):
        in_features, out_features = base.weight.shape
        return int(in_features), int(out_features)
    raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and transformers Conv1D are supported")


def is_conv1d(base: nn.Module) -> bool:
    return isinstance(base, Conv1D)


class SlotLoRALayer(nn.Module):
    """Wraps a frozen linear layer with a low-rank update of fixed slot capacity and a live prefix."""

    def __init__(
        self,
        base: nn.Module,
        *,
        form: AdapterForm,
        rank: int,
        max_rank: int | None = None,
        init_rank: int | None = None,
        alpha: float = 1.0,
        dropout: float = 0.0,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        """``rank`` is r0 (it sets the constant scale alpha / r0); ``init_rank`` the live slots at the start
        (default r0; budget-matched direction ablations start above or below it); ``max_rank`` the capacity."""
        super().__init__()
        init_rank = rank if init_rank is None else init_rank
        max_rank = max(rank, init_rank) if max_rank is None else max_rank
        assert form in ("lora", "svd"), form
        assert rank >= 1 and 0 <= init_rank <= max_rank and rank <= max_rank, (rank, init_rank, max_rank)
        self.base = base
        self.form: AdapterForm = form
        self.rank = rank
        self.max_rank = max_rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.fan_in_fan_out = is_conv1d(base)
        self.in_features, self.out_features = base_in_out(base)
        weight = base.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(max_rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, max_rank, **factory))
        self.lora_E = nn.Parameter(torch.zeros(max_rank, **factory)) if form == "svd" else None
        self.live = LiveSlots(init_rank)
        for param, dim in self.slot_params():
            setattr(param, SLOT_AXIS_ATTR, SlotAxis(dim, self.live))
        mask = torch.zeros(max_rank, dtype=torch.bool, device=weight.device)
        mask[:init_rank] = True
        self.register_buffer("mask", mask, persistent=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter(init_std=init_std, generator=generator)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_adapter(self, init_std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Initialise all slots in the form's convention (the update is exactly zero afterwards)."""
        if self.form == "lora":
            # Same as nn.Linear's default / peft LoRA: Kaiming-uniform with a = sqrt(5) on A, B = 0.
            bound = 1.0 / math.sqrt(self.in_features)
            self.lora_A.copy_(torch.empty(self.lora_A.shape).uniform_(-bound, bound, generator=generator))
            self.lora_B.zero_()
        else:
            self.lora_A.copy_(torch.empty(self.lora_A.shape).normal_(0.0, init_std, generator=generator))
            self.lora_B.copy_(torch.empty(self.lora_B.shape).normal_(0.0, init_std, generator=generator))
            assert self.lora_E is not None
            self.lora_E.zero_()

    # ------------------------------------------------------------------ forward
    def slot_gain(self) -> torch.Tensor:
        """Per-slot multiplier over the whole capacity (lambda * scale, or scale for LoRA); zero for dead slots."""
        gain = self.mask.to(self.lora_A.dtype) * self.scale
        if self.lora_E is not None:
            gain = gain * self.lora_E
        return gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        r = self.live.count  # a Python int: no device sync; r = 0 still keeps A and B in the graph (DDP)
        hidden = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A[:r].t()
        hidden = hidden * (self.lora_E[:r] * self.scale) if self.lora_E is not None else hidden * self.scale
        update = hidden @ self.lora_B[:, :r].t()
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """dW in nn.Linear layout (out, in): what the adapter adds to the frozen weight."""
        r = self.live.count
        return (self.lora_B[:, :r] * self.slot_gain()[:r]) @ self.lora_A[:r]

    # ------------------------------------------------------------------ slots
    @property
    def live_rank(self) -> int:
        return self.live.count

    def live_lambda(self) -> torch.Tensor:
        """lambda of the live slots, in slot order (LoRA form has none: its slots have unit gain)."""
        if self.lora_E is None:
            return torch.ones(self.live.count, dtype=self.lora_A.dtype, device=self.lora_A.device)
        return self.lora_E.detach()[: self.live.count]

    def slot_params(self) -> list[tuple[nn.Parameter, int]]:
        """(parameter, slot dimension) for every tensor that holds part of a slot."""
        params = [(self.lora_A, 0), (self.lora_B, 1)]
        if self.lora_E is not None:
            params.insert(1, (self.lora_E, 0))
        return params

    @torch.no_grad()
    def swap(self, i: int, j: int) -> None:
        """Exchange slots i and j (vectors and lambda); callers move per-slot state the same way."""
        if i == j:
            return
        for param, dim in self.slot_params():
            index = torch.tensor([i, j], device=param.device)
            param.index_copy_(dim, index, param.index_select(dim, index.flip(0)))

    @torch.no_grad()
    def prune(self, slot: int) -> tuple[int, int]:
        """Deactivate a live slot: swap it with the last live one, then shrink the prefix.

        Returns ``(slot, last)``: the swap made (a no-op when equal) and ``last`` is the dead slot's index
        now. Its lambda is zeroed so a later revival starts from zero impact. A matrix may end with no live
        slot (AdaLoRA can give a matrix rank 0); FlexLoRA's allocator never asks for that.
        """
        last = self.live.count - 1
        if not 0 <= slot <= last:
            raise ValueError(f"slot {slot} is not live (live slots are 0..{last})")
        self.swap(slot, last)
        self.mask[last] = False
        if self.lora_E is not None:
            self.lora_E[last] = 0.0
        self.live.count = last
        return slot, last

    @torch.no_grad()
    def zero_lambda(self, slots: list[int]) -> None:
        """AdaLoRA's soft mask: lambda = 0, the slot stays live and keeps training."""
        assert self.lora_E is not None, "zero_lambda needs the svd form"
        if slots:
            self.lora_E[torch.as_tensor(slots, dtype=torch.long, device=self.lora_E.device)] = 0.0

    @torch.no_grad()
    def grow(self, spec: GrowSpec, generator: torch.Generator | None) -> int:
        """Activate the first free slot, initialised by ``spec``; returns its index.

        Vectors are drawn from ``generator`` (the run's own, never the global RNG), on the CPU in float32
        for reproducibility across devices, then cast to the parameter's dtype and device.

        * ``zero_impact``: P column and Q row ~ N(0, std^2), lambda = 0 (the output is unchanged); with
          ``std="auto"`` each vector's std is 1 / sqrt(its length) (unit expected norm at any width).
        * ``orthogonal``: the same draws, Gram-Schmidt-projected off the live Q rows / P columns and then
          rescaled to the *median norm of the live rows / columns* (a typical live slot), lambda = 0.
          With no live slot the random norm is kept.
        * ``small_value``: the same draws; lambda is set so that the new direction's effective singular
          value ``(alpha / r0) |lambda| |p| |q|`` equals ``spec.value``.
        * ``all_zero``: vectors and lambda zero (a stationary point: it never trains).
        """
        r = self.live.count
        if r >= self.max_rank:
            raise ValueError("no free slot to grow into (live rank == max_rank)")
        a_row = torch.randn(self.in_features, generator=generator) * spec.std_for(self.in_features)
        b_col = torch.randn(self.out_features, generator=generator) * spec.std_for(self.out_features)
        value = 0.0
        if spec.kind == "orthogonal" and r > 0:
            live_a = self.lora_A.detach()[:r].float().cpu()
            live_b = self.lora_B.detach()[:, :r].t().float().cpu()
            a_row = _orthogonalise(a_row, live_a, float(live_a.norm(dim=1).median()))
            b_col = _orthogonalise(b_col, live_b, float(live_b.norm(dim=1).median()))
        elif spec.kind == "all_zero":
            a_row.zero_()
            b_col.zero_()
        elif spec.kind == "small_value":
            value = spec.value / (self.scale * float(a_row.norm()) * float(b_col.norm()))
        if self.lora_E is None and spec.kind != "all_zero":
            # LoRA form has no lambda: a new slot is zero-impact only with B's column zero.
            b_col.zero_()
        self.lora_A[r] = a_row.to(self.lora_A)
        self.lora_B[:, r] = b_col.to(self.lora_B)
        if self.lora_E is not None:
            self.lora_E[r] = value
        self.mask[r] = True
        self.live.count = r + 1
        return r

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """After loading, re-derive the live count from the mask (and bring a non-prefix mask, as written by
        older versions, into prefix form by moving the live slots to the front in order)."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        live = torch.nonzero(self.mask, as_tuple=False).flatten().tolist()
        if live != list(range(len(live))):
            with torch.no_grad():
                order = live + [i for i in range(self.max_rank) if i not in live]
                for param, dim in self.slot_params():
                    index = torch.tensor(order, device=param.device)
                    param.copy_(param.index_select(dim, index))
                self.mask.copy_(torch.arange(self.max_rank, device=self.mask.device) < len(live))
        self.live.count = len(live)

    def extra_repr(self) -> str:
        return (
            f"form={self.form}, in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"max_rank={self.max_rank}, live={self.live_rank}, scale={self.scale:g}"
        )


def _orthogonalise(vector: torch.Tensor, basis_rows: torch.Tensor, norm: float) -> torch.Tensor:
    """Project ``vector`` off the span of ``basis_rows`` (Gram-Schmidt via QR), then scale it to ``norm``.

    Degenerate cases keep what can be kept: all-zero live vectors (no typical norm) leave the random draw as
    it is; live rows that span the whole space (nothing orthogonal is left) give the draw rescaled to ``norm``.
    """
    if norm <= 0:
        return vector
    q, _ = torch.linalg.qr(basis_rows.t(), mode="reduced")
    residual = vector - q @ (q.t() @ vector)
    residual_norm = float(residual.norm())
    if residual_norm < 1e-12:
        return vector * (norm / max(float(vector.norm()), 1e-12))
    return residual * (norm / residual_norm)
