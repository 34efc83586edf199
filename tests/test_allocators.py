"""Allocator decisions: entropy reference values, FlexLoRA invariants over long random runs, ablations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flexlora.adapters import SlotLoRALayer, apply_plan
from flexlora.allocators import (
    FlexLoRAAllocator,
    FlexLoRAConfig,
    StaticAllocator,
    allocator_config,
    build_allocator,
    event_budget,
    spectral_entropy,
)
from flexlora.errors import FlexLoRAError


@pytest.mark.parametrize(
    "values, expected",
    [
        ([1, 1], 1.0),
        ([3, 4], 0.942683),
        ([1, 2, 3], 0.755928),
        ([1, 1, 0], 0.630930),
        ([2, 1, 0.1], 0.467686),
        ([0.5, -0.5, 0.5, -0.5], 1.0),
        ([2.5], 0.0),  # r = 1: log 1 = 0, convention I = 0
        ([0, 0, 0], 0.0),  # all-zero lambda: convention I = 0
    ],
)
def test_entropy_reference_values(values, expected):
    assert spectral_entropy(torch.tensor(values, dtype=torch.float32)) == pytest.approx(expected, abs=1e-6)


def test_entropy_is_float64_and_scale_invariant():
    lam = torch.tensor([1e-20, 2e-20, 3e-20], dtype=torch.float32)  # underflows if squared in float32
    assert spectral_entropy(lam) == pytest.approx(0.755928, abs=1e-6)


def test_batched_importance_matches_the_scalar_reference():
    """The allocator scores all matrices in one pass; it must equal the per-matrix equations exactly."""
    from flexlora.allocators.importance import batched_importance, magnitude_importance

    generator = torch.Generator().manual_seed(3)
    rows = [[1, 1, 0], [2, 1, 0.1], [0.5, -0.5, 0.5, -0.5], [2.5], [0, 0, 0], [1e-20, 2e-20, 3e-20]]
    rows += [torch.randn(int(k), generator=generator).tolist() for k in torch.randint(1, 9, (20,), generator=generator)]
    width = 8
    lam = torch.randn(len(rows), width, generator=generator) * 5  # dead slots hold garbage that must not count
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, values in enumerate(rows):
        slots = torch.randperm(width, generator=generator)[: len(values)].sort().values
        lam[i, slots] = torch.tensor(values, dtype=torch.float32)
        mask[i, slots] = True
    live = [lam[i][mask[i]] for i in range(len(rows))]
    entropy = batched_importance(lam, mask, "entropy")
    assert entropy.dtype == torch.float64
    for i, values in enumerate(live):
        assert entropy[i].item() == pytest.approx(spectral_entropy(values), abs=1e-12)
        for kind in ("nuclear", "frobenius"):
            got = batched_importance(lam, mask, kind)[i].item()
            assert got == pytest.approx(magnitude_importance(values, kind), rel=1e-12, abs=1e-300)


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


def test_flexlora_long_random_run_invariants():
    adapters = fake_adapters()
    allocator = flex(adapters)
    n, r0 = len(adapters), 4
    generator = torch.Generator().manual_seed(0)
    grow_rng = torch.Generator().manual_seed(1)
    events = []
    for step in range(1, 1001):
        randomise_lambda(adapters, generator)
        lambdas = {k: (layer.live_slots().clone(), layer.lora_E.detach().clone()) for k, layer in adapters.items()}
        ranks_before = {k: layer.live_rank for k, layer in adapters.items()}
        plan = allocator.plan(adapters, step)
        if plan is None:
            continue
        events.append(step)
        shrink, grow = set(plan.prune), set(plan.grow)
        assert not shrink & grow, "D and U must be disjoint"
        assert len(shrink) == len(grow) == allocator.budget(step) == 3
        importance = allocator.importance(adapters)
        assert plan.importance == importance
        for name in shrink:
            live, lam = lambdas[name]
            (slot,) = plan.prune[name]
            assert slot == int(live[torch.argmin(lam[live].abs())]), "must prune the smallest |lambda|"
            assert ranks_before[name] > 1
        # D = lowest importance among r > 1; U = highest among the rest with a free slot
        eligible = sorted((k for k in adapters if ranks_before[k] > 1), key=lambda k: importance[k])
        assert max(importance[k] for k in shrink) <= min(
            [importance[k] for k in eligible if k not in shrink] or [math.inf])
        rest = [k for k in adapters if k not in shrink and ranks_before[k] < 8]
        assert min(importance[k] for k in grow) >= max(
            [importance[k] for k in rest if k not in grow] or [-math.inf])
        apply_plan(adapters, plan, grow_rng)
        ranks = [layer.live_rank for layer in adapters.values()]
        assert sum(ranks) == n * r0
        assert all(1 <= r <= 8 for r in ranks)
    assert events == list(range(12, 990, 2)), "events at t_init < t < T - t_final, (t - t_init) % delta_t == 0"
    assert len(events) > 400
    assert len({layer.live_rank for layer in adapters.values()}) > 1


@pytest.mark.parametrize(
    "schedule, first, last",
    [("constant", 8, 8), ("cubic", 8, 0), ("cubic_late", 8, 0)],
)
def test_budget_at_both_ends_of_the_window(schedule, first, last):
    adapters = fake_adapters(n=18)
    allocator = flex(adapters, total=1000, t_init=100, t_final=100, delta_t=1, budget_per_event=8,
                     schedule=schedule)
    steps = allocator.event_steps()
    assert steps[0] == 101 and steps[-1] == 899
    # p -> 0 at the first event, p -> 1 at the window's end
    assert allocator.budget(steps[0]) == first
    assert allocator.budget(steps[-1]) == last
    mid = 500
    p = (mid - 100) / 800
    expected = {"constant": 8, "cubic": round(8 * (1 - p) ** 3), "cubic_late": round(8 * (1 - p**3))}[schedule]
    assert allocator.budget(mid) == expected
    assert event_budget("cubic", 4, 0.5) == round(4 * 0.125)


def test_direction_prune_only_and_grow_only():
    generator = torch.Generator().manual_seed(3)
    for direction, sign in (("prune_only", -1), ("grow_only", 1)):
        adapters = fake_adapters()
        allocator = flex(adapters, direction=direction)
        randomise_lambda(adapters, generator)
        plan = allocator.plan(adapters, 12)
        assert plan is not None
        apply_plan(adapters, plan, generator)
        total = sum(layer.live_rank for layer in adapters.values())
        assert total == 48 + sign * 3
        assert (not plan.grow) if direction == "prune_only" else (not plan.prune)


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


def test_sensitivity_importance_uses_gradients():
    adapters = fake_adapters()
    allocator = flex(adapters, importance="sensitivity")
    x = torch.randn(4, 6)
    with torch.no_grad():
        for layer in adapters.values():
            layer.lora_E.normal_()
    for step in range(1, 5):
        for i, layer in enumerate(adapters.values()):
            layer.zero_grad()
            (layer(x).sum() * (i + 1)).backward()
        allocator.observe(adapters, step)
    scores = allocator.importance(adapters)
    assert len(set(scores.values())) == len(adapters) and all(v > 0 for v in scores.values())
    plan = allocator.plan(adapters, 12)
    assert plan is not None and set(plan.prune) and set(plan.grow)


def test_grow_init_reaches_new_slots():
    adapters = fake_adapters()
    allocator = flex(adapters, grow_init="small_value", grow_value=0.05)
    randomise_lambda(adapters, torch.Generator().manual_seed(0))
    plan = allocator.plan(adapters, 12)
    touched = apply_plan(adapters, plan, torch.Generator().manual_seed(0))
    for name in plan.grow:
        (grown,) = [s for s in touched[name]]
        assert adapters[name].lora_E[grown].item() == pytest.approx(0.05)


def test_schedule_and_budget_validation():
    adapters = fake_adapters(n=6)
    with pytest.raises(FlexLoRAError, match="no allocation event fits"):
        flex(adapters, total=20, t_init=10, t_final=10, budget_per_event=1)
    with pytest.raises(FlexLoRAError, match="budget_per_event=4 is too large for 6"):
        flex(adapters, budget_per_event=4)
    with pytest.raises(FlexLoRAError, match="max_rank"):
        allocator_config({"name": "flexlora", "rank": 4, "max_rank": 2})
    with pytest.raises(FlexLoRAError, match="no field"):
        allocator_config({"name": "flexlora", "rnak": 4})
    with pytest.raises(FlexLoRAError, match="schedule must be one of"):
        allocator_config({"name": "flexlora", "schedule": "linear"})
    assert FlexLoRAConfig(rank=3).max_rank == 6


def test_fractional_schedule_resolves_against_total_steps():
    adapters = fake_adapters(n=6)
    allocator = flex(adapters, total=200, t_init=0.1, t_final=0.25, delta_t=5, budget_per_event=1)
    assert (allocator.t_init, allocator.t_final) == (20, 50)
    assert allocator.event_steps()[0] == 25 and allocator.event_steps()[-1] == 145


def test_static_lora_never_plans():
    adapters = fake_adapters(form="lora", max_rank=4)
    allocator = build_allocator({"name": "lora", "rank": 4})
    assert isinstance(allocator, StaticAllocator)
    allocator.bind(adapters, 50)
    assert all(allocator.plan(adapters, t) is None for t in range(1, 51))


def test_plan_is_pure():
    adapters = fake_adapters()
    allocator = flex(adapters)
    randomise_lambda(adapters, torch.Generator().manual_seed(4))
    state = {k: v.clone() for k, v in adapters["layer.0.m0"].state_dict().items()}
    masks = [layer.mask.clone() for layer in adapters.values()]
    first = allocator.plan(adapters, 12)
    second = allocator.plan(adapters, 12)
    assert first == second
    assert all(torch.equal(m, layer.mask) for m, layer in zip(masks, adapters.values(), strict=True))
    assert all(torch.equal(v, adapters["layer.0.m0"].state_dict()[k]) for k, v in state.items())
