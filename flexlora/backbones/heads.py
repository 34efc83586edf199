"""The task head: the same start for every method of a comparison.

A new head (a classifier, a pooler trained with it) is the one trained part of a run that is not an adapter.
Hugging Face initialises it from the global RNG while the model is built, so its values depend on everything
that drew random numbers before (the adapter form, a data loader, a library's own draws). Here every head
module is drawn again from a generator seeded by the run seed alone, in module-name order: for a given seed,
LoRA, AdaLoRA and FlexLoRA start from bit-identical heads. The rule is the transformers convention for new
heads: Linear and Embedding weights ~ N(0, initializer_range^2), biases 0, LayerNorm weight 1 and bias 0.

A regression head's output bias starts at the mean of the training targets: with bias 0 against STS-B labels
in 0 - 5, a method whose adapters move faster than the head (LoRA's B at a small lr) absorbs the mean shift
and collapses to near-constant predictions, which then looks like the method's fault.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flexlora.adapters.inject import matches

HEAD_SEED_OFFSET = 1_000_003  # keeps the head's stream apart from the adapters' generator (seeded by the run seed)


def head_module_names(model: nn.Module, head_modules: Sequence[str]) -> list[str]:
    """The top-most modules named by ``head_modules`` (exact name or dotted suffix), in module order."""
    names = [n for n, _ in model.named_modules() if n and matches(n, list(head_modules))]
    return [n for n in names if not any(n.startswith(other + ".") for other in names if other != n)]


@torch.no_grad()
def init_head(model: nn.Module, head_modules: Sequence[str], seed: int, std: float | None = None) -> list[str]:
    """Draw every head module's parameters from the run seed's own generator; returns the modules touched.

    ``std`` defaults to the model config's ``initializer_range`` (0.02 when it has none).
    """
    if std is None:
        std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02) or 0.02)
    generator = torch.Generator().manual_seed(seed + HEAD_SEED_OFFSET)
    touched = head_module_names(model, head_modules)
    for name in touched:
        for module in model.get_submodule(name).modules():
            _init_module(module, std, generator)
    return touched


def _init_module(module: nn.Module, std: float, generator: torch.Generator) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        module.weight.copy_(torch.empty(module.weight.shape).normal_(0.0, std, generator=generator))
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            module.weight.fill_(1.0)
        if module.bias is not None:
            module.bias.zero_()


def output_layer(model: nn.Module, head_modules: Sequence[str], out_features: int) -> nn.Linear | None:
    """The last Linear inside the head modules with ``out_features`` outputs (the layer that emits the logits)."""
    found = None
    for name in head_module_names(model, head_modules):
        for module in model.get_submodule(name).modules():
            if isinstance(module, nn.Linear) and module.out_features == out_features:
                found = module
    return found


@torch.no_grad()
def set_output_bias(model: nn.Module, head_modules: Sequence[str], value: float) -> None:
    """Start a regression head's output at ``value`` (the training targets' mean)."""
    layer = output_layer(model, head_modules, 1)
    if layer is None or layer.bias is None:
        raise ValueError(f"no single-output Linear with a bias in head modules {list(head_modules)}")
    layer.bias.fill_(value)
