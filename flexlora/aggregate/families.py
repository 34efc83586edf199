"""The other papers' tables: commonsense reasoning (FlexLoRA / DoRA), VTAB-1k (with group means), rank recovery.

VTAB task names and groups come from :mod:`flexlora.data.vtab`, imported only when a VTAB run is present because
it pulls torch and PIL; commonsense display names are this table's own (the papers' abbreviations).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from flexlora.aggregate.collect import Run, dedupe, get, warn
from flexlora.aggregate.core import Column, Row, Table, build_table, method_label
from flexlora.tasks import TASKS

# the FlexLoRA / DoRA / LLM-Adapters column order and abbreviations
COMMONSENSE_SETS: dict[str, str] = {
    "boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
    "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA",
}
TUNE = " (task.split=tune: held-out training data, for search only, not reportable)"


SPECTRA = ("flat", "decaying")  # rank-recovery tables in this order


def _groups(runs: Sequence[Run], *extra: str) -> list[tuple[str, bool, list[Run]]]:
    """Runs split by backbone, tune-vs-reportable and any ``extra`` attributes: one table each."""
    def order(key: tuple) -> tuple:
        return (*key[:2], *((SPECTRA.index(v) if v in SPECTRA else len(SPECTRA), v) for v in key[2:]))

    keys = sorted({(r.backbone, r.split == "tune", *(getattr(r, a) for a in extra)) for r in runs}, key=order)
    return [(k[0], k[1], [r for r in runs if (r.backbone, r.split == "tune", *(getattr(r, a) for a in extra)) == k])
            for k in keys]


def _tune(key: str, tune: bool) -> str:
    return "tune/" + key.split("/", 1)[1] if tune and key.startswith(("val/", "test/")) else key


def commonsense_sets(run: Run) -> set[str]:
    """The sets a commonsense run evaluated: its config's eval_sets and every ``<set>/accuracy`` it logged."""
    logged = {k.split("/", 1)[0] for k in run.final if k.endswith("/accuracy")} - {"avg"}
    configured = get(run.config, "task.eval_sets")
    return logged | ({str(s) for s in configured} if isinstance(configured, list) and run.split != "tune" else set())


def commonsense_tables(runs: Sequence[Run], row_keys: Sequence[str]) -> list[Table]:
    """One row per method, a column per evaluated set (paper order), Avg over the sets the row has."""
    tables = []
    for backbone, tune, group in _groups(runs):
        notes: list[str] = []
        mine = dedupe(group, notes, lambda r: method_label(r.row, row_keys))
        present = set().union(*(commonsense_sets(r) for r in mine))
        names = [s for s in COMMONSENSE_SETS if s in present] + sorted(present - set(COMMONSENSE_SETS))
        columns = [Column(s, COMMONSENSE_SETS.get(s, s), "", (f"{s}/accuracy",)) for s in names]
        required = names if tune else list(COMMONSENSE_SETS)
        table = build_table(backbone, mine, columns, row_keys, commonsense_sets, notes, required=required,
                            title=f"Commonsense reasoning — {backbone}" + (TUNE if tune else ""), family="causal_lm",
                            kind="commonsense" + ("/tune" if tune else ""),
                            caption="Accuracy x100, mean ± sample std (ddof=1) over seeds; n = seeds. Avg: mean "
                                    "over the sets the row has.")
        if not all(r.complete for r in table.rows):
            notes.append(f"* Avg over the sets this row has, not all {len(required)} "
                         f"({', '.join(COMMONSENSE_SETS.get(s, s) for s in required)}).")
        tables.append(table)
    return tables


def commonsense_units(run: Run, unit: Callable[[str, str, str, tuple], Any]) -> list[Any]:
    """``--compare`` rule: accuracy on each set the run evaluated, in the papers' column order."""
    names = list(COMMONSENSE_SETS)
    return [unit(s, "accuracy", COMMONSENSE_SETS.get(s, s), (1, names.index(s) if s in names else 99, s))
            for s in sorted(commonsense_sets(run))]


def vtab_units(run: Run, unit: Callable[[str, str, str, tuple], Any]) -> list[Any]:
    """``--compare`` rule: top-1 accuracy of the run's VTAB task, in the benchmark's task order."""
    names = {folder: display for folder, (display, _) in _vtab_names().items()}
    order = list(names)
    return [unit("tune" if run.split == "tune" else "test", "accuracy", names.get(run.subtask, run.subtask),
                 (2, order.index(run.subtask) if run.subtask in order else 99, run.subtask))]


@functools.lru_cache(maxsize=1)
def _vtab_names() -> dict[str, tuple[str, str]]:
    return vtab_registry()[0]


def vtab_registry() -> tuple[dict[str, tuple[str, str]], tuple[str, ...]]:
    """({folder: (display name, group)}, groups) from flexlora.data.vtab, imported here because it pulls torch and
    PIL; without them (a laptop reading copied runs) folder names are shown and no group means computed."""
    try:
        from flexlora.data.vtab import GROUPS, VTAB_TASKS
    except ImportError as err:
        warn(f"VTAB task names and groups unavailable ({err}); showing folder names, no group means")
        return {}, ()
    return {f: (t.display, t.group) for f, t in VTAB_TASKS.items()}, tuple(GROUPS)


