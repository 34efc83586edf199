"""What each method adds to a training step, piece by piece, on the trained runs' own objects.

End-to-end step ratios are limited by the machine's noise (see lora_control); the pieces are short calls
whose medians are precise. Pieces: the adapter path of every adapted layer (forward + backward at the
run's activation shapes, frozen base replaced by a zero-cost stand-in), SlotAdamW.step, the orthogonality
penalty (forward + backward), the callback's per-step work (observe + plan at a step without an event) and
one allocation event (plan + apply_event, divided by delta_t: one event per delta_t steps). The sum of the
differences to lora, over lora's step time, predicts the end-to-end ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness import Bench, GatedFit, run_rounds, sample_stats
from benchmarks.modes import LORA, Mode, StepSetup
from benchmarks.slots import SlotSnapshot, zero_base_copy
from flexlora.adapters import orthogonality_penalty
from flexlora.events import apply_event

PIECES = ("adapter_path_fwd_bwd", "optimizer_step", "orth_penalty_fwd_bwd", "callback_per_step", "event")


def _penalty(run: GatedFit) -> torch.Tensor | None:
    """The training step's penalty term (None where the run has none: LoRA, orth_reg 0)."""
    config = run.module.allocator_config
    if config.orth_reg <= 0 or config.form != "svd":
        return None
    return config.orth_reg * orthogonality_penalty(run.module.adapters.values(), config.orth_form)


def _fresh_gradients(runs: dict[str, GatedFit]) -> dict[str, torch.Size]:
    """One forward + backward per run on the same batch (what observe and the optimizer consume); returns
    the input shape of every adapted layer, recorded on the lora run."""
    batch = next(iter(runs[LORA].datamodule.train_dataloader()))
    shapes: dict[str, torch.Size] = {}
    hooks = [layer.register_forward_hook(lambda mod, inp, out, name=name: shapes.__setitem__(name, inp[0].shape))
             for name, layer in runs[LORA].module.adapters.items()]
    try:
        for run in runs.values():
            module = run.module
            module.train()
            module.zero_grad(set_to_none=True)
            loss = module.family.training_loss(module.model, batch)
            penalty = _penalty(run)
            (loss if penalty is None else loss + penalty).backward()
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _event_steps(run: GatedFit, delta_t: int) -> tuple[int, int]:
    """(a step without an event, the last event step) of the run's allocator window."""
    allocator = run.allocation.allocator
    assert allocator is not None and allocator.total_steps is not None
    window = range(allocator.t_init + 1, allocator.total_steps - allocator.t_final)
    event = next((t for t in reversed(window) if (t - allocator.t_init) % delta_t == 0), window[-1])
    return event - 1, event


def _benches(run: GatedFit, shapes: dict[str, torch.Size], delta_t: int, seed: int) -> dict[str, Bench]:
    """The five pieces of one run as benches."""
    module, allocation = run.module, run.allocation
    allocator, optimizers = allocation.allocator, run.trainer.optimizers
    quiet_step, event_step = _event_steps(run, delta_t)
    layers = [zero_base_copy(layer) for layer in module.adapters.values()]
    generator = torch.Generator().manual_seed(seed)  # the same inputs and output gradients for every run
    inputs = [torch.randn(shape, generator=generator) for shape in shapes.values()]
    grads = [torch.randn(*x.shape[:-1], layer.out_features, generator=generator)
             for x, layer in zip(inputs, layers, strict=True)]

    def adapter_path() -> None:
        for layer, x, grad in zip(layers, inputs, grads, strict=True):
            layer(x.detach().requires_grad_(True)).backward(grad)

    def penalty() -> None:
        term = _penalty(run)
        if term is not None:
            term.backward()

    def per_step_callback() -> None:
        allocator.observe(module.adapters, quiet_step)
        assert allocator.plan(module.adapters, quiet_step) is None

    snapshot = SlotSnapshot(module.adapters, optimizers)

    def event() -> None:
        plan = allocator.plan(module.adapters, event_step)
        if plan is not None and not plan.is_empty():
            snapshot.mark(plan)
            apply_event(module.adapters, plan, optimizers, allocation.generator, allocator)

    pieces: dict[str, Callable[[], Any]] = {
        "adapter_path_fwd_bwd": adapter_path, "optimizer_step": optimizers[0].step,
        "orth_penalty_fwd_bwd": penalty, "callback_per_step": per_step_callback,
    }
    benches = {key: Bench(fn) for key, fn in pieces.items()}
    benches["event"] = Bench(event, restore=snapshot.restore)
    return benches


def step_components(mode: Mode, setup: StepSetup, runs: dict[str, GatedFit], lora_ms_per_step: float) -> dict[str, Any]:
    """Medians of the pieces, interleaved across runs; extra vs lora and the predicted ratio per method."""
    shapes = _fresh_gradients(runs)
    benches = {(piece, name): bench for name, run in runs.items()
               for piece, bench in _benches(run, shapes, setup.delta_t, seed=0).items()}
    groups = [[(piece, name) for name in runs] for piece in PIECES]
    samples = run_rounds(benches, groups, mode.component_rounds, mode.component_calls)
    out: dict[str, Any] = {
        "what": "ms per call (wall, medians); event_per_step = event / delta_t; extra = method minus lora",
        "lora_ms_per_step": lora_ms_per_step, "rounds": mode.component_rounds, "calls_per_round": mode.component_calls,
    }
    for name, run in runs.items():
        stats = {piece: sample_stats(samples[(piece, name)]) for piece in PIECES}
        ms = {piece: s["ms_median"] for piece, s in stats.items()}
        dynamic = run.allocation.allocator is not None and run.allocation.allocator.dynamic
        event_ms = ms.pop("event") if dynamic else 0.0  # a static allocator's plan is a no-op
        ms.pop("event", None)
        ms["event_per_step"] = event_ms / setup.delta_t
        out[name] = {"ms": ms, "event_ms": event_ms, "cpu_ms": {p: s["cpu_ms_median"] for p, s in stats.items()}}
    for name in runs:
        if name == LORA:
            continue
        entry = out[name]
        extra = {k: entry["ms"][k] - out[LORA]["ms"][k] for k in entry["ms"]}
        no_adapter_path = sum(v for k, v in extra.items() if k != "adapter_path_fwd_bwd")
        entry.update(extra_vs_lora_ms=extra, extra_vs_lora_ms_total=sum(extra.values()),
                     predicted_ratio_vs_lora=1 + sum(extra.values()) / lora_ms_per_step,
                     predicted_ratio_vs_lora_without_adapter_path=1 + no_adapter_path / lora_ms_per_step)
    return out
