"""Slot adapters outside a model: shape tables, shape-only frozen bases, and snapshots that undo an event.

The allocator benchmarks never run a frozen base, so they get a stand-in that only carries its shape (an
8B model's bases would be 16 GB of memory nobody reads). A :class:`SlotSnapshot` deep-copies what an event
changes (slot tensors, masks, their optimizer state) so that a timed event can be put back, untimed, and
every timed call is the same event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.optim import Optimizer

from flexlora.adapters import SlotLoRALayer
from flexlora.plan import RankPlan

# (module path inside one transformer layer, in_features, out_features)
DEBERTA_V3_BASE = (("attention.self.query_proj", 768, 768), ("attention.self.key_proj", 768, 768),
                   ("attention.self.value_proj", 768, 768), ("attention.output.dense", 768, 768),
                   ("intermediate.dense", 768, 3072), ("output.dense", 3072, 768))
DEBERTA_V3_BASE_LAYERS = 12
# Meta-Llama-3-8B, the matrices DoRA and FlexLoRA adapt: q, k, v (grouped-query: 8 KV heads) and the MLP's up, down
LLAMA3_8B = (("self_attn.q_proj", 4096, 4096), ("self_attn.k_proj", 4096, 1024), ("self_attn.v_proj", 4096, 1024),
             ("mlp.up_proj", 4096, 14336), ("mlp.down_proj", 14336, 4096))
LLAMA3_8B_LAYERS = 32


def layer_shapes(per_layer: Iterable[tuple[str, int, int]], layers: int) -> dict[str, tuple[int, int]]:
    """Adapter name -> (in_features, out_features) for ``layers`` identical transformer layers."""
    return {f"{i}.{path}": (d_in, d_out) for i in range(layers) for path, d_in, d_out in per_layer}


class ShapeOnlyLinear(nn.Linear):
    """An ``nn.Linear`` that reports its shape but holds an empty weight: a frozen base that is never run."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(0, 0, bias=False, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features

    def reset_parameters(self) -> None:  # an empty weight has nothing to initialise
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a shape-only base is never run")


class ZeroBase(nn.Module):
    """Stands in for a frozen linear layer at (almost) no cost, so that only the adapter path is timed."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def synthetic_adapters(shapes: Mapping[str, tuple[int, int]], *, rank: int, max_rank: int, seed: int,
                       dtype: torch.dtype = torch.float32, grad_scale: float = 1e-3) -> dict[str, SlotLoRALayer]:
    """SVD-form adapters with trained-looking, distinct lambdas on the live slots and random gradients."""
    generator = torch.Generator().manual_seed(seed)
    adapters: dict[str, SlotLoRALayer] = {}
    for name, (d_in, d_out) in shapes.items():
        layer = SlotLoRALayer(ShapeOnlyLinear(d_in, d_out, dtype), form="svd", rank=rank, max_rank=max_rank,
                              generator=generator)
        with torch.no_grad():
            assert layer.lora_E is not None
            layer.lora_E.copy_(torch.randn(max_rank, generator=generator).to(dtype) * layer.mask)
        for param, _ in layer.slot_params():
            param.grad = (torch.randn(param.shape, generator=generator) * grad_scale).to(dtype)
        adapters[name] = layer
    return adapters


def zero_base_copy(layer: SlotLoRALayer) -> SlotLoRALayer:
    """The same adapter (slots, mask, live rank) over a zero-cost base."""
    copy = SlotLoRALayer(ShapeOnlyLinear(layer.in_features, layer.out_features, layer.lora_A.dtype), form=layer.form,
                         rank=layer.rank, max_rank=layer.max_rank, alpha=layer.alpha)
    copy.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("base.")}, strict=False)
    copy.base = ZeroBase(layer.out_features)
    return copy


class SlotSnapshot:
    """Deep copies of the adapters' slots, masks and optimizer state; ``restore`` puts back what events touched.

    Loading a layer's state dict re-derives its live count from the mask; optimizer state is copied into
    the existing tensors, so the optimizer never sees new objects.
    """

    def __init__(self, adapters: Mapping[str, SlotLoRALayer], optimizers: Iterable[Optimizer]) -> None:
        self.adapters = adapters
        self.optimizers = list(optimizers)
        self.layers = {name: {k: v.detach().clone() for k, v in layer.state_dict().items() if not k.startswith("base.")}
                       for name, layer in adapters.items()}
        self.moments = {name: [[(param, {k: v.clone() for k, v in opt.state[param].items()})
                                for param, _ in layer.slot_params() if opt.state.get(param)] for opt in self.optimizers]
                        for name, layer in adapters.items()}
        self.dirty: set[str] = set()

    def mark(self, plan: RankPlan) -> None:
        """Note the matrices a plan is about to change (call it before applying the plan)."""
        self.dirty.update(set(plan.prune) | set(plan.grow) | set(plan.zero_lambda))

    @torch.no_grad()
    def restore(self) -> None:
        for name in self.dirty:
            self.adapters[name].load_state_dict(self.layers[name], strict=False)
            for per_optimizer, opt in zip(self.moments[name], self.optimizers, strict=True):
                for param, saved in per_optimizer:
                    for key, value in saved.items():
                        opt.state[param][key].copy_(value)
        self.dirty.clear()

    def nbytes(self) -> int:
        tensors = [t for state in self.layers.values() for t in state.values()]
        tensors += [t for per in self.moments.values() for opt in per for _, s in opt for t in s.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
