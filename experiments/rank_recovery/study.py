"""The rank-recovery study: every method and ablation at an equal final budget, many seeds, two spectra.

    python experiments/rank_recovery/study.py --arms all --seeds 0-9 --spectra flat,decaying [--shard 0/2]
    python experiments/rank_recovery/study.py --report            # tables from the finished runs

Runs go through the framework's own train() with +experiment=rank_recovery (one process, many runs), into
multirun/rank_recovery/<spectrum>/<arm>/s<seed>/ (ignored by git); finished runs are skipped on a rerun.
The report writes results.md / results.csv beside this file: mean ± std over seeds per arm, and each arm paired
with FlexLoRA (same seed = same teacher and data): mean difference, 95 % bootstrap interval over seeds, and a
two-sided sign test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNS = REPO / "multirun" / "rank_recovery"
sys.path.insert(0, str(REPO))

# arm -> overrides (on top of +experiment=rank_recovery); every arm ends at n x 8 live slots in total
ARMS: dict[str, list[str]] = {
    "lora": ["allocator=lora"],
    "adalora": ["allocator=adalora"],
    "flexlora": ["allocator=flexlora"],
    "random": ["allocator=flexlora", "allocator.importance=random"],
    "nuclear": ["allocator=flexlora", "allocator.importance=nuclear"],
    "frobenius": ["allocator=flexlora", "allocator.importance=frobenius"],
    "sensitivity": ["allocator=flexlora", "allocator.importance=sensitivity"],
    "prune_only": ["allocator=flexlora", "allocator.direction=prune_only"],
    "grow_only": ["allocator=flexlora", "allocator.direction=grow_only"],
    "orthogonal": ["allocator=flexlora", "allocator.grow_init=orthogonal"],
    "small_value": ["allocator=flexlora", "allocator.grow_init=small_value"],
    "all_zero": ["allocator=flexlora", "allocator.grow_init=all_zero"],
    "rank_one_zero": ["allocator=flexlora", "allocator.rank_one=zero"],
    "std_1.0": ["allocator=flexlora", "allocator.grow_std=1.0"],
    "std_0.3": ["allocator=flexlora", "allocator.grow_std=0.3"],
    "std_0.1": ["allocator=flexlora", "allocator.grow_std=0.1"],
    "std_0.02": ["allocator=flexlora", "allocator.grow_std=0.02"],
    "capacity_4x": ["allocator=flexlora", "allocator.max_rank=32"],
    "std_auto": ["allocator=flexlora", "allocator.grow_std=auto"],
    "increlora": ["allocator=increlora"],
}
# the width arm (issue: new-slot scale at any width): the same problem on 512 x 512 matrices
WIDE = ["backbone.width=512"]
for _name in ("lora", "adalora", "std_0.1", "std_1.0", "std_auto"):
    ARMS[f"w512_{_name}"] = [*ARMS[_name], *WIDE]
METRICS = ("val/relative_mse", "rank/spearman", "rank/energy")


def seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def run_all(arms: list[str], seed_list: list[int], spectra: list[str], shard: tuple[int, int]) -> None:
    from flexlora.conf_store import compose
    from flexlora.train import train

    jobs = [(s, a, k) for s in spectra for a in arms for k in seed_list]
    for i, (spectrum, arm, seed) in enumerate(jobs):
        if i % shard[1] != shard[0]:
            continue
        out = RUNS / spectrum / arm / f"s{seed}"
        if (out / "metrics.json").is_file():
            continue
        overrides = ["+experiment=rank_recovery", *ARMS[arm], f"task.spectrum={spectrum}", f"seed={seed}"]
        train(compose(*overrides, output_dir=out))
        print(f"{spectrum} {arm} s{seed} done", flush=True)


def load() -> dict[tuple[str, str], dict[int, dict]]:
    results: dict[tuple[str, str], dict[int, dict]] = {}
    for path in RUNS.glob("*/*/s*/metrics.json"):
        spectrum, arm, seed = path.parts[-4], path.parts[-3], int(path.parts[-2][1:])
        metrics = json.loads(path.read_text())
        events = [json.loads(x) for x in (path.parent / "ranks.jsonl").read_text().splitlines()]
        skipped = sum(e.get("skipped_full", 0) or 0 for e in events if e.get("kind") == "event")
        results.setdefault((spectrum, arm), {})[seed] = {**metrics["final"], "skipped_full": skipped,
                                                          "events": metrics["events"]}
    return results


def paired(a: list[float], b: list[float], rng_seed: int = 0) -> tuple[float, float, float, str]:
    """Mean of a - b, 95 % bootstrap interval over seeds, and a two-sided sign test (ties dropped)."""
    import random

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    rng = random.Random(rng_seed)
    boot = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(10_000))
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = pos + neg
    tail = sum(math.comb(n, k) for k in range(0, min(pos, neg) + 1)) / 2**n if n else 1.0
    return statistics.fmean(diffs), boot[250], boot[9749], f"{pos}+/{neg}- p={min(1.0, 2 * tail):.3g}"


def report() -> str:
    results = load()
    lines = []
    csv = ["spectrum,arm,metric,mean,std,n,diff_vs_flexlora,low,high,sign_test"]
    for spectrum in ("flat", "decaying"):
        arms = [a for a in ARMS if (spectrum, a) in results]
        if not arms:
            continue
        base = results.get((spectrum, "flexlora"), {})
        lines += [f"### {spectrum} spectrum", "",
                  "| arm | n | rel. MSE | Spearman | energy | skipped at capacity | vs FlexLoRA: rel. MSE diff "
                  "[95 % CI] (sign test) | vs FlexLoRA: energy diff [95 % CI] (sign test) |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm in arms:
            runs = results[(spectrum, arm)]
            cells = []
            for metric in METRICS:
                values = [r[metric] for r in runs.values()]
                mean, std = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{mean:.4f} ± {std:.4f}")
                common = sorted(set(runs) & set(base))
                if arm != "flexlora" and common:
                    d, lo, hi, sign = paired([runs[s][metric] for s in common], [base[s][metric] for s in common])
                    csv.append(f"{spectrum},{arm},{metric},{mean:.6f},{std:.6f},{len(values)},{d:.6f},{lo:.6f},"
                               f"{hi:.6f},{sign}")
                else:
                    csv.append(f"{spectrum},{arm},{metric},{mean:.6f},{std:.6f},{len(values)},,,,")
            skipped = statistics.fmean(r["skipped_full"] for r in runs.values())
            comparisons = []
            for metric in ("val/relative_mse", "rank/energy"):
                common = sorted(set(runs) & set(base))
                if arm == "flexlora" or not common:
                    comparisons.append("–")
                    continue
                d, lo, hi, sign = paired([runs[s][metric] for s in common], [base[s][metric] for s in common])
                comparisons.append(f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}] ({sign})")
            lines.append(f"| {arm} | {len(runs)} | {' | '.join(cells)} | {skipped:.1f} | {' | '.join(comparisons)} |")
        lines.append("")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    (HERE / "results.csv").write_text("\n".join(csv) + "\n")
    return "\n".join(lines)


WIDTH_ARMS = {64: ("std_auto", "std_0.1", "std_1.0", "lora", "adalora", "increlora"),
              512: ("w512_std_auto", "w512_std_0.1", "w512_std_1.0", "w512_lora", "w512_adalora")}


def width_report() -> str:
    """The width arm (flat spectrum, this checkout's runs): every arm paired with FlexLoRA at grow_std=auto."""
    results = load()
    lines = ["| width | arm | n | rel. MSE | Spearman | energy | rel. MSE vs auto [95 % CI] (sign test) | "
             "energy vs auto [95 % CI] (sign test) |", "|---|---|---|---|---|---|---|---|"]
    for width, arms in WIDTH_ARMS.items():
        base = results.get(("flat", arms[0]), {})
        for arm in arms:
            runs = results.get(("flat", arm), {})
            if not runs:
                continue
            cells = []
            for metric in METRICS:
                values = [r[metric] for r in runs.values()]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.fmean(values):.4f} ± {std:.4f}")
            comparisons = []
            for metric in ("val/relative_mse", "rank/energy"):
                common = sorted(set(runs) & set(base))
                if arm == arms[0] or not common:
                    comparisons.append("–")
                    continue
                d, lo, hi, sign = paired([runs[s][metric] for s in common], [base[s][metric] for s in common])
                comparisons.append(f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}] ({sign})")
            name = arm.removeprefix("w512_")
            lines.append(f"| {width} | {name} | {len(runs)} | {' | '.join(cells)} | {' | '.join(comparisons)} |")
    text = "\n".join(lines) + "\n"
    (HERE / "width.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", default="all")
    parser.add_argument("--seeds", default="0-9")
    parser.add_argument("--spectra", default="flat,decaying")
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--width-report", action="store_true", help="width.md: the width arm (grow_std rules)")
    args = parser.parse_args()
    if args.report:
        print(report())
        return
    if args.width_report:
        print(width_report())
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    arms = list(ARMS) if args.arms == "all" else args.arms.split(",")
    index, count = (int(x) for x in args.shard.split("/"))
    run_all(arms, seeds(args.seeds), args.spectra.split(","), (index, count))


if __name__ == "__main__":
    main()
