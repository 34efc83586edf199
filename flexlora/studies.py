"""What the studies in ``experiments/`` share: a job queue that several workers drain, and grid selection.

A study is a list of runs (an output folder plus Hydra overrides). Start one worker per core; each claims the
next run nobody has claimed (an exclusive-create ``.claim`` file in its folder), so no run is done twice and a
killed worker's run is redone after its claim is deleted. A finished run (complete metrics.json) is skipped.
Selections read only the runs' tune-split metrics: a grid value is chosen on held-out training data, and a choice
at the edge of its grid is reported so the grid can be widened. Run folders are not committed, so a study keeps a
``ScoreRecord`` (a small JSON file in its folder) of the tune scores it selected on: a later checkout reaches the
same choices without redoing stage 1.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexlora.rundir import METRICS


@dataclass(frozen=True)
class Job:
    out: Path
    overrides: tuple[str, ...]


def claim(out: Path) -> bool:
    """True for the one worker that creates ``out/.claim`` first."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(out / ".claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def done(job: Job) -> bool:
    return (job.out / METRICS).is_file()


def _train(job: Job, base: Sequence[str], train: Callable[[Any], Any] | None) -> None:
    from flexlora.conf_store import compose

    if train is None:
        from flexlora.train import train
    train(compose(*base, *job.overrides, output_dir=job.out))
    print(f"done {job.out}", flush=True)


def run_next(jobs: Iterable[Job], base: Sequence[str], train: Callable[[Any], Any] | None = None) -> bool:
    """Run the first unclaimed, unfinished job; False when there was none (all done or claimed by others)."""
    for job in jobs:
        if not done(job) and claim(job.out):
            _train(job, base, train)
            return True
    return False


@dataclass(frozen=True)
class Score:
    """A run's tune metric as measured, why its split is degenerate ('' when it is not) and the degenerate rule
    that judged it (None: a run or record entry from before rules had names)."""

    value: float
    degenerate: str = ""
    check: str | None = None

    @property
    def selection_value(self) -> float:
        """What a selection compares: NaN (undefined) and a degenerate split count as -inf, never winning."""
        return float("-inf") if self.degenerate or math.isnan(self.value) else self.value


def run_score(out: Path, key: str) -> Score:
    """A finished run's ``key`` from its metrics.json (the split is the key's prefix)."""
    metrics = json.loads((out / METRICS).read_text())
    split = key.split("/")[0]
    degenerate = metrics.get("degenerate_reason", {}).get(split, "") or ("degenerate" if metrics.get(
        "degenerate", {}).get(split) else "")
    value = metrics["final"][key]
    return Score(float(value) if isinstance(value, float | int) else math.nan, degenerate,
                 metrics.get("degenerate_check"))


@dataclass(frozen=True)
class Choice:
    value: float
    score: float
    at_edge: bool


def best_of(scores: Mapping[float, float]) -> Choice:
    """The grid value with the highest score (ties: the smaller value), and whether it sits at an edge."""
    grid = sorted(scores)
    best = max(grid, key=lambda v: (scores[v], -v))
    return Choice(best, scores[best], best in (grid[0], grid[-1]))


def widen(grid: Sequence[float], choice: Choice, factor: float = 2.0) -> list[float]:
    """The grid plus one step beyond the edge the choice sits on (unchanged when it is interior)."""
    values = sorted(grid)
    if not choice.at_edge:
        return values
    return [values[0] / factor, *values] if choice.value == values[0] else [*values, values[-1] * factor]


@dataclass(frozen=True)
class Selection:
    """Where a grid search stands: the grid so far, its choice once settled, or the values still unscored
    (no choice and nothing missing: no value of the walked grid is admissible)."""

    grid: list[float]
    choice: Choice | None
    missing: list[float]


