"""CLI: ``python -m benchmarks [--quick] [--parts memory,step,causal,alloc,llama] [--out FILE]``."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks import DEFAULT_OUT, REPO
from benchmarks.harness import machine, quiet
from benchmarks.modes import FULL, MEMORY_RUNS, QUICK, Mode

# in this order; memory first: its forked children must start from a process that holds nothing but imports
PARTS = ("memory", "step", "causal", "alloc", "llama")
KEYS = {"memory": "memory", "step": "step_time", "causal": "causal_step_time", "alloc": "allocator_cost",
        "llama": "llama3_event"}


def _part(name: str, mode: Mode, work: Path) -> Callable[[], dict[str, Any]]:
    """The part's benchmark as a call (imports stay lazy: ``--parts alloc`` never loads a backbone)."""
    if name == "memory":
        from benchmarks.memory import bench_memory

        return lambda: bench_memory(mode, work)
    if name in ("step", "causal"):
        from benchmarks.step_time import bench_step_time

        return lambda: bench_step_time(mode, mode.step if name == "step" else mode.causal, work)
    if name == "alloc":
        from benchmarks.allocator_cost import bench_allocator_cost

        return lambda: bench_allocator_cost(mode)
    from benchmarks.llama_event import bench_llama_event

    return lambda: bench_llama_event(mode)


def _describe(name: str, mode: Mode) -> str:
    s = mode.step if name == "step" else mode.causal
    return {
        "memory": f"{len(MEMORY_RUNS)} forked runs x {mode.memory_repeats} on {mode.step.backbone}",
        "step": f"{len(s.runs)} runs x {s.timed_steps} interleaved steps on {s.backbone}",
        "causal": f"{len(s.runs)} runs x {s.timed_steps} interleaved steps on {s.backbone} (commonsense)",
        "alloc": "72 DeBERTa-v3-base matrices, ours vs peft",
        "llama": f"one FlexLoRA event on {5 * mode.llama_layers} LLaMA-3-8B-shaped matrices",
    }[name]


def _skip_reason(name: str) -> str | None:
    from benchmarks.config import COMMONSENSE_DIR

    if name == "causal" and not (COMMONSENSE_DIR / "boolq" / "test.json").is_file():
        return f"no commonsense data at {COMMONSENSE_DIR} (set FLEXLORA_COMMONSENSE_DIR)"
    return None


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="What AdaLoRA and FlexLoRA cost over static LoRA, side by side.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny backbones and shapes, few repeats (about a minute; numbers not judged)")
    parser.add_argument("--out", type=Path, default=None, help=f"results JSON (default: "
                        f"{DEFAULT_OUT.relative_to(REPO)} in full mode, a temporary file with --quick)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := sorted(set(args.parts) - set(PARTS)):
        parser.error(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.report import evaluate_targets, markdown

    args = _parse(argv)
    mode = QUICK if args.quick else FULL
    out = args.out or (Path(tempfile.mkdtemp(prefix="flexlora-bench-")) / "results.json" if args.quick
                       else DEFAULT_OUT)
    torch.set_num_threads(1)
    quiet()
    started = time.time()
    command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
    results: dict[str, Any] = {"meta": {"mode": mode.name, "settings": asdict(mode), "machine": machine(),
                                        "command": command, "parts": {}}}
    with tempfile.TemporaryDirectory(prefix="flexlora-bench-work-") as tmp:
        for name in (p for p in PARTS if p in args.parts):
            if reason := _skip_reason(name):
                print(f"[bench] {name}: skipped, {reason}", flush=True)
                results["meta"]["parts"][name] = {"skipped": reason}
                continue
            print(f"[bench] {name}: {_describe(name, mode)}", flush=True)
            part_started = time.time()
            results[KEYS[name]] = _part(name, mode, Path(tmp))()
            results["meta"]["parts"][name] = {"wall_time_s": round(time.time() - part_started, 1)}
    results["targets"] = evaluate_targets(results, judge=mode.judge)
    results["meta"]["wall_time_s"] = round(time.time() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    if not mode.judge:
        print("[bench] quick mode: tiny models, numbers not judged against the targets")
    print(f"[bench] wrote {out} ({results['meta']['wall_time_s']} s)")
    return results


if __name__ == "__main__":
    main()
