"""Small slot adapters and allocators for the allocator tests."""

from __future__ import annotations

import torch
from torch import nn

from flexlora.adapters import SlotLoRALayer
from flexlora.allocators import FlexLoRAAllocator, build_allocator


def fake_adapters(n: int = 12, rank: int = 4, max_rank: int = 8, form: str = "svd") -> dict[str, SlotLoRALayer]:
    torch.manual_seed(0)
    return {
        f"layer.{i // 6}.m{i % 6}": SlotLoRALayer(nn.Linear(6, 5), form=form, rank=rank, max_rank=max_rank)
        for i in range(n)
    }


def flex(adapters, total=1000, **overrides) -> FlexLoRAAllocator:
    cfg = {"name": "flexlora", "rank": 4, "max_rank": 8, "t_init": 10, "t_final": 10, "delta_t": 2,
           "budget_per_event": 3, **overrides}
    allocator = build_allocator(cfg)
    assert isinstance(allocator, FlexLoRAAllocator)
    allocator.bind(adapters, total)
    return allocator


def randomise_lambda(adapters, generator):
    with torch.no_grad():
        for layer in adapters.values():
            # heavy-tailed, per-matrix different spreads so importances differ
            spread = torch.rand(1, generator=generator) * 3
            layer.lora_E.copy_(torch.randn(layer.max_rank, generator=generator) * torch.exp(
                spread * torch.randn(layer.max_rank, generator=generator)))
