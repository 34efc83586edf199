"""The table model every family shares: columns of metric keys, cells of mean ± std over seeds, rows per method.

Why one model: GLUE, commonsense, VTAB and rank recovery differ only in which runs feed a column and how a row
is averaged, so missing-seed reports, degenerate marks, Markdown and CSV are written once.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flexlora.aggregate.collect import Run, seed_order, shown
from flexlora.allocators.config import load_methods

DAGGER = "†"


@dataclass(frozen=True)
class Column:
    task: str  # column id: GLUE task, commonsense set, VTAB folder or metric key
    header: str
    label: str  # the metric as the paper's header names it ("" when the header says it all)
    keys: tuple[str, ...]  # metric keys in metrics.json "final"; several are averaged into the task's number
    scale: float = 100.0
    fmt: str = ".2f"

    @property
    def splits(self) -> set[str]:
        """Evaluation splits the column's keys come from (``val_m/accuracy`` -> ``val_m``)."""
        return {k.split("/", 1)[0] for k in self.keys}

    @property
    def title(self) -> str:
        return f"{self.header} {self.label}".strip()


@dataclass
class Stat:
    mean: float
    std: float | None  # None when n < 2
    n: int


@dataclass
class Cell:
    stats: list[Stat]  # one per metric key of the column, scaled
    seeds: list[Any]
    per_run: list[float]  # each run's number for the column (its metrics averaged), scaled
    degenerate: list[Any] = field(default_factory=list)  # seeds whose predictions were constant
    fmt: str = ".2f"

    @property
    def value(self) -> float:
        """The column's one number: the mean of its metric means (MNLI m/mm, QQP Acc/F1)."""
        means = [s.mean for s in self.stats if s.n]
        return statistics.fmean(means) if means else math.nan


@dataclass
class Row:
    key: tuple[str, ...]
    label: str
    params: float | None
    cells: dict[str, Cell]
    avg: float | None = None
    complete: bool = True
    extras: dict[str, float | None] = field(default_factory=dict)  # VTAB group means


@dataclass
class Table:
    backbone: str
    columns: list[Column]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    title: str = ""
    family: str = "classification"
    kind: str = "glue"  # short id in the CSV: glue, commonsense, vtab, rank_recovery/<spectrum>; "/tune" appended
    caption: str = ""
    extra_headers: list[str] = field(default_factory=list)
    show_avg: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        self.title = self.title or self.backbone


def row_order(key: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
    order = list(load_methods())
    return (order.index(key[0]) if key[0] in order else len(order), key)


def method_label(key: tuple[str, ...], row_keys: Sequence[str], params: float | None = None) -> str:
    """``FlexLoRA importance=entropy (1.90M)``: the method's paper name, extra row keys, trainable parameters."""
    methods = load_methods()
    name = methods[key[0]].label if key and key[0] in methods else (key[0] if key else "?")
    extras = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(row_keys[1:], key[1:], strict=False)]
    label = " ".join([name, *extras])
    if params is None:
        return label
    return f"{label} ({params / 1e6:.2f}M)" if params >= 5e3 else f"{label} ({params / 1e3:.1f}K)"


def make_stat(values: list[float]) -> Stat:
    if not values:
        return Stat(math.nan, None, 0)
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def is_degenerate(run: Run, column: Column, table_splits: set[str]) -> bool:
    """Whether the run's predictions were constant on a split this column reads.

    A flagged split that no column of the table reads (naming mismatch) marks every cell of the run: a degenerate
    run must never pass unmarked.
    """
    return any(s in column.splits or s not in table_splits for s in run.degenerate_splits)


