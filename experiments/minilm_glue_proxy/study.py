"""The MiniLM proxy study on the fixed setup (same seeded head for every method, regression bias at the label
mean, one head lr for all methods): lrs chosen on held-out *training* data, then seeds on the dev sets, and
paired comparisons between methods.

    python experiments/minilm_glue_proxy/study.py run &  python experiments/minilm_glue_proxy/study.py run; wait
    python experiments/minilm_glue_proxy/study.py report      # tables into this folder

Stages (the workers share one queue, rebuilt after every run: the selection runs still needed, then the final
runs of every settled choice, so no worker idles while another widens a grid):
1. head lr: every method at its previous study's lr, ``model.head_lr`` in HEAD_GRID, on HEAD_TASKS' tune split
   (seed 1); the value with the best mean tune score over methods and tasks is used for all methods.
2. method lr: per tuned task and method, the grid value with the best tune-split main metric (seed 1); a choice
   at an edge widens the grid by one factor-2 step (at most WIDEN times).
3. final: the chosen lr, SEEDS on the dev sets (task-major, then seed-major: a study cut short still has
   whole tasks, and ``report`` tabulates the tasks whose runs have all finished).
The selection scores are kept in tune_record.json, so a checkout without the run folders makes the same choices.
Every run is the framework's own train() under multirun/minilm_glue_proxy_v2/ (ignored by git); finished runs
are skipped on a rerun, and a killed worker's claimed run is redone once its ``.claim`` file is deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from itertools import zip_longest
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNS = REPO / "multirun" / "minilm_glue_proxy_v2"
RECORD = HERE / "tune_record.json"  # the selection scores, committed (flexlora.studies.ScoreRecord)
sys.path.insert(0, str(REPO))

from flexlora.studies import Choice, Job, ScoreRecord, best_of, done, run_next, settle  # noqa: E402

BASE = ("+experiment=minilm_glue_proxy", "trainer.enable_progress_bar=false", "logger=none")
TASKS = ("stsb", "mrpc")  # SST-2 and CoLA did not fit this session's CPU time (README)
TUNED = ("stsb",)  # MRPC runs at STS-B's choices, labelled transferred (README): its grid did not fit either
LR_SOURCE = {"stsb": "stsb", "mrpc": "stsb"}
METHODS = ("lora", "adalora", "flexlora")
PREVIOUS_LR = {"lora": 1e-3, "adalora": 8e-3, "flexlora": 8e-3}  # the previous study's most frequent choices
HEAD_GRID = (1e-3, 4e-3)
HEAD_TASKS = ("stsb",)  # the regression head, where the head decided the old table
LR_GRID = {"lora": (5e-4, 1e-3, 2e-3), "adalora": (4e-3, 8e-3, 1.6e-2), "flexlora": (4e-3, 8e-3, 1.6e-2)}
WIDEN = 2
SEEDS = (1, 2, 3, 4, 5)
# FlexLoRA runs with the width-free new-slot rule, the default chosen on the rank-recovery width arm (README)
METHOD_ARGS = {"lora": (), "adalora": (), "flexlora": ("allocator.grow_std=auto",)}
EXTRA: dict[str, tuple[str, ...]] = {}  # grow_std=auto was measured on rank recovery instead (README)


def _metric(task: str, split: str) -> str:
    from flexlora.tasks import task_spec

    return task_spec(task).main_metric_for(split)


def record() -> ScoreRecord:
    return ScoreRecord(RECORD, RUNS)


def head_jobs() -> list[Job]:
    return [Job(RUNS / "head" / task / method / f"head{h:g}",
                (f"task={task}", f"allocator={method}", *METHOD_ARGS[method],
                 f"model.optimizer.lr={PREVIOUS_LR[method]}", f"model.head_lr={h}", "task.split=tune", "seed=1"))
            for task in HEAD_TASKS for method in METHODS for h in HEAD_GRID]


def head_scores() -> dict[Job, float | None]:
    scores_of = record()
    return {job: scores_of.score(job, _metric(job.overrides[0].removeprefix("task="), "tune")) for job in head_jobs()}


def chosen_head_lr() -> float | None:
    """The head lr with the best mean tune score over methods and tasks; None while a head run is missing."""
    scores = head_scores()
    if any(score is None for score in scores.values()):
        return None
    mean = {h: sum(scores[job] for job in scores if job.out.name == f"head{h:g}") / (len(HEAD_TASKS) * len(METHODS))
            for h in HEAD_GRID}
    return best_of(mean).value


def lr_job(task: str, method: str, lr: float, head_lr: float) -> Job:
    return Job(RUNS / "tune" / task / method / f"lr{lr:g}",
               (f"task={task}", f"allocator={method}", *METHOD_ARGS[method], f"model.optimizer.lr={lr}",
                f"model.head_lr={head_lr}", "task.split=tune", "seed=1"))


def plan() -> tuple[float | None, dict[tuple[str, str], tuple[list[float], Choice]], list[Job]]:
    """The head lr, the settled (task, method) lr choices, and the selection runs still needed."""
    head_lr = chosen_head_lr()
    if head_lr is None:
        return None, {}, [job for job, score in head_scores().items() if score is None]
    scores_of = record()
    settled: dict[tuple[str, str], tuple[list[float], Choice]] = {}
    missing: list[list[Job]] = []
    for task in TUNED:
        for method in METHODS:
            selection = settle(LR_GRID[method], lambda lr, t=task, m=method: scores_of.score(
                lr_job(t, m, lr, head_lr), _metric(t, "tune")), WIDEN)
            if selection.choice is None:
                missing.append([lr_job(task, method, lr, head_lr) for lr in selection.missing])
            else:
                settled[(task, method)] = (selection.grid, selection.choice)
    return head_lr, settled, [job for row in zip_longest(*missing) for job in row if job is not None]


def final_jobs(head_lr: float, settled: dict[tuple[str, str], tuple[list[float], Choice]]) -> list[Job]:
    """Task-major, then seed-major (a cut-short study still has whole tasks of whole seeds): every (task, method)
    whose lr source is settled, then the extra arms."""
    jobs = []
    for task in TASKS:
        for seed in SEEDS:
            for method in METHODS:
                if (LR_SOURCE[task], method) not in settled:
                    continue
                lr = settled[(LR_SOURCE[task], method)][1].value
                jobs.append(Job(RUNS / "final" / task / method / f"s{seed}",
                                (f"task={task}", f"allocator={method}", *METHOD_ARGS[method],
                                 f"model.optimizer.lr={lr}", f"model.head_lr={head_lr}", f"seed={seed}")))
            for arm, overrides in EXTRA.items():
                if (LR_SOURCE[task], "flexlora") in settled:
                    lr = settled[(LR_SOURCE[task], "flexlora")][1].value
                    jobs.append(Job(RUNS / "extra" / task / arm / f"s{seed}",
                                    (f"task={task}", *overrides, f"model.optimizer.lr={lr}",
                                     f"model.head_lr={head_lr}", f"seed={seed}")))
    return jobs


def run() -> None:
    """Drain one queue: missing selection runs first, then the final runs of every settled choice; a worker
    returns once every selection is resolved and nothing is left to claim."""
    while True:
        head_lr, settled, pending = plan()
        finals = final_jobs(head_lr, settled) if head_lr is not None else []
        if run_next([*pending, *finals], BASE):
            continue
        if head_lr is not None and not pending:
            return  # every selection is resolved (a claimed selection run stays pending until it is done)
        time.sleep(20)


def report() -> None:
    """lr_selection.md (and the score record) always; the tables and comparisons once every final run is done."""
    from flexlora.aggregate.cli import main as aggregate

    scores_of = record()  # both selection stages score on STS-B's tune metric (HEAD_TASKS, TUNED)
    selection_runs = [out for pattern in ("head/*/*/head*", "tune/*/*/lr*") for out in sorted(RUNS.glob(pattern))]
    scores_of.update([Job(out, ()) for out in selection_runs], _metric("stsb", "tune"))
    head_lr, settled, pending = plan()
    if head_lr is None:
        print("the head-lr stage has not finished", flush=True)
        return
    lines = [f"Head lr (model.head_lr, every method): {head_lr:g}, chosen on the tune splits of "
             f"{', '.join(HEAD_TASKS)} (seed 1; mean tune main metric x100 over methods and tasks; scores kept in "
             "tune_record.json, those of 2026-12-04 at the 2 decimals shown):", ""]
    lines += ["| task | method | " + " | ".join(f"head {h:g}" for h in HEAD_GRID) + " |",
              "|---|---|" + "---|" * len(HEAD_GRID)]
    scores = head_scores()
    for task in HEAD_TASKS:
        for method in METHODS:
            cells = [100 * scores[job] for job in scores if job.out.parent.name == method
                     and job.out.parent.parent.name == task]
            lines.append(f"| {task} | {method} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    lines += ["", "Method lr (tune split, seed 1; main metric x100; **chosen**; grids widened at an edge):", "",
              "| task | method | grid: score | chosen | at edge |", "|---|---|---|---|---|"]
    for (task, method), (grid, choice) in settled.items():
        cells = ", ".join(f"**{lr:g}: {100 * score:.2f}**" if lr == choice.value else f"{lr:g}: {100 * score:.2f}"
                          for lr in grid for score in [scores_of.score(lr_job(task, method, lr, head_lr),
                                                                       _metric(task, "tune"))])
        lines.append(f"| {task} | {method} | {cells} | {choice.value:g} | {'yes' if choice.at_edge else 'no'} |")
    lines += [f"| pending | {job.out.relative_to(RUNS)} | | | |" for job in pending]
    (HERE / "lr_selection.md").write_text("\n".join(lines) + "\n")
    finals = final_jobs(head_lr, settled)
    tasks = [task for task in TASKS if all(done(job) for job in finals if job.out.parents[1].name == task)]
    if pending or not tasks:
        print("no task has all its final runs: only lr_selection.md written", flush=True)
        return
    if tasks != list(TASKS):
        print(f"tables for {', '.join(tasks)} only: the other tasks' final runs have not finished", flush=True)
    dirs = [str(RUNS / "final" / task) for task in tasks]
    aggregate([*dirs, "--out", str(HERE)])
    for a, b in (("flexlora", "adalora"), ("flexlora", "lora"), ("adalora", "lora")):
        aggregate([*dirs, "--compare", f"{a},{b}", "--out", str(HERE / f"compare_{a}_{b}")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=("run", "report"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    report() if args.phase == "report" else run()
    print(json.dumps({"done": args.phase}))


if __name__ == "__main__":
    main()
