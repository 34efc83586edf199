"""The SmolLM2-135M commonsense study on CPU, redone on the fixed setup: lrs chosen on held-out training data
(``task.split=tune``), then the untuned floor and LoRA / AdaLoRA / FlexLoRA at three seeds on the seven sets.

    python experiments/smollm2_commonsense/study.py run &  python experiments/smollm2_commonsense/study.py run; wait
    python experiments/smollm2_commonsense/study.py report      # tables into this folder
    python experiments/smollm2_commonsense/study.py progress    # stage 1 so far: lr_selection_partial.md

Stages (each worker drains a stage's queue, then waits for the other workers before the next):
1. lr: per method, the grid value with the best tune-split accuracy (600 held-out training records, seed 1); the
   first round runs every method's grid interleaved (centre values first), and a choice at an edge widens that
   method's grid by one factor-2 step (at most WIDEN times).
2. final: the floor (``trainer.max_steps=0``) and every method at its chosen lr, SEEDS, on the seven sets.
Every run is the framework's own train() under multirun/smollm2_commonsense_v2/ (ignored by git); finished runs
are skipped on a rerun, and a killed worker's claimed run is redone once its ``.claim`` file is deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNS = REPO / "multirun" / "smollm2_commonsense_v2"
sys.path.insert(0, str(REPO))

from flexlora.studies import Choice, Job, best_of, done, final_metric, run_jobs, wait_for, widen  # noqa: E402

BASE = ("+experiment=smollm2_commonsense", "trainer.enable_progress_bar=false", "logger=none")
METHODS = ("lora", "adalora", "flexlora")
# Centred on the MiniLM proxy's choices on the fixed setup (LoRA 1e-3, AdaLoRA and FlexLoRA 4e-3), one factor-2
# step either side; the centre runs first so that a partial first round already compares like with like.
LR_GRID = {"lora": (1e-3, 5e-4, 2e-3), "adalora": (4e-3, 2e-3, 8e-3), "flexlora": (4e-3, 2e-3, 8e-3)}
WIDEN = 2  # FlexLoRA's choice was still at the edge after one widening (lr_selection.md)
SEEDS = (1, 2, 3)


def _tune_metric() -> str:
    from flexlora.tasks import task_spec

    return task_spec("commonsense").main_metric_for("tune")


def lr_job(method: str, lr: float) -> Job:
    return Job(RUNS / "tune" / method / f"lr{lr:g}",
               (f"allocator={method}", f"model.optimizer.lr={lr}", "task.split=tune", "seed=1"))


def lr_scores(method: str, grid: list[float]) -> dict[float, float]:
    return {lr: final_metric(RUNS / "tune" / method / f"lr{lr:g}", _tune_metric()) for lr in grid}


def grids(run: bool) -> dict[str, tuple[list[float], Choice]]:
    """Per method: the final grid and the choice, running (``run``) the first round and the widened grids."""
    if run:
        first = [lr_job(m, lr) for i in range(3) for m in METHODS for lr in LR_GRID[m][i : i + 1]]
        run_jobs(first, BASE)
        wait_for(first)
    out = {}
    for method in METHODS:
        grid = sorted(LR_GRID[method])
        for _ in range(WIDEN + 1):
            jobs = [lr_job(method, lr) for lr in grid]
            if run:
                run_jobs(jobs, BASE)
                wait_for(jobs)
            choice = best_of(lr_scores(method, grid))
            wider = widen(grid, choice)
            if wider == grid or len(wider) > len(LR_GRID[method]) + WIDEN:
                break
            grid = wider
        out[method] = (grid, choice)
    return out


def final_jobs(choices: dict[str, tuple[list[float], Choice]]) -> list[Job]:
    jobs = [Job(RUNS / "final" / "floor" / "s1", ("allocator=lora", "trainer.max_steps=0", "seed=1"))]
    for seed in SEEDS:
        for method in METHODS:
            lr = choices[method][1].value
            jobs.append(Job(RUNS / "final" / method / f"s{seed}",
                            (f"allocator={method}", f"model.optimizer.lr={lr}", f"seed={seed}")))
    return jobs


def run() -> None:
    jobs = final_jobs(grids(run=True))
    run_jobs(jobs, BASE)
    wait_for(jobs)


def report() -> None:
    from flexlora.aggregate.cli import main as aggregate

    lines = ["Method lr (tune split: 600 held-out training records, seed 1; accuracy x100; **chosen**; a choice at "
             "an edge widens the grid once):", "", "| method | grid: score | chosen | at edge |", "|---|---|---|---|"]
    for method, (grid, choice) in grids(run=False).items():
        scores = lr_scores(method, grid)
        cells = ", ".join(("**" if lr == choice.value else "") + f"{lr:g}: {100 * s:.2f}"
                          + ("**" if lr == choice.value else "") for lr, s in scores.items())
        lines.append(f"| {method} | {cells} | {choice.value:g} | {'yes' if choice.at_edge else 'no'} |")
    (HERE / "lr_selection.md").write_text("\n".join(lines) + "\n")
    final = RUNS / "final"
    if not all(done(job) for job in final_jobs(grids(run=False))):
        print("stage 2 (final) has not finished: only lr_selection.md written", flush=True)
        return
    aggregate([str(final / name) for name in ("floor", *METHODS)]
              + ["--rows", "allocator.name,trainer.max_steps", "--out", str(HERE)])
    for a, b in (("flexlora", "adalora"), ("flexlora", "lora"), ("adalora", "lora")):
        aggregate([str(final / a), str(final / b), "--compare", f"{a},{b}", "--out", str(HERE / f"compare_{a}_{b}")])


def progress() -> None:
    """lr_selection_partial.md: the tune runs finished so far (stage 1 may still be running)."""
    lines = ["Stage 1 so far (tune split: 600 held-out training records, seed 1; accuracy x100; finished runs only, "
             "wall time with the 2-core machine shared by two workers and tests):", "",
             "| method | lr | tune accuracy | wall s |", "|---|---|---|---|"]
    for method in METHODS:
        for lr in sorted({*LR_GRID[method], min(LR_GRID[method]) / 2, max(LR_GRID[method]) * 2}):
            job = lr_job(method, lr)
            if done(job):
                metrics = json.loads((job.out / "metrics.json").read_text())
                lines.append(f"| {method} | {lr:g} | {100 * final_metric(job.out, _tune_metric()):.2f} | "
                             f"{metrics['wall_time_s']:.0f} |")
    (HERE / "lr_selection_partial.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=("run", "report", "progress"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    {"run": run, "report": report, "progress": progress}[args.phase]()
    print(json.dumps({"done": args.phase}))


if __name__ == "__main__":
    main()