def make_cell(column: Column, runs: list[Run], notes: list[str], table_splits: set[str]) -> Cell:
    """mean ± std over the runs per key; missing or NaN (undefined) metrics are left out and noted."""
    stats = []
    for key in column.keys:
        values, undefined = [], []
        for r in runs:
            value = r.final.get(key)
            if value is None:
                notes.append(f"{shown(r.path)} has no {key}")
            elif math.isnan(value):
                undefined.append(str(r.path))
            else:
                values.append(column.scale * value)
        if undefined:
            notes.append(f"{key} is NaN (undefined: constant predictions or ranks) in {len(undefined)} run(s), "
                         f"left out of the mean: {', '.join(undefined)}")
        stats.append(make_stat(values))
    per_run = []
    for r in runs:
        values = [column.scale * r.final[k] for k in column.keys if not math.isnan(r.final.get(k, math.nan))]
        if values:
            per_run.append(statistics.fmean(values))
    degenerate = sorted((r.seed for r in runs if is_degenerate(r, column, table_splits)), key=seed_order)
    return Cell(stats, sorted((r.seed for r in runs), key=seed_order), per_run, degenerate, column.fmt)


def build_table(backbone: str, runs: list[Run], columns: list[Column], row_keys: Sequence[str],
                units: Callable[[Run], set[str]], notes: list[str], *, required: Sequence[str] | None = None,
                **table: Any) -> Table:
    """Rows per row key, a cell per column from the runs whose ``units`` include it, Avg over the row's cells.

    ``required``: the columns a row needs for an unmarked Avg (default: all of the table's columns); a row
    lacking some averages the ones it has and is marked ``*``. Missing seeds (relative to the other rows of a
    column) and missing columns are listed in the notes, as are degenerate runs.
    """
    required = [c.task for c in columns] if required is None else list(required)
    table_splits = set().union(*(c.splits for c in columns)) if columns else set()
    expected = {c.task: {r.seed for r in runs if c.task in units(r)} for c in columns}
    rows, missing, degenerate = [], [], []
    for key in sorted({r.row for r in runs}, key=row_order):
        row_runs = [r for r in runs if r.row == key]
        params = [r.trainable_params for r in row_runs if r.trainable_params is not None]
        mean_params = statistics.fmean(params) if params else None
        row = Row(key, method_label(key, row_keys, mean_params), mean_params, {})
        name = method_label(key, row_keys)
        for column in columns:
            col_runs = [r for r in row_runs if column.task in units(r)]
            if not col_runs:
                missing.append(f"{name} {column.header}: no runs")
                continue
            row.cells[column.task] = cell = make_cell(column, col_runs, notes, table_splits)
            lacking = sorted(expected[column.task] - set(cell.seeds), key=seed_order)
            if lacking:
                missing.append(f"{name} {column.header}: seed {', '.join(map(str, lacking))} missing "
                               f"(n={len(cell.seeds)} of {len(expected[column.task])})")
            degenerate += [f"{name} {column.header} seed {r.seed} ({r.describe_degenerate()}): {shown(r.path)}"
                           for r in col_runs if r.seed in cell.degenerate]
        values = {t: c.value for t, c in row.cells.items() if not math.isnan(c.value)}
        row.avg = statistics.fmean(values.values()) if values else None
        row.complete = all(t in values for t in required)
        rows.append(row)
    if missing:
        notes.insert(0, "Missing runs: " + "; ".join(missing) + ".")
    if degenerate:
        notes.append(f"{DAGGER} Degenerate (constant predictions on that split; numbers kept, not trustworthy): "
                     + "; ".join(degenerate) + ".")
    return Table(backbone, columns, rows, notes, **table)


def format_number(value: float | None, fmt: str = ".2f") -> str:
    return "–" if value is None or math.isnan(value) else format(value, fmt)


def format_cell(cell: Cell | None) -> str:
    """``83.00 ± 3.61 (n=3)``; ``/`` between a column's metrics; ``(n=2 of 3)`` when metrics were left out;
    ``†`` when a seed's predictions were degenerate."""
    if cell is None:
        return "–"
    parts = [("–" if not s.n else format(s.mean, cell.fmt) + (f" ± {s.std:{cell.fmt}}" if s.std is not None else ""))
             for s in cell.stats]
    used = min((s.n for s in cell.stats), default=0)
    n = f"n={len(cell.seeds)}" if used == len(cell.seeds) else f"n={used} of {len(cell.seeds)}"
    return " / ".join(parts) + f" ({n})" + (DAGGER if cell.degenerate else "")


def format_avg(row: Row) -> str:
    return "–" if row.avg is None else f"{row.avg:.2f}" + ("" if row.complete else "*")
