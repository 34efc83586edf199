"""Allocator calls on the 72 matrices of DeBERTa-v3-base, without a backbone, next to peft's AdaLoRA.

* ``flexlora_event``: ``FlexLoRAAllocator.plan`` + ``flexlora.events.apply_event`` (apply, optimizer-state
  surgery on a SlotAdamW that has stepped once, tracker update), restored untimed between calls.
* ``adalora_scoring``: ``observe`` + ``plan`` at a step without masking (what every AdaLoRA step costs);
  ``adalora_masking_step``: ``observe`` + ``plan`` + ``apply_event`` at a soft-masking step.
* ``peft_scoring`` / ``peft_masking_step``: peft's ``RankAllocator.update_and_allocate`` on a module whose
  parameters are named as peft names them, holding the same values and gradients.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from benchmarks.config import allocator_values
from benchmarks.harness import Bench, median, quartiles, round_medians, run_rounds, sample_stats
from benchmarks.modes import ADALORA, FLEXLORA, Mode
from benchmarks.slots import DEBERTA_V3_BASE, DEBERTA_V3_BASE_LAYERS, SlotSnapshot, layer_shapes, synthetic_adapters
from flexlora.adapters import SlotLoRALayer
from flexlora.allocators import AdaLoRAAllocator, FlexLoRAAllocator, build_allocator
from flexlora.events import apply_event
from flexlora.optim import SlotAdamW

TOTAL_STEPS = 1000
CALLS = ("flexlora_event", "adalora_scoring", "peft_scoring", "adalora_masking_step", "peft_masking_step")


def stepped_optimizer(adapters: Mapping[str, SlotLoRALayer]) -> SlotAdamW:
    """A SlotAdamW over the adapters that has stepped once: surgery has moments and step counts to move."""
    optimizer = SlotAdamW([p for layer in adapters.values() for p, _ in layer.slot_params()])
    optimizer.step()
    return optimizer


def flexlora_event(allocator: FlexLoRAAllocator, adapters: dict[str, SlotLoRALayer], optimizer: SlotAdamW,
                   step: int, phases: dict[str, list[float]]) -> Bench:
    """One event as the callback runs it; ``phases`` collects the wall time of plan and apply_event."""
    snapshot = SlotSnapshot(adapters, [optimizer])
    generator = torch.Generator().manual_seed(7919)
    clock = time.perf_counter

    def event() -> None:
        t0 = clock()
        plan = allocator.plan(adapters, step)
        t1 = clock()
        assert plan is not None
        snapshot.mark(plan)
        apply_event(adapters, plan, [optimizer], generator, allocator)
        phases["plan"].append(t1 - t0)
        phases["apply_event"].append(clock() - t1)

    return Bench(event, restore=snapshot.restore)


def peft_shaped(adapters: Mapping[str, SlotLoRALayer]) -> nn.Module:
    """A module whose parameters peft's RankAllocator sees as AdaLoRA's (``...lora_A.default`` etc.),
    holding the same values and gradients as ``adapters`` (lora_E as peft's (r, 1))."""
    root = nn.Module()
    for name, layer in adapters.items():
        holder = nn.Module()
        for pname in ("lora_A", "lora_E", "lora_B"):
            ours = getattr(layer, pname)
            shape = (ours.shape[0], 1) if pname == "lora_E" else tuple(ours.shape)
            param = nn.Parameter(ours.detach().clone().view(shape))
            param.grad = ours.grad.clone().view(shape)
            setattr(holder, pname, nn.ParameterDict({"default": param}))
        parent = root
        parts = f"base_model.model.deberta.encoder.layer.{name}".split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], holder)
    return root


