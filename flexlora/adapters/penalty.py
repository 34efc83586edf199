"""Orthogonality penalty of the SVD form, over live slots only (DESIGN.md 4.2)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

from flexlora.adapters.layer import SlotLoRALayer

OrthForm = Literal["code", "paper"]


def _gram_residual(gram: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(G - I) restricted to live rows and columns; dead slots contribute exactly zero."""
    live = mask.to(gram.dtype)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - eye) * (live[:, None] * live[None, :])


def orthogonality_penalty(adapters: Iterable[SlotLoRALayer], form: OrthForm = "code") -> torch.Tensor:
    """AdaLoRA's regulariser on Q = lora_A (Q Q^T) and P = lora_B (P^T P).

    ``code``: mean over all A and B tensors of ||M - I||_F (the released AdaLoRA code and peft).
    ``paper``: sum over matrices of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (the paper's equation).
    """
    if form not in ("code", "paper"):
        raise ValueError(f"orth_form must be 'code' or 'paper', got {form!r}")
    terms: list[torch.Tensor] = []
    for layer in adapters:
        a, b = layer.lora_A, layer.lora_B
        for gram in (a @ a.t(), b.t() @ b):
            residual = _gram_residual(gram, layer.mask)
            if form == "code":
                terms.append(torch.linalg.matrix_norm(residual, ord="fro"))
            else:
                terms.append(residual.pow(2).sum())
    if not terms:
        raise ValueError("no adapters to regularise")
    stacked = torch.stack(terms)
    return stacked.mean() if form == "code" else stacked.sum()