def settle(grid: Sequence[float], score: Callable[[float], float | None], max_widen: int,
           bound: Callable[[float], float | None] | None = None) -> Selection:
    """Walk a grid to its choice: score every value, widen at an edge (at most ``max_widen`` times), and stop at
    the values without a score (their runs are still needed; ``grid``'s own order first, so a centre-first grid
    runs its centre first) or when the choice is interior or may not widen any more. When every value is -inf
    (degenerate or undefined), the smallest is the "best" and the grid widens downwards, away from the usual
    cause of a collapse; if the walk ends there, there is no admissible value: no choice and nothing missing.

    ``bound`` gives an upper bound for a value whose score is not known under the study's degenerate check (a
    score taken under an older, laxer check: a stricter check can only turn a score into -inf, and a rerun
    reproduces the rest). Bounds stand in for scores, except that a best value resting on a bound is itself
    missing: once its run is rechecked it either keeps the lead, beating every bound, or drops out. So only the
    runs that can change the choice are redone."""
    values, widened = sorted(grid), 0
    while True:
        scores = {value: score(value) for value in values}
        known = {v: s if s is not None or bound is None else bound(v) for v, s in scores.items()}
        missing = [v for v in grid if known[v] is None] + [v for v in values if known[v] is None and v not in grid]
        if missing:
            return Selection(values, None, missing)
        choice = best_of(known)  # every value has a score or a bound here
        if scores[choice.value] is None:
            return Selection(values, None, [choice.value])
        wider = widen(values, choice)
        if wider == values or widened == max_widen:
            return Selection(values, choice if choice.score > float("-inf") else None, [])
        values, widened = wider, widened + 1


class ScoreRecord:
    """Tune scores keyed by a run folder's path below ``root``, kept in ``path`` (committed with the study).

    ``score`` prefers the run's own metrics.json and falls back to the record, so a fresh checkout without the
    run folders makes the same selection; ``update`` records every finished run's score at full precision.
    With a ``check`` (a family's ``degenerate_check``), only scores judged under that rule count as scores: a run
    or an entry from an older rule is a ``bound`` (see ``settle``); entries then keep the measured value, the
    degenerate reason and the rule, so the record alone can say what each run did.
    """

    def __init__(self, path: Path, root: Path, check: str | None = None) -> None:
        self.path, self.root, self.check = path, root, check
        self.entries: dict[str, float | dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}

    def key(self, job: Job) -> str:
        return job.out.relative_to(self.root).as_posix()

    def lookup(self, job: Job, metric: str) -> Score | None:
        """The job's score from its run folder, else from the record; None when it has neither."""
        if done(job):
            return run_score(job.out, metric)
        entry = self.entries.get(self.key(job))
        if isinstance(entry, dict):
            return Score(entry["score"], entry.get("degenerate", ""), entry.get("check"))
        return None if entry is None else Score(entry)

    def judged(self, found: Score) -> bool:
        """Whether a score was judged by the record's check (every score counts when the record has none)."""
        return self.check in (None, found.check)

    def score(self, job: Job, metric: str) -> float | None:
        """The job's selection value under the record's check, or None when it has neither run here nor been
        recorded (or, with a check, was judged under another rule: see ``bound``)."""
        found = self.lookup(job, metric)
        return found.selection_value if found is not None and self.judged(found) else None

    def bound(self, job: Job, metric: str) -> float | None:
        """The job's selection value under whatever rule judged it: an upper bound of its value under the
        record's check."""
        found = self.lookup(job, metric)
        return None if found is None else found.selection_value

    def update(self, jobs: Iterable[Job], metric: str) -> None:
        for job in jobs:
            if done(job):
                found = run_score(job.out, metric)
                self.entries[self.key(job)] = found.selection_value if self.check is None else {
                    "score": found.value, "degenerate": found.degenerate, "check": found.check}
        rows = [f" {json.dumps(key)}: {json.dumps(entry)}" for key, entry in sorted(self.entries.items())]
        self.path.write_text("{\n" + ",\n".join(rows) + "\n}\n")  # one entry per line
