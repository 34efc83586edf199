"""The trainable parameters in named groups, shared by every loop (the Lightning module, the HF Trainer path)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from flexlora.adapters.layer import SlotLoRALayer

NO_DECAY = ("bias", "LayerNorm.weight", "layernorm.weight", "layer_norm.weight", "LayerNorm.bias")
GROUP_ORDER = ("adapter_decay", "adapter_no_decay", "head_decay", "head_no_decay")


def param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    adapters: Mapping[str, SlotLoRALayer],
    head_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Trainable parameters in named groups: adapters and the rest (the task head) apart, so the head can have
    its own lr (``head_lr``; None = the optimizer's), and no weight decay on biases and LayerNorm."""
    adapter_ids = {id(p) for layer in adapters.values() for p, _ in layer.slot_params()}
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        part = "adapter" if id(param) in adapter_ids else "head"
        decay = "no_decay" if any(k in name for k in NO_DECAY) else "decay"
        groups.setdefault(f"{part}_{decay}", []).append(param)
    out = []
    for key in GROUP_ORDER:
        if key not in groups:
            continue
        group: dict[str, Any] = {"params": groups[key], "name": key}
        if key.endswith("no_decay"):
            group["weight_decay"] = 0.0
        if key.startswith("head") and head_lr is not None:
            group["lr"] = float(head_lr)
        out.append(group)
    return out
