"""IncreLoRA, the fourth method: its equations against hand-computed values, the recovered dL/d(dW) against
autograd, the growth schedule and the budget, and the registry that makes a method selectable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from flexlora.adapters import SlotLoRALayer, apply_plan
from flexlora.adapters.delta_grad import DeltaGradRecorder
from flexlora.allocators import build_allocator
from flexlora.allocators import increlora as incre
from flexlora.allocators.config import load_methods
from flexlora.errors import FlexLoRAError

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_score_is_sum_of_abs_update_times_gradient_over_sqrt_numel():
    delta = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    grad = torch.tensor([[0.5, 0.5], [1.0, -1.0]])
    assert incre.delta_score(delta, grad) == pytest.approx((0.5 + 1.0 + 0.0 + 3.0) / 2.0)  # 2.25


class StubRecorder:
    def __init__(self, names):
        self.names = names

    def pop(self, name):
        return torch.ones(1)

    def clear(self):
        pass


def _adapters(n=6, init_rank=1, max_rank=8):
    torch.manual_seed(0)
    return {f"m{i}": SlotLoRALayer(nn.Linear(6, 5), form="svd", rank=4, init_rank=init_rank, max_rank=max_rank)
            for i in range(n)}


def _allocator(adapters, total=100, **overrides):
    cfg = {"name": "increlora", "rank": 4, "init_rank": 1, "top_h": 2, "add_rank": 2, "t_init": 10, "t_final": 10,
           "delta_t": 10, **overrides}
    allocator = build_allocator(cfg)
    allocator.bind(adapters, total)
    allocator.connect(delta_grad=StubRecorder(list(adapters)))
    return allocator


def test_smoothed_score_follows_the_ema_equations(monkeypatch):
    adapters = _adapters(n=1)
    allocator = _allocator(adapters, top_h=1)
    scores = iter([1.0, 2.0])
    monkeypatch.setattr(incre, "delta_score", lambda delta, grad: next(scores))
    allocator.observe(adapters, 1)  # Ibar = .15, Ubar = .15 * |1 - .15| = .1275
    assert allocator.importance(adapters)["m0"] == pytest.approx(0.15 * 0.1275)  # 0.019125
    allocator.observe(adapters, 2)  # Ibar = .4275, Ubar = .85 * .1275 + .15 * |2 - .4275| = .34425
    assert allocator.importance(adapters)["m0"] == pytest.approx(0.4275 * 0.34425)  # 0.147166875


def test_recorded_delta_gradient_equals_autograd_on_an_explicit_update():
    torch.manual_seed(1)
    layer = SlotLoRALayer(nn.Linear(5, 3), form="svd", rank=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_E.normal_()
    recorder = DeltaGradRecorder({"m": layer})
    inputs = [torch.randn(4, 2, 5), torch.randn(3, 2, 5)]  # two micro-batches: the step's gradient is their sum
    for x in inputs:
        (layer(x) ** 2).sum().backward()
    got = recorder.pop("m")

    delta = layer.delta_weight().detach().clone().requires_grad_(True)
    for x in inputs:
        y = nn.functional.linear(x, layer.base.weight + delta, layer.base.bias)
        (y**2).sum().backward()
    assert got is not None and torch.allclose(got, delta.grad, atol=1e-5, rtol=1e-5)
    recorder.close()
    (layer(inputs[0]) ** 2).sum().backward()
    assert recorder.pop("m") is None, "closed: no hooks left"


def test_each_event_grows_the_top_h_best_scored_matrices_and_the_run_ends_on_the_budget():
    adapters = _adapters()
    allocator = _allocator(adapters)
    allocator.ipt = {f"m{i}": float(i) for i in range(6)}
    allocator.unc = {f"m{i}": 1.0 for i in range(6)}
    assert allocator.event_steps() == [20, 30, 40, 50, 60, 70, 80]
    plan = allocator.plan(adapters, 20)
    assert plan.grow == {"m5": 2, "m4": 2} and plan.budget == 24
    assert plan.grow_spec.kind == "zero_impact" and plan.grow_spec.std == 0.02
    assert allocator.plan(adapters, 25) is None  # not an event step
    apply_plan(adapters, plan, torch.Generator().manual_seed(0))
    for step in allocator.event_steps()[1:]:
        plan = allocator.plan(adapters, step)
        if plan is not None:
            apply_plan(adapters, plan, torch.Generator().manual_seed(step))
    assert sum(layer.live_rank for layer in adapters.values()) == 24  # n x rank, exactly
    assert all(layer.live_rank <= layer.max_rank for layer in adapters.values())
    assert not allocator.still_requires("delta_grad")


def test_a_schedule_too_short_to_reach_the_budget_is_refused():
    with pytest.raises(FlexLoRAError, match="needs 5 events"):
        _allocator(_adapters(), total=50)  # window (10, 40): events at 20 and 30 only


def test_every_registered_method_has_a_yaml_and_a_budget_entry_in_every_preset():
    methods = load_methods()
    assert {"lora", "adalora", "flexlora", "increlora"} <= set(methods)
    budgets = sorted((CONF / "budget").glob("*.yaml"))
    for name, method in methods.items():
        text = yaml.safe_load((CONF / "allocator" / f"{name}.yaml").read_text())
        assert text["name"] == name and f"{name}_schema" in text["defaults"]
        assert method.policy_class() is type(build_allocator({"name": name}))
        for budget in budgets:
            assert name in yaml.safe_load(budget.read_text())["budget"], f"{budget.name} has no {name} entry"
