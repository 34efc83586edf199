"""The orthogonality penalty with one batched matmul per shape group, measured against the package's penalty.

A rejected alternative kept runnable as evidence (issue "allocation at plain LoRA's cost" asked for one batched op
per shape group): the grams of all matrices with the same live rank and the same A / B shape are one
``torch.bmm`` over stacked live prefixes. MiniLM's 36 SVD adapters (r0 8) at capacity 2x and 4x r0, all at r0
("uniform", AdaLoRA before its first event) and with live ranks spread over 1 .. capacity ("mixed", FlexLoRA after
events: many groups of one matrix); forward + backward, one thread, interleaved rounds, paired ratios.

    python -m benchmarks.penalty_batched [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.harness import Bench, machine, paired_ratios, round_medians, run_rounds, sample_stats
from benchmarks.optimizer_cost import RANK, adapters_with_head
from flexlora.adapters import SlotLoRALayer, orthogonality_penalty


def penalty_batched(layers: Sequence[SlotLoRALayer]) -> torch.Tensor:
    """The code form of ``orthogonality_penalty`` with one bmm per (A or B, live rank, width) group."""
    groups: dict[tuple[str, int, int], list[SlotLoRALayer]] = {}
    for layer in layers:
        rank = layer.live_rank
        if rank:
            groups.setdefault(("A", rank, layer.lora_A.shape[1]), []).append(layer)
            groups.setdefault(("B", rank, layer.lora_B.shape[0]), []).append(layer)
    terms = []
    for (kind, rank, _), members in groups.items():
        if kind == "A":
            stacked = torch.stack([m.lora_A[:rank] for m in members])
            grams = torch.bmm(stacked, stacked.transpose(1, 2))
        else:
            stacked = torch.stack([m.lora_B[:, :rank] for m in members])
            grams = torch.bmm(stacked.transpose(1, 2), stacked)
        terms.append(torch.linalg.matrix_norm(grams - torch.eye(rank), ord="fro"))
    values = torch.cat(terms)
    empty = 2 * sum(1 for layer in layers if layer.live_rank == 0)
    return values.sum() / (values.numel() + empty)


def penalty_hybrid(layers: Sequence[SlotLoRALayer]) -> torch.Tensor:
    """Like the package's penalty (grams stacked per live rank, one norm per rank), but the grams of a shape
    group of two or more matrices come from one bmm, a single matrix's from one mm."""
    by_rank: dict[int, list[SlotLoRALayer]] = {}
    for layer in layers:
        by_rank.setdefault(layer.live_rank, []).append(layer)
    terms = []
    for rank, members in by_rank.items():
        if rank == 0:
            continue
        shapes: dict[tuple[str, int], list[SlotLoRALayer]] = {}
        for m in members:
            shapes.setdefault(("A", m.lora_A.shape[1]), []).append(m)
            shapes.setdefault(("B", m.lora_B.shape[0]), []).append(m)
        grams = []
        for (kind, _), group in shapes.items():
            mats = [m.lora_A[:rank] if kind == "A" else m.lora_B[:, :rank].t() for m in group]
            if len(mats) == 1:
                grams.append((mats[0] @ mats[0].t()).unsqueeze(0))
            else:
                stacked = torch.stack(mats)
                grams.append(torch.bmm(stacked, stacked.transpose(1, 2)))
        terms.append(torch.linalg.matrix_norm(torch.cat(grams) - torch.eye(rank), ord="fro"))
    values = torch.cat(terms)
    empty = 2 * len(by_rank.get(0, []))
    return values.sum() / (values.numel() + empty)


def bench(rounds: int = 20, calls: int = 20) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    benches: dict[tuple[int, str, str], Bench] = {}
    out: dict[str, Any] = {"setup": {"rounds": rounds, "calls_per_round": calls, "threads": 1, "machine": machine()}}
    try:
        for capacity in (2, 4):
            uniform, _ = adapters_with_head(capacity, capacity)
            mixed, _ = adapters_with_head(capacity, capacity + 2)
            generator = torch.Generator().manual_seed(capacity + 3)
            for layer in mixed.values():
                layer.live.count = int(torch.randint(1, capacity * RANK + 1, (1,), generator=generator))
                layer.mask.copy_(torch.arange(layer.max_rank) < layer.live.count)
            for name, adapters in (("uniform", uniform), ("mixed", mixed)):
                layers = list(adapters.values())
                with torch.no_grad():
                    reference = orthogonality_penalty(layers, "code")
                    out[f"capacity_{capacity * RANK}_{name}"] = {
                        f"{variant}_abs_value_difference": float((reference - fn(layers)).abs())
                        for variant, fn in (("batched", penalty_batched), ("hybrid", penalty_hybrid))
                    }
                benches[(capacity, name, "current")] = Bench(lambda ls=layers: orthogonality_penalty(ls).backward())
                benches[(capacity, name, "batched")] = Bench(lambda ls=layers: penalty_batched(ls).backward())
                benches[(capacity, name, "hybrid")] = Bench(lambda ls=layers: penalty_hybrid(ls).backward())
        groups = [[(c, n, k) for k in ("current", "batched", "hybrid")] for c in (2, 4) for n in ("uniform", "mixed")]
        samples = run_rounds(benches, groups, rounds, calls)
    finally:
        torch.set_num_threads(threads)
    for capacity in (2, 4):
        for name in ("uniform", "mixed"):
            current = samples[(capacity, name, "current")]
            entry = out[f"capacity_{capacity * RANK}_{name}"]
            entry["current_ms"] = sample_stats(current)["ms_median"]
            for variant in ("batched", "hybrid"):
                mine = samples[(capacity, name, variant)]
                entry[f"{variant}_ms"] = sample_stats(mine)["ms_median"]
                entry[f"{variant}_vs_current"] = paired_ratios(round_medians(mine), round_medians(current))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    result = bench()
    for key, entry in result.items():
        if key != "setup":
            print(key, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in entry.items()})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
