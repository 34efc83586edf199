"""Put slot adapters into a model, peft-style, and freeze everything except adapters and the task head."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import torch
from torch import nn

from flexlora.adapters.layer import AdapterForm, SlotLoRALayer, is_conv1d
from flexlora.errors import FlexLoRAError

TargetModules = str | Sequence[str]


def matches(name: str, targets: TargetModules) -> bool:
    """peft's rule: a string is a full-match regex; a list matches an exact name or a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _suggestions(model: nn.Module, targets: TargetModules, limit: int = 12) -> list[str]:
    """Linear-layer names the user may have meant: dotted suffixes of adaptable modules, closest first."""
    suffixes: list[str] = []
    for name, module in model.named_modules():
        if not _adaptable(module):
            continue
        parts = name.split(".")
        # the last one or two components without layer indices, e.g. "query_proj", "output.dense"
        for k in (1, 2):
            tail = ".".join(parts[-k:])
            if not any(p.isdigit() for p in parts[-k:]) and tail not in suffixes:
                suffixes.append(tail)
    wanted = [targets] if isinstance(targets, str) else list(targets)
    close: list[str] = []
    for t in wanted:
        for c in difflib.get_close_matches(str(t), suffixes, n=4, cutoff=0.3):
            if c not in close:
                close.append(c)
    rest = [s for s in suffixes if s not in close]
    return (close + rest)[:limit]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(
    model: nn.Module,
    target_modules: TargetModules,
    *,
    form: AdapterForm,
    rank: int,
    max_rank: int | None = None,
    init_rank: int | None = None,
    alpha: float = 1.0,
    dropout: float = 0.0,
    init_std: float = 0.02,
    head_modules: Sequence[str] = (),
    generator: torch.Generator | None = None,
) -> dict[str, SlotLoRALayer]:
    """Replace every matching linear layer by a :class:`SlotLoRALayer`; returns them by module name.

    All base parameters are frozen; the adapters and the modules named in ``head_modules`` (exact name
    or dotted suffix, e.g. the classifier) stay trainable. Matching nothing is an error that lists
    module names the user may have meant.
    """
    head_names = [n for n, _ in model.named_modules() if n and matches(n, list(head_modules))]
    if head_modules and not head_names:
        raise FlexLoRAError(
            f"head_modules {list(head_modules)} match no module of {type(model).__name__}; "
            f"top-level modules are {[n for n, _ in model.named_children()]}"
        )

    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in head_names)

    selected: list[str] = []
    for name, module in model.named_modules():
        if not name or in_head(name) or not matches(name, target_modules):
            continue
        if isinstance(module, SlotLoRALayer):
            raise FlexLoRAError(f"module {name} is already adapted; inject() was called twice on this model")
        if not _adaptable(module):
            raise FlexLoRAError(
                f"target_modules matched {name} ({type(module).__name__}); only nn.Linear and Conv1D can be "
                "adapted, so narrow backbone.target_modules"
            )
        selected.append(name)
    if not selected:
        hint = ", ".join(_suggestions(model, target_modules))
        raise FlexLoRAError(
            f"target_modules {target_modules!r} match no linear layer of {type(model).__name__}. "
            f"Set backbone.target_modules to names like: {hint}"
        )

    for param in model.parameters():
        param.requires_grad_(False)
    adapters: dict[str, SlotLoRALayer] = {}
    for name in selected:
        base = model.get_submodule(name)
        layer = SlotLoRALayer(
            base, form=form, rank=rank, max_rank=max_rank, init_rank=init_rank, alpha=alpha, dropout=dropout,
            init_std=init_std, generator=generator,
        )
        _set_submodule(model, name, layer)
        adapters[name] = layer
    for name in head_names:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    return adapters


def find_adapters(model: nn.Module) -> dict[str, SlotLoRALayer]:
    """The adapters of an already adapted model, by module name (in module order)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SlotLoRALayer)}
