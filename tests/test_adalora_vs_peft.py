"""AdaLoRA cross-check: peft's RankAllocator is the reference for scores, budgets and masks."""

from __future__ import annotations

import pytest
import torch
from peft import AdaLoraConfig
from peft.tuners.adalora.layer import RankAllocator
from torch import nn

from flexlora.adapters import SlotLoRALayer, apply_plan
from flexlora.allocators import AdaLoRAAllocator, build_allocator

N, R0, TARGET, T, T_INIT, T_FINAL, DELTA = 6, 4, 2, 40, 5, 10, 3
SHAPES = [(6, 5), (6, 7), (5, 6), (8, 6), (6, 6), (7, 5)]


class PeftShaped(nn.Module):
    """Parameters named as peft names them (``...lora_A.default``), with peft's shapes (E is (r, 1))."""

    def __init__(self) -> None:
        super().__init__()
        self.mods = nn.ModuleList()
        for d_in, d_out in SHAPES:
            m = nn.Module()
            m.lora_A = nn.ParameterDict({"default": nn.Parameter(torch.zeros(R0, d_in))})
            m.lora_E = nn.ParameterDict({"default": nn.Parameter(torch.zeros(R0, 1))})
            m.lora_B = nn.ParameterDict({"default": nn.Parameter(torch.zeros(d_out, R0))})
            self.mods.append(m)


@pytest.fixture
def pair():
    ours = {f"mods.{i}": SlotLoRALayer(nn.Linear(d_in, d_out), form="svd", rank=R0) for i, (d_in, d_out) in
            enumerate(SHAPES)}
    ref_model = PeftShaped()
    config = AdaLoraConfig(init_r=R0, target_r=TARGET, tinit=T_INIT, tfinal=T_FINAL, deltaT=DELTA, total_step=T,
                           beta1=0.85, beta2=0.85, target_modules=["x"])
    reference = RankAllocator(ref_model, config, "default")
    allocator = build_allocator({"name": "adalora", "rank": R0, "target_rank": TARGET, "t_init": T_INIT,
                                 "t_final": T_FINAL, "delta_t": DELTA})
    assert isinstance(allocator, AdaLoRAAllocator)
    allocator.bind(ours, T)
    return ours, ref_model, reference, allocator


def peft_triplet_scores(reference: RankAllocator, ref_model: PeftShaped) -> list[torch.Tensor]:
    """Triplet scores from peft's own element scores and combination rule."""
    out = []
    for i in range(N):
        s_a = reference._element_score(f"mods.{i}.lora_A.default").mean(dim=1, keepdim=True)
        s_b = reference._element_score(f"mods.{i}.lora_B.default").mean(dim=0).view(-1, 1)
        s_e = reference._element_score(f"mods.{i}.lora_E.default")
        out.append(reference._combine_ipt(s_e, torch.cat([s_a, s_b], dim=1)))
    return out


def test_scores_budgets_and_masks_match_peft(pair):
    ours, ref_model, reference, allocator = pair
    generator = torch.Generator().manual_seed(0)
    masked_steps = 0
    for step in range(1, T + 1):
        # identical weights and gradients on both sides
        for i, layer in enumerate(ours.values()):
            ref = ref_model.mods[i]
            for name in ("lora_A", "lora_E", "lora_B"):
                ours_p = getattr(layer, name)
                ref_p = getattr(ref, name)["default"]
                value = torch.randn(ref_p.shape, generator=generator)
                grad = torch.randn(ref_p.shape, generator=generator) * (1 + i)
                with torch.no_grad():
                    ref_p.copy_(value)
                    ours_p.copy_(value.view(ours_p.shape))
                ref_p.grad = grad.clone()
                ours_p.grad = grad.clone().view(ours_p.shape)
        allocator.observe(ours, step)
        force = step == T - T_FINAL
        if step <= T - T_FINAL:
            budget, pattern = reference.update_and_allocate(ref_model, step, force_mask=force)
        else:
            budget, pattern = reference.budget_schedule(step)[0], None
        ours_budget, _ = allocator.budget(step)
        assert ours_budget == budget, f"budget differs at step {step}"
        if step < T - T_FINAL:
            expected = peft_triplet_scores(reference, ref_model)
            for i, (name, layer) in enumerate(ours.items()):
                torch.testing.assert_close(allocator.tracker.triplet_scores(name, layer), expected[i].view(-1),
                                           rtol=1e-6, atol=1e-9)
        plan = allocator.plan(ours, step)
        assert (plan is not None) == (pattern is not None), f"masking step differs at {step}"
        if plan is None:
            continue
        masked_steps += 1
        apply_plan(ours, plan, None)
        for i, (name, layer) in enumerate(ours.items()):
            keep = torch.tensor(pattern[f"mods.{i}.lora_E.default"])
            if step == T - T_FINAL:  # final pattern: the slots peft keeps are exactly ours, now a live prefix
                assert sorted(plan.prune[name]) == torch.nonzero(~keep).flatten().tolist(), f"final mask: {name}"
                assert layer.live_rank == int(keep.sum())
            else:  # soft mask: lambda zeroed, slot alive
                assert torch.equal(layer.lora_E.detach() != 0, keep), f"soft mask differs for {name} at {step}"
                assert layer.mask.all()
    assert masked_steps == len([t for t in range(T_INIT + 1, T - T_FINAL) if t % DELTA == 0]) + 1
    assert sum(layer.live_rank for layer in ours.values()) == N * TARGET


def test_final_phase_freezes_scores(pair):
    ours, _, _, allocator = pair
    for layer in ours.values():
        for p in (layer.lora_A, layer.lora_E, layer.lora_B):
            p.grad = torch.ones_like(p)
    allocator.observe(ours, 1)
    snapshot = {k: v.clone() for k, v in allocator.tracker.ipt_avg.items()}
    allocator.observe(ours, T - T_FINAL)  # no update from the final step on
    assert all(torch.equal(snapshot[k], v) for k, v in allocator.tracker.ipt_avg.items())