def _adalora_steps(ada: AdaLoRAAllocator) -> tuple[int, int]:
    """(a scoring step, a masking step in the second half of the budget phase, where the budget has shrunk)."""
    mask_step = next(t for t in range(ada.t_init + 1, TOTAL_STEPS) if ada.budget(t)[1]
                     and ada.budget(t)[0] < ada.initial_budget and t >= (ada.t_init + ada.final_step) // 2)
    assert not ada.budget(mask_step + 1)[1]
    return mask_step + 1, mask_step


def _adalora_benches(ada: AdaLoRAAllocator, adapters: dict[str, SlotLoRALayer]) -> tuple[dict[str, Bench], dict]:
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import RankAllocator

    normal_step, mask_step = _adalora_steps(ada)
    optimizer = stepped_optimizer(adapters)
    peft_model = peft_shaped(adapters)
    c = ada.config
    peft = RankAllocator(peft_model, AdaLoraConfig(
        init_r=c.rank, target_r=c.target_rank, tinit=ada.t_init, tfinal=ada.t_final, deltaT=c.delta_t,
        total_step=TOTAL_STEPS, beta1=c.beta1, beta2=c.beta2, target_modules=["query_proj"]), "default")
    assert peft.init_bgt == ada.initial_budget and peft.budget_schedule(mask_step) == ada.budget(mask_step)

    def scoring() -> None:
        ada.observe(adapters, normal_step)
        assert ada.plan(adapters, normal_step) is None

    def masking() -> None:
        ada.observe(adapters, mask_step)
        plan = ada.plan(adapters, mask_step)
        assert plan is not None
        apply_event(adapters, plan, [optimizer], None, ada)  # soft masking: no rank change, no surgery

    def peft_call(step: int, masks: bool) -> Callable[[], None]:
        def call() -> None:
            _, pattern = peft.update_and_allocate(peft_model, step)
            assert (pattern is not None) == masks
        return call

    benches = {"adalora_scoring": Bench(scoring), "peft_scoring": Bench(peft_call(normal_step, False)),
               "adalora_masking_step": Bench(masking), "peft_masking_step": Bench(peft_call(mask_step, True))}
    setup = {"rank": c.rank, "target_rank": c.target_rank, "T": TOTAL_STEPS, "t_init": ada.t_init,
             "t_final": ada.t_final, "delta_t": c.delta_t, "scoring_step": normal_step, "masking_step": mask_step,
             "budget_at_masking_step": ada.budget(mask_step)[0], "initial_budget": ada.initial_budget}
    return benches, setup


def bench_allocator_cost(mode: Mode) -> dict[str, Any]:
    shapes = layer_shapes(DEBERTA_V3_BASE, DEBERTA_V3_BASE_LAYERS)
    # FlexLoRA as conf/allocator/flexlora.yaml (r0 8, default capacity, 4 matrices shrunk and 4 grown per event)
    flex = build_allocator(allocator_values(f"allocator={FLEXLORA}", "allocator.t_init=0", "allocator.t_final=0"))
    assert isinstance(flex, FlexLoRAAllocator)
    flex_ad = synthetic_adapters(shapes, rank=flex.config.rank, max_rank=flex.config.max_rank, seed=1)
    flex.bind(flex_ad, TOTAL_STEPS)
    flex_step = flex.event_steps()[len(flex.event_steps()) // 2]
    phases: dict[str, list[float]] = {"plan": [], "apply_event": []}
    # AdaLoRA as conf/allocator/adalora.yaml with the default budget: r0 12 -> target 8, t_init 0.1 T, t_final 0.2 T
    ada = build_allocator(allocator_values(f"allocator={ADALORA}"))
    assert isinstance(ada, AdaLoRAAllocator)
    ada_ad = synthetic_adapters(shapes, rank=ada.config.rank, max_rank=ada.config.rank, seed=2)
    ada.bind(ada_ad, TOTAL_STEPS)
    benches, ada_setup = _adalora_benches(ada, ada_ad)
    benches["flexlora_event"] = flexlora_event(flex, flex_ad, stepped_optimizer(flex_ad), flex_step, phases)

    samples = run_rounds(benches, [CALLS], mode.micro_rounds, mode.micro_calls)
    out: dict[str, Any] = {"setup": {
        "shapes": "DeBERTa-v3-base: 12 layers x (q, k, v, attn-out 768x768; FFN-in 768->3072; FFN-out 3072->768)",
        "matrices": len(shapes),
        "flexlora": {"rank": flex.config.rank, "max_rank": flex.config.max_rank,
                     "budget_per_event": flex.config.budget_per_event, "step": flex_step},
        "adalora": ada_setup, "rounds": mode.micro_rounds, "calls_per_round": mode.micro_calls,
        "timer": "torch.utils.benchmark.Timer.timeit: a block of calls_per_round calls per round (flexlora_event: "
                 "one call per sample, restored in the Timer's untimed setup); wall and thread CPU time",
        "peft": "peft.tuners.adalora.layer.RankAllocator.update_and_allocate on a module with peft's "
                "parameter names, same values and gradients",
    }}
    for key in CALLS:
        out[key] = sample_stats(samples[key])
    out["flexlora_event"]["breakdown_ms"] = {k: 1e3 * median(v) for k, v in phases.items()}
    for ours, ref in (("adalora_scoring", "peft_scoring"), ("adalora_masking_step", "peft_masking_step")):
        ratios = [a / b for a, b in zip(round_medians(samples[ours]), round_medians(samples[ref]), strict=True)]
        out[ours].update(ratio_vs_peft=median(ratios), ratio_vs_peft_iqr=quartiles(ratios))
    return out
