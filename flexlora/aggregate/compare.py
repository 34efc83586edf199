"""``--compare A,B``: paired bootstrap of A - B on each task's main metric, per seed and across seeds.

Why from predictions, not from metrics.json: two means ± std over 3 seeds cannot say whether a 0.5-point gap is
real; resampling the same evaluation examples for both methods can (see :mod:`flexlora.stats`). Degenerate runs
(constant predictions on the split) are left out of the headline row and shown in a second row that includes them,
so they are never averaged in silently.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flexlora.aggregate.collect import Run, dedupe, seed_order
from flexlora.aggregate.core import method_label
from flexlora.errors import FlexLoRAError
from flexlora.family_registry import FAMILIES, FamilyEntry
from flexlora.tasks import TASKS

STAT_METRICS = ("accuracy", "f1", "mcc", "pearson", "spearman")  # what flexlora.stats can resample


@dataclass(frozen=True)
class Unit:
    """One evaluation set compared: a task's split (MNLI has two), a commonsense set or a VTAB task."""

    backbone: str
    run_split: str  # config.task.split of the runs
    task: str
    subtask: str
    split: str  # the ``split`` field of predictions.jsonl
    metric: str
    label: str
    order: tuple = ()


@dataclass
class CompareRow:
    unit: Unit
    seeds: list[Any]
    result: Any  # flexlora.stats.SeedsResult
    with_degenerate: bool = False  # True: the second row, degenerate seeds included


