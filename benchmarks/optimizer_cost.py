"""The fixed per-step cost of allocation: SlotAdamW next to torch's AdamW, and the orthogonality penalty.

On the 36 adapted matrices of MiniLM (6 layers x q, k, v, attention-out 384x384, FFN-in 384->1536, FFN-out
1536->384; SVD form, r0 = 8) plus a 384 -> 2 head, at slot capacity 1x r0 (static LoRA: every slot live, so
AdamW runs over exactly the same parameters), 2x and 4x r0:

* ``slot_adamw``: ``SlotAdamW.step`` with every live slot at one step count (LoRA; a dynamic method before its
  first event);
  ``slot_adamw_mixed_counts``: the same after an event restarted the counts of some slots (per-slot factors);
* ``adamw_foreach``: ``torch.optim.AdamW(foreach=True)`` over the same shapes (full capacity: it has no notion of
  live slots), the reference of the ratio; ``adamw_foreach_r0``: the same over tensors of capacity r0 (static
  LoRA's parameters), for scale;
* ``penalty_fwd_bwd``: ``orthogonality_penalty`` (code form) forward + backward, all matrices at live rank r0,
  and ``penalty_fwd_bwd_mixed_ranks`` with live ranks spread over 1 .. capacity (FlexLoRA after events);
  gradients accumulate over the calls, as with the loss's in a training step.

Single-threaded, interleaved in rotating order in one process, medians (``benchmarks.harness``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmarks.harness import Bench, machine, paired_ratios, round_medians, run_rounds, sample_stats
from benchmarks.slots import layer_shapes, synthetic_adapters
from flexlora.adapters import SlotLoRALayer, orthogonality_penalty
from flexlora.optim import SlotAdamW, reset_layer_slots

MINILM = (
    ("attention.self.query", 384, 384),
    ("attention.self.key", 384, 384),
    ("attention.self.value", 384, 384),
    ("attention.output.dense", 384, 384),
    ("intermediate.dense", 384, 1536),
    ("output.dense", 1536, 384),
)
MINILM_LAYERS = 6
RANK = 8
CAPACITIES = (1, 2, 4)  # slot capacity as a multiple of r0
OPTIMIZERS = ("slot_adamw", "slot_adamw_mixed_counts", "adamw_foreach", "adamw_foreach_r0")
PENALTIES = ("penalty_fwd_bwd", "penalty_fwd_bwd_mixed_ranks")


def adapters_with_head(capacity: int, seed: int) -> tuple[dict[str, SlotLoRALayer], list[nn.Parameter]]:
    """MiniLM-shaped SVD adapters (live rank r0, random gradients) and a 384 -> 2 head with gradients."""
    adapters = synthetic_adapters(layer_shapes(MINILM, MINILM_LAYERS), rank=RANK, max_rank=capacity * RANK, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    head = [nn.Parameter(torch.randn(2, 384, generator=generator) * 0.02), nn.Parameter(torch.zeros(2))]
    for param in head:
        param.grad = torch.randn(param.shape, generator=generator) * 1e-3
    return adapters, head


def slot_parameters(adapters: dict[str, SlotLoRALayer], head: list[nn.Parameter]) -> list[nn.Parameter]:
    return [p for layer in adapters.values() for p, _ in layer.slot_params()] + head


def mixed_counts_optimizer(capacity: int, seed: int) -> SlotAdamW:
    """A SlotAdamW whose slots no longer share one step count: after 3 steps, every third matrix had two of
    its slots restarted (what an event's surgery leaves), then one more step."""
    adapters, head = adapters_with_head(capacity, seed)
    optimizer = SlotAdamW(slot_parameters(adapters, head))
    for _ in range(3):
        optimizer.step()
    for layer in list(adapters.values())[::3]:
        reset_layer_slots(optimizer, layer, [1, RANK - 1])
    optimizer.step()
    return optimizer


def adamw(capacity: int, seed: int) -> torch.optim.AdamW:
    """torch's AdamW (foreach) over untagged copies of the adapters' and head's tensors, with their gradients."""
    plain = []
    for source in slot_parameters(*adapters_with_head(capacity, seed)):
        plain.append(nn.Parameter(source.detach().clone()))
        plain[-1].grad = source.grad.clone()
    return torch.optim.AdamW(plain, lr=1e-3, weight_decay=0.01, foreach=True)


def optimizer_benches(capacity: int, seed: int) -> dict[str, Bench]:
    slot = SlotAdamW(slot_parameters(*adapters_with_head(capacity, seed)), lr=1e-3, weight_decay=0.01)
    return {
        "slot_adamw": Bench(slot.step),
        "slot_adamw_mixed_counts": Bench(mixed_counts_optimizer(capacity, seed).step),
        "adamw_foreach": Bench(adamw(capacity, seed).step),
        "adamw_foreach_r0": Bench(adamw(1, seed).step),
    }


def penalty_benches(capacity: int, seed: int) -> dict[str, Bench]:
    uniform, _ = adapters_with_head(capacity, seed)
    mixed, _ = adapters_with_head(capacity, seed + 2)
    generator = torch.Generator().manual_seed(seed + 3)
    for layer in mixed.values():  # live ranks spread over 1 .. capacity, as after FlexLoRA events
        layer.live.count = int(torch.randint(1, capacity * RANK + 1, (1,), generator=generator))
        layer.mask.copy_(torch.arange(layer.max_rank) < layer.live.count)

    def penalty(adapters: dict[str, SlotLoRALayer]) -> Any:
        return lambda: orthogonality_penalty(adapters.values(), "code").backward()

    return {"penalty_fwd_bwd": Bench(penalty(uniform)), "penalty_fwd_bwd_mixed_ranks": Bench(penalty(mixed))}


def bench_optimizer_cost(quick: bool) -> dict[str, Any]:
    """Medians (ms per call) of the optimizer steps and the penalty at capacities 2x and 4x r0, and the
    SlotAdamW / AdamW ratios (paired per round: same round, rotated order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rounds, calls = (6, 10) if quick else (40, 20)
    try:
        benches: dict[tuple[int, str], Bench] = {}
        for capacity in CAPACITIES:
            for name, bench in {
                **optimizer_benches(capacity, seed=capacity),
                **penalty_benches(capacity, seed=capacity),
            }.items():
                benches[(capacity, name)] = bench
        groups = [[(c, name) for name in OPTIMIZERS] for c in CAPACITIES]
        groups += [[(c, name) for c in CAPACITIES for name in PENALTIES]]
        samples = run_rounds(benches, groups, rounds, calls)
    finally:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {
        "setup": {
            "shapes": "MiniLM: 6 x (q, k, v, attn-out 384x384, FFN-in 384->1536, FFN-out 1536->384), 384->2 head",
            "matrices": MINILM_LAYERS * len(MINILM),
            "rank": RANK,
            "capacities": [c * RANK for c in CAPACITIES],
            "rounds": rounds,
            "calls_per_round": calls,
            "threads": 1,
            "machine": machine(),
            "timer": "torch.utils.benchmark.Timer.timeit, a block of calls_per_round calls per round; wall and CPU ms",
        }
    }
    for capacity in CAPACITIES:
        entry: dict[str, Any] = {key: sample_stats(samples[(capacity, key)]) for key in OPTIMIZERS + PENALTIES}
        for key in ("slot_adamw", "slot_adamw_mixed_counts"):
            for reference in ("adamw_foreach", "adamw_foreach_r0"):
                entry[key][f"ratio_vs_{reference}"] = paired_ratios(
                    round_medians(samples[(capacity, key)]), round_medians(samples[(capacity, reference)])
                )
        out[f"capacity_{capacity * RANK}"] = entry
    return out


def summary(results: dict[str, Any]) -> str:
    lines = []
    for capacity in CAPACITIES:
        entry = results[f"capacity_{capacity * RANK}"]
        ms = {key: entry[key]["ms_median"] for key in OPTIMIZERS + PENALTIES}
        lines.append(
            f"capacity {capacity * RANK}: "
            + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
            + f"; SlotAdamW / AdamW {entry['slot_adamw']['ratio_vs_adamw_foreach']['median']:.3f}"
            + f" (mixed counts {entry['slot_adamw_mixed_counts']['ratio_vs_adamw_foreach']['median']:.3f})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    result = bench_optimizer_cost(args.quick)
    print(summary(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
