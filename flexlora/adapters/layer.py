"""The slot adapter layer: a frozen linear map plus a low-rank update with fixed slot capacity.

Every adapted matrix holds ``max_rank`` slots. A slot ``i`` is the triplet (row ``i`` of ``lora_A``,
entry ``i`` of ``lora_E``, column ``i`` of ``lora_B``); it is live when ``mask[i]`` is true. Shapes never
change during training: pruning and growing only flip mask bits (DESIGN.md 3.1), which keeps the
optimizer, DDP buckets and checkpoints valid. The forward multiplies by the mask, so a dead slot adds
exactly zero to the output and receives exactly zero gradient.

Two forms share the layer:

* ``lora``: ``dW = (alpha / r) B A`` with A Kaiming-uniform and B = 0 (Hu et al., 2021).
* ``svd``:  ``dW = (alpha / r0) P diag(lambda) Q`` with lambda = 0 and P, Q ~ N(0, 0.02^2) (AdaLoRA).
  ``lora_B`` is P, ``lora_E`` is lambda, ``lora_A`` is Q.

The scale ``alpha / r0`` is constant (DESIGN.md 3.2): it does not follow the live rank, so growing a
slot with lambda = 0 leaves the output bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

AdapterForm = Literal["lora", "svd"]
GrowInit = Literal["zero_impact", "orthogonal", "small_value", "all_zero"]

# Parameters carry the dimension that indexes their slots; the slot-aware optimizer and the
# optimizer-state surgery read it from here instead of guessing from names.
SLOT_DIM_ATTR = "_flexlora_slot_dim"


@dataclass(frozen=True)
class GrowSpec:
    """How a newly grown slot is initialised (DESIGN.md 4.3, zero-impact initialisation and ablations)."""

    kind: GrowInit = "zero_impact"
    std: float = 1.0
    value: float = 1e-3  # lambda of a new slot for kind="small_value"

    def __post_init__(self) -> None:
        if self.kind not in ("zero_impact", "orthogonal", "small_value", "all_zero"):
            raise ValueError(
                f"grow_init must be one of zero_impact, orthogonal, small_value, all_zero; got {self.kind!r}"
            )
        if self.std <= 0:
            raise ValueError(f"grow_std must be > 0, got {self.std}")


def base_in_out(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or transformers' ``Conv1D`` (weight stored (in, out))."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf"):
        in_features, out_features = base.weight.shape
        return int(in_features), int(out_features)
    raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and transformers Conv1D are supported")


def is_conv1d(base: nn.Module) -> bool:
    return type(base).__name__ == "Conv1D" and hasattr(base, "nf")


class SlotLoRALayer(nn.Module):
    """Wraps a frozen linear layer with a masked low-rank update of fixed slot capacity."""

    def __init__(
        self,
        base: nn.Module,
        *,
        form: AdapterForm,
        rank: int,
        max_rank: int | None = None,
        alpha: float = 1.0,
        dropout: float = 0.0,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        max_rank = rank if max_rank is None else max_rank
        if form not in ("lora", "svd"):
            raise ValueError(f"adapter form must be 'lora' or 'svd', got {form!r}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if max_rank < rank:
            raise ValueError(
                f"max_rank ({max_rank}) must be >= rank ({rank}); set allocator.max_rank >= allocator.rank"
            )
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
        setattr(self.lora_A, SLOT_DIM_ATTR, 0)
        setattr(self.lora_B, SLOT_DIM_ATTR, 1)
        if self.lora_E is not None:
            setattr(self.lora_E, SLOT_DIM_ATTR, 0)
        mask = torch.zeros(max_rank, dtype=torch.bool, device=weight.device)
        mask[:rank] = True
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
        """Per-slot multiplier (lambda * mask * scale, or mask * scale for LoRA): zero for dead slots."""
        gain = self.mask.to(self.lora_A.dtype) * self.scale
        if self.lora_E is not None:
            gain = gain * self.lora_E
        return gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        hidden = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()
        update = (hidden * self.slot_gain()) @ self.lora_B.t()
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """dW in nn.Linear layout (out, in): what the adapter adds to the frozen weight."""
        return (self.lora_B * self.slot_gain()) @ self.lora_A

    # ------------------------------------------------------------------ slots
    @property
    def live_rank(self) -> int:
        return int(self.mask.sum().item())

    def live_slots(self) -> torch.Tensor:
        return torch.nonzero(self.mask, as_tuple=False).flatten()

    def free_slots(self) -> torch.Tensor:
        return torch.nonzero(~self.mask, as_tuple=False).flatten()

    def live_lambda(self) -> torch.Tensor:
        """lambda of the live slots, in slot order (LoRA form has none: its slots have unit gain)."""
        if self.lora_E is None:
            return torch.ones(self.live_rank, dtype=self.lora_A.dtype, device=self.lora_A.device)
        return self.lora_E.detach()[self.mask]

    def slot_params(self) -> list[tuple[nn.Parameter, int]]:
        """(parameter, slot dimension) for every tensor that holds part of a slot."""
        params = [(self.lora_A, 0), (self.lora_B, 1)]
        if self.lora_E is not None:
            params.insert(1, (self.lora_E, 0))
        return params

    @torch.no_grad()
    def prune(self, slot: int) -> None:
        """Deactivate a live slot; its lambda is zeroed so a later revival starts from zero impact.

        A matrix may end with no live slot (AdaLoRA can give a matrix rank 0); FlexLoRA's allocator
        never asks for that.
        """
        if not bool(self.mask[slot]):
            raise ValueError(f"slot {slot} is not live")
        self.mask[slot] = False
        if self.lora_E is not None:
            self.lora_E[slot] = 0.0

    @torch.no_grad()
    def zero_lambda(self, slots: list[int]) -> None:
        """AdaLoRA's soft mask: lambda = 0, the slot stays live and keeps training."""
        if self.lora_E is None:
            raise ValueError("zero_lambda needs the svd form")
        if slots:
            self.lora_E[torch.as_tensor(slots, dtype=torch.long, device=self.lora_E.device)] = 0.0

    @torch.no_grad()
    def grow(self, spec: GrowSpec, generator: torch.Generator | None) -> int:
        """Activate the lowest free slot, initialised by ``spec``; returns its index.

        Vectors are drawn from ``generator`` (the run's own, never the global RNG), on the CPU in
        float32 for reproducibility across devices, then cast to the parameter's dtype and device.
        """
        free = self.free_slots()
        if free.numel() == 0:
            raise ValueError("no free slot to grow into (live rank == max_rank)")
        slot = int(free[0])
        a_row = torch.randn(self.in_features, generator=generator) * spec.std
        b_col = torch.randn(self.out_features, generator=generator) * spec.std
        value = 0.0
        if spec.kind == "orthogonal":
            a_row = _orthogonalise(a_row, self.lora_A.detach()[self.mask].float().cpu())
            b_col = _orthogonalise(b_col, self.lora_B.detach()[:, self.mask].t().float().cpu())
        elif spec.kind == "all_zero":
            a_row.zero_()
            b_col.zero_()
        elif spec.kind == "small_value":
            value = spec.value
        if self.lora_E is None and spec.kind != "all_zero":
            # LoRA form has no lambda: a new slot is zero-impact only with B's column zero.
            b_col.zero_()
        self.lora_A[slot] = a_row.to(self.lora_A)
        self.lora_B[:, slot] = b_col.to(self.lora_B)
        if self.lora_E is not None:
            self.lora_E[slot] = value
        self.mask[slot] = True
        return slot

    def extra_repr(self) -> str:
        return (
            f"form={self.form}, in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"max_rank={self.max_rank}, live={self.live_rank}, scale={self.scale:g}"
        )


def _orthogonalise(vector: torch.Tensor, basis_rows: torch.Tensor) -> torch.Tensor:
    """Project ``vector`` off the span of ``basis_rows`` and restore its norm (Gram-Schmidt via QR)."""
    if basis_rows.numel() == 0:
        return vector
    norm = vector.norm()
    q, _ = torch.linalg.qr(basis_rows.t(), mode="reduced")
    residual = vector - q @ (q.t() @ vector)
    residual_norm = residual.norm()
    if residual_norm < 1e-12:
        return vector
    return residual * (norm / residual_norm)
