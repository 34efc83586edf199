"""SlotAdamW and optimizer-state surgery: exact Adam arithmetic, per-slot resets, untouched state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flexlora.adapters import SlotLoRALayer, apply_plan
from flexlora.optim import SlotAdamW, SurgeryError, apply_surgery, reset_layer_slots, reset_slots
from flexlora.plan import GrowSpec, RankPlan


def test_untagged_parameters_follow_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    ours_p = nn.Parameter(torch.randn(5, 4))
    ref_p = nn.Parameter(ours_p.detach().clone())
    ours = SlotAdamW([ours_p], lr=1e-2, weight_decay=0.1, eps=1e-6)
    ref = torch.optim.AdamW([ref_p], lr=1e-2, weight_decay=0.1, eps=1e-6, foreach=False)
    for _ in range(7):
        g = torch.randn(5, 4)
        ours_p.grad, ref_p.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(ours_p, ref_p)


def test_slot_tensors_match_adamw_without_surgery():
    layer = SlotLoRALayer(nn.Linear(4, 3), form="svd", rank=2)
    ref_params = [nn.Parameter(p.detach().clone()) for p, _ in layer.slot_params()]
    ours = SlotAdamW([p for p, _ in layer.slot_params()], lr=1e-2, weight_decay=0.05)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.05, foreach=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        for (p, _), q in zip(layer.slot_params(), ref_params, strict=True):
            g = torch.randn(p.shape, generator=generator)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for (p, _), q in zip(layer.slot_params(), ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert ours.state[p]["step"].shape == (p.shape[p._flexlora_slot_axis.dim],)


def trained_layer(steps: int = 5):
    torch.manual_seed(0)
    layer = SlotLoRALayer(nn.Linear(6, 5), form="svd", rank=3, max_rank=4)
    head = nn.Parameter(torch.randn(3))
    optimizer = SlotAdamW([{"params": [p for p, _ in layer.slot_params()], "weight_decay": 0.01},
                           {"params": [head], "weight_decay": 0.0}], lr=1e-2)
    x = torch.randn(8, 6)
    for _ in range(steps):
        optimizer.zero_grad()
        (layer(x).square().sum() + head.sum()).backward()
        optimizer.step()
    return layer, head, optimizer, x


def test_surgery_zeroes_touched_slots_and_leaves_everything_else():
    layer, head, optimizer, _ = trained_layer()
    groups_before = copy.deepcopy(optimizer.state_dict()["param_groups"])
    snapshot = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in [head, *optimizer.state]}
    reset_layer_slots(optimizer, layer, [1])
    others = torch.tensor([0, 2, 3])
    for p, dim in layer.slot_params():
        state = optimizer.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(state[key].select(dim, 1)) == 0
            assert torch.count_nonzero(snapshot[p][key].select(dim, 1)) > 0
            assert torch.equal(state[key].index_select(dim, others), snapshot[p][key].index_select(dim, others))
        assert state["step"].tolist() == [5, 0, 5, 0]  # slot 3 is dead: never stepped
    for key, value in snapshot[head].items():
        assert torch.equal(optimizer.state[head][key], value)
    assert optimizer.state_dict()["param_groups"] == groups_before


def test_first_update_of_a_grown_slot_is_a_fresh_adam_step():
    layer, _, optimizer, x = trained_layer()
    changes = apply_plan({"m": layer}, RankPlan(step=1, prune={"m": [1]}), None)
    apply_surgery(optimizer, {"m": layer}, changes)
    changes = apply_plan({"m": layer}, RankPlan(step=2, grow={"m": 1}, grow_spec=GrowSpec("zero_impact", 0.5, 0.0)),
                         torch.Generator().manual_seed(0))
    apply_surgery(optimizer, {"m": layer}, changes)
    (g,) = changes["m"].reset
    assert g == 2
    row_before = layer.lora_A.detach()[g].clone()
    lam_before = layer.lora_E.detach()[g].clone()
    optimizer.zero_grad()
    layer(x).square().sum().backward()
    grad_row, grad_lam = layer.lora_A.grad[g].clone(), layer.lora_E.grad[g].clone()
    optimizer.step()
    # a brand-new AdamW on just this row and lambda, one step
    fresh_row = nn.Parameter(row_before.clone())
    fresh_lam = nn.Parameter(lam_before.clone().view(1))
    fresh = torch.optim.AdamW([fresh_row, fresh_lam], lr=1e-2, weight_decay=0.01, foreach=False)
    fresh_row.grad, fresh_lam.grad = grad_row, grad_lam.view(1)
    fresh.step()
    torch.testing.assert_close(layer.lora_A.detach()[g], fresh_row.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(layer.lora_E.detach()[g : g + 1], fresh_lam.detach(), rtol=1e-6, atol=1e-8)
    # a fresh first step moves lambda by lr * g / |g| = lr; a stale tensor-wide count (6) would move ~0.52 lr
    assert abs(layer.lora_E.detach()[g] - lam_before).item() == pytest.approx(1e-2, rel=1e-3)


def test_surgery_refuses_per_tensor_step_optimizers():
    layer = SlotLoRALayer(nn.Linear(4, 3), form="svd", rank=2)
    optimizer = torch.optim.AdamW([p for p, _ in layer.slot_params()], lr=1e-3)
    for p, _ in layer.slot_params():
        p.grad = torch.ones_like(p)
    optimizer.step()
    with pytest.raises(SurgeryError, match="SlotAdamW"):
        reset_slots(optimizer, layer.lora_A, 0, [0])


def test_reset_before_the_first_step_is_a_no_op():
    layer = SlotLoRALayer(nn.Linear(4, 3), form="svd", rank=2)
    optimizer = SlotAdamW([p for p, _ in layer.slot_params()])
    reset_layer_slots(optimizer, layer, [0])
    assert not optimizer.state


def test_pruning_swaps_optimizer_state_with_the_slot():
    """The live prefix is kept by swapping; each slot's moments and step count must travel with it."""
    layer, _, optimizer, _x = trained_layer()
    with torch.no_grad():
        layer.lora_E.copy_(torch.tensor([0.5, 0.1, 0.9, 0.0]))
    state_before = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p, _ in layer.slot_params()}
    rows_before = layer.lora_A.detach().clone()
    changes = apply_plan({"m": layer}, RankPlan(step=6, prune={"m": [0]}), None)
    apply_surgery(optimizer, {"m": layer}, changes)
    assert changes["m"].swaps == [(0, 2)] and changes["m"].reset == [2]
    assert torch.equal(layer.lora_A[0], rows_before[2])  # old slot 2 lives at 0 now
    for p, dim in layer.slot_params():
        state, before = optimizer.state[p], state_before[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key].select(dim, 0), before[key].select(dim, 2))
            assert torch.equal(state[key].select(dim, 1), before[key].select(dim, 1))
            assert torch.count_nonzero(state[key].select(dim, 2)) == 0
        assert state["step"].tolist() == [5, 5, 0, 0]


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_dead_slots_keep_their_values_across_steps(weight_decay):
    """No Adam update and no weight decay moves a dead slot (its values are pinned until it is regrown)."""
    torch.manual_seed(0)
    layer = SlotLoRALayer(nn.Linear(6, 5), form="svd", rank=3, max_rank=5)
    optimizer = SlotAdamW([p for p, _ in layer.slot_params()], lr=1e-2, weight_decay=weight_decay)
    x = torch.randn(8, 6)
    with torch.no_grad():
        layer.lora_A[3:].normal_()  # dead slots with non-zero vectors: weight decay would shrink them
        layer.lora_B[:, 3:].normal_()
    changes = apply_plan({"m": layer}, RankPlan(step=1, prune={"m": [1]}), None)
    apply_surgery(optimizer, {"m": layer}, changes)
    dead = {p: p.detach().narrow(dim, 2, 3).clone() for p, dim in layer.slot_params()}
    live = {p: p.detach().narrow(dim, 0, 2).clone() for p, dim in layer.slot_params()}
    for _ in range(4):
        optimizer.zero_grad()
        layer(x).square().sum().backward()
        optimizer.step()
    for p, dim in layer.slot_params():
        assert torch.equal(p.detach().narrow(dim, 2, 3), dead[p])
        assert not torch.equal(p.detach().narrow(dim, 0, 2), live[p])
