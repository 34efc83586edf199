"""Orthogonality penalty of the SVD form, over live slots only (docs/architecture.md §3.1)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

from flexlora.adapters.layer import SlotLoRALayer

OrthForm = Literal["code", "paper"]


def orthogonality_penalty(adapters: Iterable[SlotLoRALayer], form: OrthForm = "code") -> torch.Tensor:
    """AdaLoRA's regulariser on Q = lora_A (Q Q^T) and P = lora_B (P^T P), over the live prefix only.

    ``code``: mean over all A and B tensors of ||M - I||_F (the released AdaLoRA code and peft).
    ``paper``: sum over matrices of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (the paper's equation).
    Dead slots never enter (the grams are r x r over the live prefix); a matrix with no live slot counts
    as 0 in the code form's mean, as its fully masked gram did. The grams of all matrices with the same
    live rank are stacked, so the identity and the norm run once per group instead of once per matrix.
    """
    assert form in ("code", "paper"), form
    layers = list(adapters)
    assert layers, "no adapters to regularise"
    groups: dict[int, list[SlotLoRALayer]] = {}
    for layer in layers:
        groups.setdefault(layer.live_rank, []).append(layer)
    terms: list[torch.Tensor] = []
    empty = 0
    for rank, members in groups.items():
        if rank == 0:
            empty += 2 * len(members)
            continue
        grams = []
        for layer in members:
            a, b = layer.lora_A[:rank], layer.lora_B[:, :rank]
            grams += [a @ a.t(), b.t() @ b]
        residual = torch.stack(grams) - torch.eye(rank, dtype=grams[0].dtype, device=grams[0].device)
        if form == "code":
            terms.append(torch.linalg.matrix_norm(residual, ord="fro"))
        else:
            terms.append(residual.pow(2).sum(dim=(1, 2)))
    reference = layers[0].lora_A
    if not terms:
        return reference.sum() * 0.0
    values = torch.cat(terms)
    if form == "paper":
        return values.sum()
    return values.sum() / (values.numel() + empty)