@dataclass
class Report:
    a: str
    b: str
    rows: list[CompareRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_resamples: int = 10_000
    seed: int = 0
    name_a: str = ""  # the matched rows' labels
    name_b: str = ""


def matches(spec: str, key: tuple[str, ...]) -> bool:
    """``flexlora`` matches any row holding that value; ``flexlora:entropy`` the row key exactly (``--rows`` order)."""
    parts = tuple(spec.split(":"))
    return parts == key if len(parts) > 1 else spec in key


def _unit_rule(run: Run) -> Callable[[Run, UnitMaker], list[Unit]] | None:
    """The run's family's comparison rule (its registry entry's ``compare_units``); None: not comparable."""
    entry = FAMILIES.get(run.family)
    path = entry.compare_units if entry is not None else "flexlora.aggregate.compare:task_units"
    return FamilyEntry.resolve(path) if path else None


def _units(run: Run, rule: Callable[[Run, UnitMaker], list[Unit]]) -> list[Unit]:
    """The evaluation splits of a run that the comparison covers, each with its main metric."""
    def unit(split: str, metric: str, label: str, order: tuple) -> Unit:
        return Unit(run.backbone, run.split, run.task, run.subtask, split, metric, label, order)

    return rule(run, unit)


UnitMaker = Callable[[str, str, str, tuple], Unit]  # (split, metric, label, order) -> Unit


def task_units(run: Run, unit: UnitMaker) -> list[Unit]:
    """A task's main metric on each of its evaluation splits (MNLI: two); the rule of tasks in ``TASKS``."""
    tune = run.split == "tune"
    spec = TASKS.get(run.task)
    keys = spec.keys if spec else (run.main_metric or "val/accuracy",)
    metric = keys[0].split("/", 1)[-1]
    splits = [k.split("/", 1)[0] for k in keys if k.split("/", 1)[-1] == metric]
    header = spec.header if spec else run.task
    order = list(TASKS).index(run.task) if spec else len(TASKS)
    if tune:
        splits = ["tune"]
    return [unit(s, metric, header if len(splits) == 1 else f"{header} {s.removeprefix('val_')}", (0, order, s))
            for s in splits]


class _Predictions:
    """predictions.jsonl files, parsed once: {split: {idx: record}}; None (and a note) when unreadable."""

    def __init__(self, notes: list[str]) -> None:
        self.cache: dict[Path, dict[str, dict[Any, dict]] | None] = {}
        self.notes = notes

    def get(self, path: Path) -> dict[str, dict[Any, dict]] | None:
        if path not in self.cache:
            self.cache[path] = self._read(path)
        return self.cache[path]

    def _read(self, path: Path) -> dict[str, dict[Any, dict]] | None:
        by_split: dict[str, dict[Any, dict]] = {}
        try:
            lines = path.read_text().splitlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                split = by_split.setdefault(str(record["split"]), {})
                if record["idx"] in split:
                    raise FlexLoRAError(f"{path}:{number}: idx {record['idx']} appears twice in split "
                                        f"{record['split']!r}")
                split[record["idx"]] = record
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            self.notes.append(f"{path}: unreadable ({type(err).__name__}: {err}); its seed is skipped")
            return None
        return by_split


def align(unit: Unit, seed: Any, a: Run, b: Run, recs_a: dict[Any, dict], recs_b: dict[Any, dict]
          ) -> tuple[list, list, list]:
    """(labels, pred_a, pred_b) in idx order; an error when the two runs were not scored on the same examples."""
    if recs_a.keys() != recs_b.keys():
        only_a, only_b = sorted(recs_a.keys() - recs_b.keys(), key=str), sorted(recs_b.keys() - recs_a.keys(), key=str)
        raise FlexLoRAError(
            f"{unit.label} ({unit.split}) seed {seed}: the examples differ between {a.path.parent} and "
            f"{b.path.parent}: {len(only_a)} idx only in A {only_a[:5]}, {len(only_b)} only in B {only_b[:5]}; "
            "a paired comparison needs both runs evaluated on the same data (same task.data_dir and eval sets)")
    order = sorted(recs_a, key=lambda i: (isinstance(i, str), i))
    wrong = [i for i in order if recs_a[i].get("label") != recs_b[i].get("label")]
    if wrong:
        raise FlexLoRAError(f"{unit.label} ({unit.split}) seed {seed}: labels differ at {len(wrong)} examples "
                            f"(idx {wrong[:5]}) between {a.path.parent} and {b.path.parent}: not the same data")
    return ([recs_a[i].get("label") for i in order], [recs_a[i].get("prediction") for i in order],
            [recs_b[i].get("prediction") for i in order])


def encode(metric: str, labels: list, *predictions: list) -> tuple[np.ndarray, ...]:
    """Numeric arrays for flexlora.stats. Label words (commonsense) become ids of one shared vocabulary, a
    missing prediction (null: nothing extracted) becomes -1 for classes (always wrong) and NaN for scores."""
    values = [v for v in (*labels, *(p for ps in predictions for p in ps)) if v is not None]
    if any(isinstance(v, str) for v in values):
        vocab = {w: i for i, w in enumerate(sorted({str(v) for v in values}))}
        return tuple(np.array([-1 if v is None else vocab[str(v)] for v in xs]) for xs in (labels, *predictions))
    if metric in ("pearson", "spearman"):
        return tuple(np.array([math.nan if v is None else float(v) for v in xs]) for xs in (labels, *predictions))
    return tuple(np.array([-1 if v is None else int(v) for v in xs]) for xs in (labels, *predictions))


def compare(runs: Sequence[Run], a: str, b: str, row_keys: Sequence[str], n_resamples: int = 10_000,
            seed: int = 0) -> Report:
    """A - B per evaluation set: per-seed paired bootstraps and their seed-averaged interval (flexlora.stats)."""
    from flexlora.stats import combine_seeds  # scipy / scikit-learn: only when comparing

    if a == b:
        raise FlexLoRAError(f"--compare needs two different methods, got {a!r} twice")
    report = Report(a, b, n_resamples=n_resamples, seed=seed)
    notes = report.notes
    sides: dict[str, list[Run]] = {"A": [], "B": []}
    for run in runs:
        hit = [s for s, spec in (("A", a), ("B", b)) if matches(spec, run.row)]
        if len(hit) == 2:
            raise FlexLoRAError(f"{run.path} matches both {a!r} and {b!r}; name the rows fully (v1:v2, --rows order)")
        if hit:
            sides[hit[0]].append(run)
    for side, spec in (("A", a), ("B", b)):
        if not sides[side]:
            known = sorted({":".join(r.row) for r in runs})
            raise FlexLoRAError(f"--compare: no run matches {spec!r}; rows present: {', '.join(known)}")
    for side, spec in (("A", a), ("B", b)):
        rows = sorted({r.row for r in sides[side]})
        if len(rows) > 1:
            raise FlexLoRAError(f"--compare: {spec!r} matches several rows ({', '.join(':'.join(r) for r in rows)}); "
                                "name one as v1:v2 in --rows order")
        sides[side] = dedupe(sides[side], notes, lambda r: method_label(r.row, row_keys))
    uncomparable: dict[str, int] = {}
    per_unit: dict[Unit, dict[str, dict[Any, Run]]] = {}
    for side in ("A", "B"):
        for run in sides[side]:
            rule = _unit_rule(run)
            if rule is None:
                uncomparable[run.family] = uncomparable.get(run.family, 0) + 1
                continue
            for unit in _units(run, rule):
                per_unit.setdefault(unit, {"A": {}, "B": {}})[side][run.seed] = run
    for family, count in uncomparable.items():
        notes.append(f"{family} ({count} runs) has no per-example predictions to resample; not compared.")
    predictions = _Predictions(notes)
    no_predictions: dict[Path, None] = {}  # ordered set of run folders
    not_compared: list[str] = []
    name_a, name_b = (method_label(sides[s][0].row, row_keys) for s in ("A", "B"))
    report.name_a, report.name_b = name_a, name_b
    for unit in sorted(per_unit, key=lambda u: (u.backbone, u.run_split, u.order)):
        by_seed = per_unit[unit]
        where = f"{unit.backbone} {unit.label}"
        for side, other, name in (("A", "B", name_a), ("B", "A", name_b)):
            alone = sorted(by_seed[side].keys() - by_seed[other].keys(), key=seed_order)
            if alone:
                notes.append(f"{where}: seed {', '.join(map(str, alone))} only for {name}; not compared")
        if unit.metric not in STAT_METRICS:
            notes.append(f"{where}: metric {unit.metric!r} cannot be resampled; skipped")
            continue
        clean, degenerate = [], []
        for s in sorted(by_seed["A"].keys() & by_seed["B"].keys(), key=seed_order):
            run_a, run_b = by_seed["A"][s], by_seed["B"][s]
            missing = [r.path.parent for r in (run_a, run_b) if r.predictions is None]
            if missing:
                no_predictions.update(dict.fromkeys(missing))
                continue
            files = [predictions.get(r.predictions) for r in (run_a, run_b)]
            if any(f is None for f in files):
                continue
            lacking = [str(r.predictions) for r, f in zip((run_a, run_b), files, strict=True) if unit.split not in f]
            if lacking:
                notes.append(f"{where} seed {s}: no {unit.split!r} predictions in {', '.join(lacking)}; skipped")
                continue
            labels, pa, pb = align(unit, s, run_a, run_b, files[0][unit.split], files[1][unit.split])
            arrays = (s, encode(unit.metric, labels, pa, pb))
            flagged = [name for name, r, p in ((name_a, run_a, pa), (name_b, run_b, pb))
                       if r.degenerate.get(unit.split) or (len(p) > 1 and all(x == p[0] for x in p))]
            (degenerate if flagged else clean).append(arrays)
            if flagged:
                notes.append(f"{where} seed {s}: degenerate (constant predictions) for {' and '.join(flagged)}; "
                             "left out of the main row, included in the '(incl. degenerate)' row")
        if not clean and not degenerate and by_seed["A"].keys() & by_seed["B"].keys():
            not_compared.append(where)
        for group, with_degenerate in ((clean, False), (clean + degenerate if degenerate else [], True)):
            if group:
                group.sort(key=lambda item: seed_order(item[0]))
                result = combine_seeds([arrays for _, arrays in group], unit.metric, n_resamples, seed,
                                       keep_resamples=False)
                report.rows.append(CompareRow(unit, [s for s, _ in group], result, with_degenerate))
    if no_predictions:
        listed = ", ".join(map(str, no_predictions))
        notes.append(f"No predictions.jsonl, skipped ({len(no_predictions)} runs): {listed}.")
    if not_compared:
        notes.append(f"Not compared (no seed with readable predictions for both): {', '.join(not_compared)}.")
    return report


def _p(p: float, n_resamples: int) -> str:
    if math.isnan(p):
        return "–"
    return f"<{2 / n_resamples:.2g}" if p == 0 else f"{p:.3g}"


def render_compare(report: Report) -> str:
    """The comparison as Markdown: one line per evaluation set, notes below."""
    name_a, name_b = report.name_a or report.a, report.name_b or report.b
    out = [f"## Paired bootstrap: {name_a} − {name_b}", "",
           "| Backbone | Task | Metric | n | Seeds | Mean diff (x100) | 95 % interval | Agree | p | Per-seed p |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report.rows:
        r = row.result
        task = row.unit.label + (" (tune)" if row.unit.run_split == "tune" else "")
        task += " (incl. degenerate)" if row.with_degenerate else ""
        per_seed = "; ".join(f"{s}: {_p(x.p_value, r.n_resamples)}" for s, x in zip(row.seeds, r.per_seed,
                                                                                      strict=True))
        n = "/".join(sorted({str(x.n) for x in r.per_seed}))
        out.append(f"| {row.unit.backbone} | {task} | {r.metric} | {n} | {', '.join(map(str, row.seeds))} | "
                   f"{100 * r.mean_diff:+.2f} | [{100 * r.low:+.2f}, {100 * r.high:+.2f}] | {r.agree}/{r.n_seeds} | "
                   f"{_p(r.p_value, r.n_resamples)} | {per_seed} |")
    if not report.rows:
        out.append("| – | no evaluation set with predictions for both methods | | | | | | | | |")
    out += ["", f"{name_a} minus {name_b} on each task's main metric, x100, on the same evaluation examples. "
            f"Per seed: paired bootstrap over the examples ({report.n_resamples} resamples, seed {report.seed}); "
            "interval and p across seeds: the mean over seeds of each resample's per-seed differences (examples "
            "resampled within every seed, seeds fixed). Agree: seeds whose difference has the sign of the mean. "
            "p: twice the share of resamples on the other side of 0 (resolution 2 / resamples)."]
    if report.notes:
        out += ["", *(f"- {note}" for note in report.notes)]
    return "\n".join(out) + "\n"


def report_json(report: Report) -> dict[str, Any]:
    return {"a": report.a, "b": report.b, "name_a": report.name_a, "name_b": report.name_b,
            "n_resamples": report.n_resamples, "seed": report.seed, "notes": report.notes,
            "rows": [{"backbone": r.unit.backbone, "task": r.unit.task, "subtask": r.unit.subtask,
                      "split": r.unit.split, "label": r.unit.label, "run_split": r.unit.run_split,
                      "seeds": r.seeds, "with_degenerate": r.with_degenerate, **r.result.to_dict()}
                     for r in report.rows]}
