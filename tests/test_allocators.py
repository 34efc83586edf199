"""Allocator decisions: entropy reference values, FlexLoRA invariants over long random runs, ablations."""

from __future__ import annotations

import itertools
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
from flexlora.plan import GrowSpec


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


def reference_scores(adapters, rank_one: str) -> dict[str, float]:
    """The decision scores recomputed independently: spectral_entropy per matrix; rank 1 per rank_one."""
    out = {}
    for name, layer in adapters.items():
        if layer.live_rank == 1:
            out[name] = math.inf if rank_one == "reference" else 0.0
        else:
            out[name] = spectral_entropy(layer.live_lambda())
    return out


@pytest.mark.parametrize("rank_one", ["reference", "zero"])
def test_flexlora_long_run_invariants_with_zero_lambda_slots_and_ties(rank_one):
    """Hundreds of events where lambda evolves slowly, a grown slot keeps lambda = 0 until the next event
    (the entropy dip of a new slot), some matrices share identical spectra (ties) and ranks reach 1."""
    adapters = fake_adapters()
    allocator = flex(adapters, rank_one=rank_one)
    n, r0 = len(adapters), 4
    generator = torch.Generator().manual_seed(0)
    grow_rng = torch.Generator().manual_seed(1)
    randomise_lambda(adapters, generator)
    names = list(adapters)
    with torch.no_grad():  # two pairs of matrices with identical spectra: ties broken by module order
        adapters[names[3]].lora_E.copy_(adapters[names[2]].lora_E)
        adapters[names[7]].lora_E.copy_(adapters[names[6]].lora_E)
    events, saw_rank_one, saw_zero_slot = [], False, False
    fresh: dict[str, int] = {}
    for step in range(1, 1001):
        with torch.no_grad():
            for name, layer in adapters.items():
                drift = torch.randn(layer.max_rank, generator=generator) * 0.05
                drift[fresh.get(name, layer.max_rank):] = 0  # a grown slot keeps lambda = 0 until the next event
                layer.lora_E.add_(drift * layer.mask)
            if step < 300:  # keep the tie until late
                adapters[names[3]].lora_E.copy_(adapters[names[2]].lora_E)
        plan = allocator.plan(adapters, step)
        if plan is None:
            continue
        events.append(step)
        ranks_before = {k: layer.live_rank for k, layer in adapters.items()}
        saw_rank_one |= 1 in ranks_before.values()
        saw_zero_slot |= any(layer.live_lambda().eq(0).any().item() for layer in adapters.values())
        scores = reference_scores(adapters, rank_one)
        order = {k: i for i, k in enumerate(adapters)}
        shrink_expected = sorted((k for k in adapters if ranks_before[k] > 1), key=lambda k: (scores[k], order[k]))[:3]
        grow_pool = [k for k in adapters if k not in shrink_expected and ranks_before[k] < 8]
        grow_expected = sorted(grow_pool, key=lambda k: (-scores[k], order[k]))[:3]
        assert sorted(plan.prune) == sorted(shrink_expected)
        assert sorted(plan.grow) == sorted(grow_expected)
        for name in plan.prune:
            lam = adapters[name].live_lambda()
            assert plan.prune[name] == [int(torch.argmin(lam.abs()))], "must prune the smallest |lambda|"
        if rank_one == "reference":
            assert not any(ranks_before[k] == 1 for k in plan.prune)
            ones = [k for k in adapters if ranks_before[k] == 1 and k not in plan.prune]
            assert all(k in plan.grow for k in ones[:3]), "rank-1 matrices are first in line to grow"
        changes = apply_plan(adapters, plan, grow_rng)
        allocator.on_applied(changes)
        fresh = {k: adapters[k].live_rank - 1 for k in plan.grow}
        ranks = [layer.live_rank for layer in adapters.values()]
        assert sum(ranks) == n * r0
        assert all(1 <= r <= 8 for r in ranks)
        assert all(layer.mask.tolist() == [i < layer.live_rank for i in range(8)] for layer in adapters.values())
    assert events == list(range(12, 990, 2)), "events at t_init < t < T - t_final, (t - t_init) % delta_t == 0"
    assert saw_zero_slot
    if rank_one == "zero":
        assert saw_rank_one, "under rank_one=zero some matrix should reach rank 1"
    assert len({layer.live_rank for layer in adapters.values()}) > 1


def test_rank_one_rule_on_one_event():
    adapters = fake_adapters(n=6)
    with torch.no_grad():
        for i, layer in enumerate(adapters.values()):
            layer.lora_E.zero_()
            layer.lora_E[:4] = torch.tensor([1.0, 0.9, 0.8, 0.7 - 0.1 * i])
    first = next(iter(adapters.values()))
    while first.live_rank > 1:
        first.prune(first.live_rank - 1)
    ref = flex(adapters, rank_one="reference", budget_per_event=1).plan(adapters, 12)
    zero = flex(adapters, rank_one="zero", budget_per_event=1).plan(adapters, 12)
    name = next(iter(adapters))
    assert ref.grow == {name: 1} and ref.importance[name] is None  # undefined score, logged as None
    assert name not in zero.grow and zero.importance[name] == 0.0 and name not in zero.prune


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
        adapters[name].grow(GrowSpec(), None)
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
