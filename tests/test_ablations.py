"""FlexLoRA's ablations and controls: budget-matched directions, random importance, capacity, sensitivity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from flexlora.adapters import SlotLoRALayer, apply_plan
from flexlora.allocators import allocator_config, build_allocator
from flexlora.errors import FlexLoRAError
from flexlora.plan import GrowSpec
from tests.fakes import fake_adapters, flex, randomise_lambda


@pytest.mark.parametrize("direction, init_rank", [("prune_only", 6), ("grow_only", 2), ("prune_only", None),
                                                  ("grow_only", None)])
def test_direction_ablations_are_budget_matched(direction, init_rank):
    """prune_only / grow_only start away from r0 and move b per event only until the total is n x r0."""
    generator = torch.Generator().manual_seed(3)
    allocator_cfg = allocator_config({"name": "flexlora", "rank": 4, "max_rank": 8, "direction": direction,
                                      "init_rank": init_rank, "t_init": 10, "t_final": 10, "delta_t": 2,
                                      "budget_per_event": 3})
    start = allocator_cfg.init_rank
    assert start == (init_rank or {"prune_only": 6, "grow_only": 2}[direction])
    torch.manual_seed(0)
    adapters = {f"layer.{i // 6}.m{i % 6}": SlotLoRALayer(nn.Linear(6, 5), **allocator_cfg.adapter_kwargs())
                for i in range(12)}
    allocator = build_allocator(allocator_cfg)
    allocator.bind(adapters, 1000)
    totals = [sum(layer.live_rank for layer in adapters.values())]
    assert totals[0] == 12 * start
    for step in range(1, 1001):
        randomise_lambda(adapters, generator)
        plan = allocator.plan(adapters, step)
        if plan is None:
            continue
        assert (not plan.grow) if direction == "prune_only" else (not plan.prune)
        apply_plan(adapters, plan, generator)
        totals.append(sum(layer.live_rank for layer in adapters.values()))
    sign = -1 if direction == "prune_only" else 1
    assert all(sign * (b - a) == min(3, abs(12 * 4 - a)) for a, b in itertools.pairwise(totals))
    assert totals[-1] == 12 * 4, "every direction ends at n x r0"
    assert len(totals) - 1 == math.ceil(12 * abs(start - 4) / 3)


def test_direction_ablation_that_cannot_reach_the_budget_is_refused():
    adapters = fake_adapters(n=12, rank=6, max_rank=8)
    with pytest.raises(FlexLoRAError, match="must remove 24 slots"):
        flex(adapters, total=40, t_init=10, t_final=10, delta_t=5, budget_per_event=3, direction="prune_only",
             init_rank=6)
    with pytest.raises(FlexLoRAError, match="init_rank > rank"):
        allocator_config({"name": "flexlora", "rank": 4, "direction": "prune_only", "init_rank": 4})


def test_random_importance_is_seeded_and_keeps_the_constraints():
    adapters = fake_adapters()
    randomise_lambda(adapters, torch.Generator().manual_seed(0))
    plans = []
    for seed in (5, 5, 6):
        allocator = build_allocator({"name": "flexlora", "rank": 4, "max_rank": 8, "t_init": 10, "t_final": 10,
                                     "delta_t": 2, "budget_per_event": 3, "importance": "random"}, seed=seed)
        allocator.bind(adapters, 1000)
        peek = allocator.importance(adapters)
        plan = allocator.plan(adapters, 12)
        assert plan.importance == peek, "importance() previews the next draw without consuming it"
        assert allocator.plan(adapters, 14).importance != plan.importance, "each event draws anew"
        plans.append(plan)
        assert len(plan.prune) == len(plan.grow) == 3 and not set(plan.prune) & set(plan.grow)
    assert plans[0] == plans[1] and plans[0].importance != plans[2].importance


def test_skipped_full_counts_capacity_bound_grow_candidates():
    adapters = fake_adapters(n=6, rank=4, max_rank=5)
    with torch.no_grad():
        for i, layer in enumerate(adapters.values()):
            layer.lora_E[:4] = torch.tensor([1.0, 1.0, 1.0, 1.0]) if i < 2 else torch.tensor([4.0, 1, 0.5, 0.1 * i])
    full = list(adapters)[:2]
    for name in full:  # the two flattest (highest-entropy) matrices are at capacity
        adapters[name].grow(GrowSpec("zero_impact", 1.0, 0.0), None)
        with torch.no_grad():
            adapters[name].lora_E[4] = 1.0
    plan = flex(adapters, budget_per_event=2).plan(adapters, 12)
    assert plan.skipped_full == 2 and not set(plan.grow) & set(full)


def test_importance_kinds_change_the_decision():
    adapters = fake_adapters()
    with torch.no_grad():
        for i, layer in enumerate(adapters.values()):
            layer.lora_E.zero_()
            # even i: one big value (low entropy, high norm); odd i: flat small values (high entropy, low norm)
            layer.lora_E[:4] = torch.tensor([10.0 + i, 0.1, 0.1, 0.1]) if i % 2 == 0 else torch.full((4,), 0.5)
    entropy = flex(adapters, importance="entropy").plan(adapters, 12)
    nuclear = flex(adapters, importance="nuclear").plan(adapters, 12)
    frob = flex(adapters, importance="frobenius").plan(adapters, 12)
    names = list(adapters)
    assert all(names.index(k) % 2 == 0 for k in entropy.prune)  # concentrated energy is shrunk
    assert all(names.index(k) % 2 == 1 for k in nuclear.prune)  # small magnitude is shrunk
    assert set(frob.prune) == set(nuclear.prune)


def test_sensitivity_importance_equals_a_hand_computed_ema_and_grows_the_best():
    adapters = fake_adapters(n=6)
    allocator = flex(adapters, importance="sensitivity", budget_per_event=1, beta1=0.8, beta2=0.7)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in adapters.values():
            layer.lora_E.normal_()
    ipt = {n: {p: 0.0 for p in ("A", "E", "B")} for n in adapters}
    unc = {n: {p: 0.0 for p in ("A", "E", "B")} for n in adapters}
    for step in range(1, 4):
        for i, layer in enumerate(adapters.values()):
            layer.zero_grad()
            (layer(x).sum() * (i + 1) ** 2).backward()
        allocator.observe(adapters, step)
        for name, layer in adapters.items():
            for key, param in (("A", layer.lora_A), ("E", layer.lora_E), ("B", layer.lora_B)):
                current = (param.detach() * param.grad).abs()
                ipt[name][key] = 0.8 * ipt[name][key] + 0.2 * current
                unc[name][key] = 0.7 * unc[name][key] + 0.3 * (current - ipt[name][key]).abs()
    for name, layer in adapters.items():
        s = {k: ipt[name][k] * unc[name][k] for k in ("A", "E", "B")}
        triplet = s["E"] + s["A"].mean(dim=1) + s["B"].mean(dim=0)
        expected = triplet[: layer.live_rank].double().mean().item()
        assert allocator.importance(adapters)[name] == pytest.approx(expected, rel=1e-5)
    scores = allocator.importance(adapters)
    plan = allocator.plan(adapters, 12)
    best = max(scores, key=scores.get)
    worst = min(scores, key=scores.get)
    assert plan.grow == {best: 1} and list(plan.prune) == [worst]


def test_sensitivity_regrown_slot_starts_with_fresh_ema_rows():
    adapters = fake_adapters(n=2)
    allocator = flex(adapters, importance="sensitivity", budget_per_event=1)
    x = torch.randn(4, 6)
    with torch.no_grad():
        for layer in adapters.values():
            layer.lora_E.normal_()
    for step in range(1, 4):
        for layer in adapters.values():
            layer.zero_grad()
            layer(x).square().sum().backward()
        allocator.observe(adapters, step)
    plan = allocator.plan(adapters, 12)
    (shrunk,) = plan.prune
    before = allocator.tracker.ipt_avg[f"{shrunk}.lora_A"].clone()
    changes = apply_plan(adapters, plan, torch.Generator().manual_seed(0))
    allocator.on_applied(changes)
    (grown,) = plan.grow
    new_slot = changes[grown].reset[0]
    for key in ("lora_A", "lora_E", "lora_B"):
        dim = 1 if key == "lora_B" else 0
        assert torch.count_nonzero(allocator.tracker.ipt_avg[f"{grown}.{key}"].select(dim, new_slot)) == 0
        assert torch.count_nonzero(allocator.tracker.unc_avg[f"{grown}.{key}"].select(dim, new_slot)) == 0
    (i, last), = changes[shrunk].swaps or [(plan.prune[shrunk][0], plan.prune[shrunk][0])]
    after = allocator.tracker.ipt_avg[f"{shrunk}.lora_A"]
    if i != last:
        assert torch.equal(after[i], before[last]), "EMA rows travel with their slot"
    assert torch.count_nonzero(after[last]) == 0


def test_grow_init_reaches_new_slots():
    adapters = fake_adapters()
    allocator = flex(adapters, grow_init="small_value", grow_value=0.05)
    randomise_lambda(adapters, torch.Generator().manual_seed(0))
    plan = allocator.plan(adapters, 12)
    changes = apply_plan(adapters, plan, torch.Generator().manual_seed(0))
    for name in plan.grow:
        layer = adapters[name]
        (grown,) = changes[name].reset
        effective = layer.scale * layer.lora_E[grown].abs() * layer.lora_A[grown].norm() * layer.lora_B[:, grown].norm()
        assert effective.item() == pytest.approx(0.05, rel=1e-5)
