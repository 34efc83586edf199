"""Training-step time of every run vs static lora: real ``Trainer.fit`` runs, interleaved step by step.

Each run is built by ``flexlora.train.build`` from the composed config (so RankAllocationCallback, SlotAdamW,
the LR scheduler, logging and the rank reporter run as in ``run.py``) and trains in a thread of its own; a
gate callback parks it at block boundaries so that exactly one run trains at a time. ``delta_t`` consecutive
timed steps (one event each) form a group; a ratio is the median over groups of (the run's group time /
lora's time for the same group).
"""

from __future__ import annotations

import gc
import statistics
from pathlib import Path
from typing import Any

from benchmarks.components import step_components
from benchmarks.config import run_config
from benchmarks.harness import GatedFit, interleave_fits, median, paired_ratios
from benchmarks.modes import LORA, Mode, StepSetup
from flexlora.train import build


def _sums(values: list[Any], size: int) -> list[Any]:
    return [sum(values[i : i + size]) for i in range(0, len(values), size)]


def bench_step_time(mode: Mode, setup: StepSetup, work: Path) -> dict[str, Any]:
    """The part's runs, interleaved; with ``setup.components`` also the per-step pieces of each method."""
    setup.check()
    blocks = setup.timed_steps // setup.block_steps
    runs = {spec.name: GatedFit(spec.name, build(run_config(setup, spec, work / f"step-{spec.name}")),
                                setup.warm_steps, setup.block_steps, blocks) for spec in setup.runs}
    interleave_fits(runs, blocks)
    out: dict[str, Any] = {"setup": _setup_record(setup, runs)}
    out.update(_run_entries(setup, runs))
    if setup.components:
        methods = {spec.name: runs[spec.name] for spec in setup.runs if spec.name != f"{LORA}_control"}
        out["components"] = step_components(mode, setup, methods, out[LORA]["ms_per_step_median"])
    del runs
    gc.collect()
    return out


def _setup_record(setup: StepSetup, runs: dict[str, GatedFit]) -> dict[str, Any]:
    lora = runs[LORA].module
    return {
        "backbone": setup.backbone, "task": setup.task, "batch_size": setup.batch_size,
        "max_length" if setup.task == "tweets" else "cutoff_len": setup.seq_len,
        "mean_padded_seq_len": median([statistics.fmean(run.gate.seq_lens) for run in runs.values()]),
        "rank_r0": setup.rank, "max_rank": {n: run.module.allocator_config.max_rank for n, run in runs.items()},
        "adalora_target_rank": max(1, setup.rank // 2), "adapted_matrices": len(lora.adapters),
        "delta_t": setup.delta_t, "block_steps": setup.block_steps, "groups": setup.groups,
        "timed_steps_per_run": setup.timed_steps, "warmup_steps": setup.warm_steps,
        "total_steps_T": setup.total_steps,
        "orth_reg": {n: run.module.allocator_config.orth_reg for n, run in runs.items()},
        "driver": "lightning.Trainer.fit per run in a thread, parked at block boundaries (one runs at a time)",
    }


def _run_entries(setup: StepSetup, runs: dict[str, GatedFit]) -> dict[str, dict[str, Any]]:
    per_group = setup.delta_t // setup.block_steps
    steps = setup.delta_t
    wall = {n: _sums(run.gate.wall, per_group) for n, run in runs.items()}
    cpu = {n: _sums(run.gate.cpu, per_group) for n, run in runs.items()}
    out: dict[str, dict[str, Any]] = {}
    for name, run in runs.items():
        entry: dict[str, Any] = {
            "ms_per_step_median": 1e3 * median(wall[name]) / steps,
            "cpu_ms_per_step_median": 1e3 * median(cpu[name]) / steps,
            "ms_per_step_groups": [round(1e3 * t / steps, 2) for t in wall[name]],
            "minor_faults_per_step": statistics.fmean(run.gate.faults) / setup.block_steps,
            "events_per_group": _sums(run.gate.events, per_group),
        }
        if name != LORA:
            by_wall, by_cpu = paired_ratios(wall[name], wall[LORA]), paired_ratios(cpu[name], cpu[LORA])
            entry.update(ratio_vs_lora=by_wall["median"], ratio_vs_lora_iqr=by_wall["iqr"],
                         ratio_vs_lora_total=by_wall["total"], cpu_ratio_vs_lora=by_cpu["median"],
                         cpu_ratio_vs_lora_iqr=by_cpu["iqr"])
        out[name] = entry
    return out
