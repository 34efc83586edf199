"""A new slot's orthogonality penalty must not grow with the matrix width under the default rule: the paper's
LLaMA family adapts 14,336-wide FFN matrices, where a fixed std of 0.1 gives new vectors a squared norm of 143."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flexlora.adapters import SlotLoRALayer, apply_plan, orthogonality_penalty
from flexlora.allocators.config import FlexLoRAConfig
from flexlora.plan import RankPlan

WIDTHS = (64, 4096, 14336)


def penalty_added_by_one_new_slot(width: int, grow_std: float | str) -> float:
    """Penalty increase when one slot is grown into matrices whose live slots are orthonormal; the width is the
    length of the new Q row (a width x 8 map) and of the new P column (an 8 x width map)."""
    torch.manual_seed(0)
    layers = {"q": SlotLoRALayer(nn.Linear(width, 8), form="svd", rank=4, max_rank=8),
              "p": SlotLoRALayer(nn.Linear(8, width), form="svd", rank=4, max_rank=8)}
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A[:4] = torch.linalg.qr(torch.randn(layer.in_features, 4))[0].t()
            layer.lora_B[:, :4] = torch.linalg.qr(torch.randn(layer.out_features, 4))[0]
    before = float(orthogonality_penalty(layers.values(), "code").detach())
    spec = FlexLoRAConfig(rank=4, grow_std=grow_std).grow_spec()
    apply_plan(layers, RankPlan(step=1, grow={"q": 1, "p": 1}, grow_spec=spec), torch.Generator().manual_seed(1))
    return float(orthogonality_penalty(layers.values(), "code").detach()) - before


def test_default_rule_is_width_free():
    default = FlexLoRAConfig(rank=4).grow_std
    added = {w: penalty_added_by_one_new_slot(w, default) for w in WIDTHS}
    # unit expected norm at any width (the 8-long sides add O(1) noise): about 0.6 - 0.7 at every width here,
    # against 0.7 / 21 / 72 for a fixed std of 0.1 (and 41 / 2,070 / 7,242 for the released 1.0)
    assert max(added.values()) < 1.0, added
    assert added[14336] <= added[64] + 0.1, f"the penalty grows with the width under grow_std={default}: {added}"


def test_a_fixed_std_grows_with_the_width():
    added = {w: penalty_added_by_one_new_slot(w, 0.1) for w in WIDTHS}
    assert added[64] < 1.0 < added[4096] < added[14336]
    assert added[14336] == pytest.approx(14336 * 0.01 / 2, rel=0.1)  # |q|^2 - 1 ~ 142 on each of two grams, / 4