def vtab_tables(runs: Sequence[Run], row_keys: Sequence[str]) -> list[Table]:
    """A column per VTAB-1k task present, group means of complete groups, Avg when all 19 tasks are present."""
    if not runs:
        return []
    registry, groups = vtab_registry()
    tables = []
    for backbone, tune, group in _groups(runs):
        notes: list[str] = []
        mine = dedupe(group, notes, lambda r: method_label(r.row, row_keys))
        present = {r.subtask for r in mine}
        folders = [f for f in registry if f in present] + sorted(present - set(registry))
        keys = tuple(_tune(k, tune) for k in TASKS["vtab"].keys)
        columns = [Column(f, registry[f][0] if f in registry else f, "", keys) for f in folders]
        table = build_table(backbone, mine, columns, row_keys, lambda r: {r.subtask}, notes,
                            title=f"VTAB-1k — {backbone}" + (TUNE if tune else ""), family="image",
                            kind="vtab" + ("/tune" if tune else ""),
                            caption="Top-1 accuracy x100, mean ± sample std (ddof=1) over seeds; n = seeds.")
        members = {g: [f for f, (_, group) in registry.items() if group == g] for g in groups}
        complete = [g for g in groups if all(f in present for f in members[g])]
        incomplete = [f"{g} ({sum(f in present for f in members[g])} of {len(members[g])} tasks; missing "
                      + ", ".join(registry[f][0] for f in members[g] if f not in present) + ")"
                      for g in groups if g not in complete]
        table.extra_headers = list(complete)
        table.show_avg = bool(groups) and not incomplete
        if table.show_avg:
            table.extra_headers.append("Mean (19 tasks)")
            table.caption += (" Natural / Specialized / Structured: mean over the group's tasks; Avg: mean of the "
                              "three group means; Mean (19 tasks): the plain task mean (papers differ on which "
                              "they report).")
        elif complete:
            table.caption += " Group columns: mean over the group's tasks."
        for row in table.rows:
            _group_means(row, members, complete, table.show_avg)
        if incomplete:
            notes.append("Incomplete groups (no group mean for them, no Avg): " + "; ".join(incomplete) + ".")
        if table.show_avg and not all(r.complete for r in table.rows):
            notes.append("Avg and group means need every task of the group in the row; '–' where one is missing.")
        tables.append(table)
    return tables


def _group_means(row: Row, members: dict[str, list[str]], complete: list[str], all_tasks: bool) -> None:
    """Group means of the row (only when it has every task of the group) and the VTAB averages."""
    value = {t: c.value for t, c in row.cells.items() if not math.isnan(c.value)}
    row.extras = {g: (statistics.fmean(value[f] for f in members[g]) if all(f in value for f in members[g])
                      else None) for g in complete}
    row.avg, row.complete = None, False
    if all_tasks:
        folders = [f for fs in members.values() for f in fs]
        row.extras["Mean (19 tasks)"] = (statistics.fmean(value[f] for f in folders)
                                         if all(f in value for f in folders) else None)
        means = [row.extras[g] for g in complete]
        if all(m is not None for m in means):
            row.avg, row.complete = statistics.fmean(means), True


RANK_COLUMNS = (
    Column("val/mse", "MSE", "↓", ("val/mse",), 1.0, ".3g"),
    Column("val/relative_mse", "Rel. MSE", "↓", ("val/relative_mse",), 1.0, ".3g"),
    Column("rank/spearman", "Spearman", "↑", ("rank/spearman",), 1.0, ".3f"),
    Column("rank/energy", "Energy", "↑", ("rank/energy",), 1.0, ".3f"),
)


def rank_recovery_tables(runs: Sequence[Run], row_keys: Sequence[str]) -> list[Table]:
    """Per backbone and teacher spectrum: one row per method, validation MSE and rank-recovery scores."""
    tables = []
    for backbone, tune, group in _groups(runs, "subtask"):
        notes: list[str] = []
        mine = dedupe(group, notes, lambda r: method_label(r.row, row_keys))
        spectrum = mine[0].subtask
        columns = [c if not tune else Column(_tune(c.task, tune), c.header, c.label, (_tune(c.keys[0], tune),),
                                             c.scale, c.fmt) for c in RANK_COLUMNS]
        columns = [c for c in columns if any(c.keys[0] in r.final for r in mine)]
        tables.append(build_table(
            backbone, mine, columns, row_keys, lambda r, cs=columns: {c.task for c in cs}, notes,
            title=f"Rank recovery — {backbone}, {spectrum} spectrum" + (TUNE if tune else ""), family="synthetic",
            kind=f"rank_recovery/{spectrum}" + ("/tune" if tune else ""),
            caption="Mean ± sample std (ddof=1) over seeds, unscaled; n = seeds. MSE: validation MSE against the "
                    "teacher; Rel. MSE: MSE / initial MSE (↓ better). Spearman: rank correlation of the final live "
                    "ranks with the teacher's true ranks; Energy: share of the teacher update's energy recovered "
                    "(↑ better).",
            show_avg=False, plot=False,
        ))
    return tables
