"""The SmolLM2-135M commonsense study on CPU, redone on the fixed setup: lrs chosen on held-out training data
(``task.split=tune``), then the untuned floor and LoRA / AdaLoRA / FlexLoRA at three seeds on the seven sets.

    python experiments/smollm2_commonsense/study.py run &  python experiments/smollm2_commonsense/study.py run; wait
    python experiments/smollm2_commonsense/study.py report      # tables into this folder

Stages (the workers share one queue: the tune runs still needed come first, then the final runs of every method
whose lr is settled, so no worker idles while another widens a grid):
1. lr: per method, the grid value with the best tune-split accuracy (600 held-out training records, seed 1); the
   first round runs every method's grid interleaved (centre values first), and a choice at an edge widens that
   method's grid by one factor-2 step (at most WIDEN times). A run whose answers are constant within one answer
   format (the family's per-format ``degenerate_check``) is never chosen; a method whose every value is degenerate
   widens downwards and then has no choice (and no final runs). The scores are kept in tune_record.json, so a
   checkout without the run folders makes the same choices; scores judged by the older whole-split check are
   upper bounds there, and only a run that could change a choice is redone.
2. final: the floor (``trainer.max_steps=0``) and every method at its chosen lr, SEEDS, on the seven sets.
Every run is the framework's own train() under multirun/smollm2_commonsense_v2/ (ignored by git); finished runs
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
RUNS = REPO / "multirun" / "smollm2_commonsense_v2"
# The stage-1 scores selected on, by run folder: run folders are not committed, this record is (flexlora.studies)
RECORD = HERE / "tune_record.json"
sys.path.insert(0, str(REPO))

from flexlora.studies import Choice, Job, ScoreRecord, Selection, done, run_next, settle  # noqa: E402

BASE = ("+experiment=smollm2_commonsense", "trainer.enable_progress_bar=false", "logger=none")
METHODS = ("lora", "adalora", "flexlora")
# Centred on the MiniLM proxy's choices on the fixed setup (LoRA 1e-3, AdaLoRA and FlexLoRA 4e-3), one factor-2
# step either side; the centre runs first so that a partial first round already compares like with like.
LR_GRID = {"lora": (1e-3, 5e-4, 2e-3), "adalora": (4e-3, 2e-3, 8e-3), "flexlora": (4e-3, 2e-3, 8e-3)}
WIDEN = 3  # FlexLoRA sat at the top edge after two widenings (3.2e-2: 47.50 vs 1.6e-2: 47.00)
SEEDS = (1, 2, 3)


def _tune_metric() -> str:
    from flexlora.tasks import task_spec

    return task_spec("commonsense").main_metric_for("tune")


def lr_job(method: str, lr: float) -> Job:
    return Job(RUNS / "tune" / method / f"lr{lr:g}",
               (f"allocator={method}", f"model.optimizer.lr={lr}", "task.split=tune", "seed=1"))


def record() -> ScoreRecord:
    """Scores count under the commonsense family's current degenerate rule (per answer format); the scores
    recorded under the older whole-split rule are upper bounds, so only runs that can change a choice rerun."""
    from flexlora.families.causal_lm import CausalLMFamily

    return ScoreRecord(RECORD, RUNS, check=CausalLMFamily.degenerate_check)


def plan() -> tuple[dict[str, Selection], list[Job]]:
    """Every method's selection (see ``settle``), and the tune runs still needed (centres first, methods
    interleaved)."""
    scores_of = record()
    selections = {method: settle(LR_GRID[method], lambda lr, m=method: scores_of.score(lr_job(m, lr), _tune_metric()),
                                 WIDEN, lambda lr, m=method: scores_of.bound(lr_job(m, lr), _tune_metric()))
                  for method in METHODS}
    missing = [[lr_job(method, lr) for lr in selection.missing] for method, selection in selections.items()]
    return selections, [job for row in zip_longest(*missing) for job in row if job is not None]


def settled_choices(selections: dict[str, Selection]) -> dict[str, Choice]:
    return {method: selection.choice for method, selection in selections.items() if selection.choice is not None}


def final_jobs(settled: dict[str, Choice]) -> list[Job]:
    """The floor, then every settled method at its chosen lr, seed-major."""
    jobs = [Job(RUNS / "final" / "floor" / "s1", ("allocator=lora", "trainer.max_steps=0", "seed=1"))]
    for seed in SEEDS:
        for method in METHODS:
            if method in settled:
                lr = settled[method].value
                job = Job(RUNS / "final" / method / f"s{seed}",
                          (f"allocator={method}", f"model.optimizer.lr={lr}", f"seed={seed}"))
                if done(job) and (ran := json.loads((job.out / "metrics.json").read_text())["config"]["model"]
                                  ["optimizer"]["lr"]) != lr:
                    raise SystemExit(f"{job.out} ran at lr {ran:g}, but {method}'s choice is now {lr:g}: move the "
                                     "folder aside (e.g. to superseded/) so the final runs are redone")
                jobs.append(job)
    return jobs


def run() -> None:
    """Drain the queue: needed tune runs first, then the final runs of every method already settled, so no
    worker idles while another finishes a widened grid; return once every selection is resolved (a claimed tune
    run stays pending until it is done) and nothing is left to claim."""
    while True:
        selections, pending = plan()
        if run_next([*pending, *final_jobs(settled_choices(selections))], BASE):
            continue
        if not pending:
            return
        time.sleep(20)


def _cell(scores_of: ScoreRecord, method: str, lr: float, chosen: bool) -> str:
    """``lr: accuracy``; "(deg.)" when degenerate under the current rule; "<=" when judged only by an older one."""
    found = scores_of.lookup(lr_job(method, lr), _tune_metric())
    text = f"{100 * found.value:.2f}"
    if not scores_of.judged(found):
        text = f"<= {text}"
    elif found.degenerate:
        text += " (deg.)"
    return f"**{lr:g}: {text}**" if chosen else f"{lr:g}: {text}"


def report() -> None:
    """lr_selection.md (and the score record) always; the tables and comparisons once stage 2 has finished."""
    from flexlora.aggregate.cli import main as aggregate

    scores_of = record()
    scores_of.update([Job(out, ()) for out in sorted(RUNS.glob("tune/*/lr*"))], _tune_metric())
    selections = plan()[0]
    settled = settled_choices(selections)
    lines = ["Method lr (tune split: 600 held-out training records, seed 1; accuracy x100; **chosen**; a choice at "
             f"an edge widens the grid, at most {WIDEN} times; scores kept in tune_record.json; *degenerate*: the "
             "answers are constant within one answer format, never chosen (deg.); <= x: judged by the older "
             "whole-split check only, an upper bound that cannot change the choice):", "",
             "| method | grid: score | chosen | at edge |", "|---|---|---|---|"]
    for method, selection in selections.items():
        choice = selection.choice
        cells = ", ".join(_cell(scores_of, method, lr, choice is not None and lr == choice.value)
                          for lr in selection.grid if lr not in selection.missing)
        if choice is not None:
            status, edge = f"{choice.value:g}", "yes" if choice.at_edge else "no"
        elif selection.missing:
            status, edge = "pending: " + ", ".join(f"{lr:g}" for lr in selection.missing), ""
        else:
            status, edge = "none admissible", ""
        lines.append(f"| {method} | {cells} | {status} | {edge} |")
    lines += ["", "Degenerate tune runs (the reason their metrics.json gives):", ""]
    lines += [f"- {method} {lr:g}: {found.degenerate}" for method, selection in selections.items()
              for lr in selection.grid if lr not in selection.missing
              for found in [scores_of.lookup(lr_job(method, lr), _tune_metric())]
              if found.degenerate and scores_of.judged(found)]
    (HERE / "lr_selection.md").write_text("\n".join(lines) + "\n")
    final = RUNS / "final"
    if len(settled) < len(METHODS) or not all(done(job) for job in final_jobs(settled)):
        print("stage 1 or 2 has not finished (or a method has no admissible lr): only lr_selection.md written",
              flush=True)
        return
    aggregate([str(final / name) for name in ("floor", *METHODS)]
              + ["--rows", "allocator.name,trainer.max_steps", "--out", str(HERE)])
    for a, b in (("flexlora", "adalora"), ("flexlora", "lora"), ("adalora", "lora")):
        aggregate([str(final / a), str(final / b), "--compare", f"{a},{b}", "--out", str(HERE / f"compare_{a}_{b}")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=("run", "report"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    {"run": run, "report": report}[args.phase]()
    print(json.dumps({"done": args.phase}))


if __name__ == "__main__":
    main()
