#!/usr/bin/env python
"""Run folders -> the AdaLoRA paper's result table (Markdown, CSV, PNG bar chart). No W&B needed.

    python scripts/aggregate.py multirun/<date_time> [more folders or metrics.json files] [--out DIR]

Every ``metrics.json`` below the given paths is one run. Runs are grouped into one table per backbone, one
row per allocator (``--rows`` adds config keys to the row, e.g. ``--rows allocator.name,allocator.importance``
for ablations) and one column per task with its official metric: MNLI m/mm, SST-2 Acc, CoLA Mcc, QQP Acc/F1,
QNLI Acc, RTE Acc, MRPC Acc, STS-B Corr (Pearson), tweets Acc. A cell is mean ± sample std (ddof=1) over the
seeds, x100, with the seed count: ``85.21 ± 0.40 (n=3)``. ``Avg`` averages one number per task as the papers
do (MNLI m/mm and QQP Acc/F1 averaged first); a row that lacks some of the table's tasks averages the tasks
it has and is marked ``*``. Missing seeds or tasks are listed under the table. Runs without ``final``
metrics (unfinished, failed) are skipped with a warning; of two runs with the same backbone, row, task and
seed the newer metrics.json is kept and the duplicate reported.

``--metrics best`` tabulates each run's best evaluation (``best`` in metrics.json) instead of the final one.
Writes ``results.md``, ``results.csv`` (long format: one line per method, task and metric, plus ``Avg``)
and ``results.png`` into ``--out`` (default: the first path) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Column:
    task: str
    header: str
    label: str  # the metric as the paper's header names it
    keys: tuple[str, ...]  # metric keys in metrics.json "final"; several are averaged into the task's number


# the AdaLoRA paper's column order (its Table 1), then the offline tweets task
COLUMNS = (
    Column("mnli", "MNLI", "m/mm", ("val_m/accuracy", "val_mm/accuracy")),
    Column("sst2", "SST-2", "Acc", ("val/accuracy",)),
    Column("cola", "CoLA", "Mcc", ("val/mcc",)),
    Column("qqp", "QQP", "Acc/F1", ("val/accuracy", "val/f1")),
    Column("qnli", "QNLI", "Acc", ("val/accuracy",)),
    Column("rte", "RTE", "Acc", ("val/accuracy",)),
    Column("mrpc", "MRPC", "Acc", ("val/accuracy",)),
    Column("stsb", "STS-B", "Corr", ("val/pearson",)),
    Column("tweets", "tweets", "Acc", ("val/accuracy",)),
)
KNOWN = {c.task: c for c in COLUMNS}
METHODS = {"lora": "LoRA", "adalora": "AdaLoRA", "flexlora": "FlexLoRA"}
DEFAULT_ROWS = ("allocator.name",)


@dataclass
class Run:
    path: Path
    backbone: str
    row: tuple[str, ...]  # values of the row keys, e.g. ("flexlora",)
    task: str
    seed: Any
    final: dict[str, float]
    trainable_params: int | None = None
    main_metric: str | None = None


@dataclass
class Stat:
    mean: float
    std: float | None  # None when n < 2
    n: int


@dataclass
class Cell:
    stats: list[Stat]  # one per metric of the column, x100
    seeds: list[Any]
    per_run: list[float]  # each run's number for the task (its metrics averaged), x100

    @property
    def value(self) -> float:
        """The task's one number: the mean of the column's metric means (MNLI m/mm, QQP Acc/F1)."""
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


@dataclass
class Table:
    backbone: str
    columns: list[Column]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _metric_files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(path.rglob("metrics.json"))
        else:
            warn(f"{path} does not exist")
    return files


def collect(paths: Iterable[str | Path], row_keys: Sequence[str] = DEFAULT_ROWS, which: str = "final") -> list[Run]:
    """Every readable, finished run below ``paths`` (folders or metrics.json files).

    ``which``: ``final`` (the final weights, default) or ``best`` (the best value per metric over the run's
    evaluations, as papers that report the best dev epoch do).
    """
    runs: list[Run] = []
    for file in _metric_files(paths):
        try:
            metrics = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            warn(f"skipping {file}: unreadable ({err})")
            continue
        final, config = metrics.get(which), metrics.get("config") or {}
        if not isinstance(final, dict) or not final:
            warn(f"skipping {file}: no '{which}' metrics (unfinished or failed run?)")
            continue
        task = _get(config, "task.name")
        if task is None:
            warn(f"skipping {file}: its config names no task")
            continue
        runs.append(Run(
            path=file, backbone=str(_get(config, "backbone.name") or "?"),
            row=tuple(str(_get(config, k)) for k in row_keys), task=str(task), seed=_get(config, "seed"),
            final={k: float(v) for k, v in final.items() if isinstance(v, int | float)},
            trainable_params=metrics.get("trainable_params"),
            main_metric=_get(config, "task.main_metric") or metrics.get("optimized_metric"),
        ))
    return runs


def _seed_order(seed: Any) -> tuple[int, Any]:
    return (0, seed) if isinstance(seed, int | float) else (1, str(seed))


def _row_order(key: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
    order = list(METHODS)
    return (order.index(key[0]) if key[0] in order else len(order), key)


def _label(key: tuple[str, ...], row_keys: Sequence[str], params: float | None) -> str:
    name = METHODS.get(key[0], key[0])
    extras = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(row_keys[1:], key[1:], strict=True)]
    label = " ".join([name, *extras])
    if params is None:
        return label
    return f"{label} ({params / 1e6:.2f}M)" if params >= 5e3 else f"{label} ({params / 1e3:.1f}K)"


def _stat(values: list[float]) -> Stat:
    if not values:
        return Stat(math.nan, None, 0)
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def _cell(column: Column, runs: list[Run], notes: list[str]) -> Cell:
    stats = []
    for key in column.keys:
        values = [100 * r.final[key] for r in runs if key in r.final]
        for r in runs:
            if key not in r.final:
                notes.append(f"{r.path} has no {key}")
        stats.append(_stat(values))
    per_run = []
    for r in runs:
        values = [100 * r.final[k] for k in column.keys if k in r.final]
        if values:
            per_run.append(statistics.fmean(values))
    return Cell(stats, sorted((r.seed for r in runs), key=_seed_order), per_run)


def _dedupe(runs: list[Run], notes: list[str], row_keys: Sequence[str]) -> list[Run]:
    """One run per (backbone, row, task, seed): the newest metrics.json; duplicates go into the notes."""
    newest: dict[tuple, Run] = {}
    for run in sorted(runs, key=lambda r: (r.path.stat().st_mtime, str(r.path))):
        key = (run.backbone, run.row, run.task, run.seed)
        if key in newest:
            notes.append(f"duplicate {_label(run.row, row_keys, None)} {run.task} seed {run.seed}: "
                         f"kept {run.path}, ignored {newest[key].path}")
        newest[key] = run
    return list(newest.values())


def summarise(runs: Sequence[Run], row_keys: Sequence[str] = DEFAULT_ROWS) -> list[Table]:
    """One Table per backbone: cells (mean, std, n per metric), Avg per row, notes on missing runs."""
    tables = []
    for backbone in sorted({r.backbone for r in runs}):
        notes: list[str] = []
        mine = _dedupe([r for r in runs if r.backbone == backbone], notes, row_keys)
        columns = [c for c in COLUMNS if any(r.task == c.task for r in mine)]
        for task in sorted({r.task for r in mine} - set(KNOWN)):
            metric = next(r.main_metric for r in mine if r.task == task) or "val/accuracy"
            columns.append(Column(task, task, metric.rsplit("/", 1)[-1], (metric,)))
        expected = {c.task: {r.seed for r in mine if r.task == c.task} for c in columns}
        rows, missing = [], []
        for key in sorted({r.row for r in mine}, key=_row_order):
            row_runs = [r for r in mine if r.row == key]
            params = [r.trainable_params for r in row_runs if r.trainable_params is not None]
            mean_params = statistics.fmean(params) if params else None
            row = Row(key, _label(key, row_keys, mean_params), mean_params, {})
            for column in columns:
                task_runs = [r for r in row_runs if r.task == column.task]
                name = _label(key, row_keys, None)
                if not task_runs:
                    missing.append(f"{name} {column.header}: no runs")
                    continue
                row.cells[column.task] = cell = _cell(column, task_runs, notes)
                lacking = sorted(expected[column.task] - set(cell.seeds), key=_seed_order)
                if lacking:
                    missing.append(f"{name} {column.header}: seed {', '.join(map(str, lacking))} missing "
                                   f"(n={len(cell.seeds)} of {len(expected[column.task])})")
            values = [c.value for c in row.cells.values() if not math.isnan(c.value)]
            row.avg = statistics.fmean(values) if values else None
            row.complete = len(values) == len(columns)
            rows.append(row)
        if missing:
            notes.insert(0, "Missing runs: " + "; ".join(missing) + ".")
        if not all(r.complete for r in rows):
            notes.append("* Avg over the tasks this row has (incomplete row).")
        tables.append(Table(backbone, columns, rows, notes))
    return tables


def format_cell(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    parts = [("–" if not s.n else f"{s.mean:.2f}" + (f" ± {s.std:.2f}" if s.std is not None else ""))
             for s in cell.stats]
    return " / ".join(parts) + f" (n={len(cell.seeds)})"


def format_avg(row: Row) -> str:
    return "–" if row.avg is None else f"{row.avg:.2f}" + ("" if row.complete else "*")


def render_markdown(tables: Sequence[Table]) -> str:
    out = []
    for table in tables:
        header = ["Method (# Params)", *(f"{c.header} {c.label}" for c in table.columns), "Avg"]
        out += [f"## {table.backbone}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in table.rows:
            cells = [format_cell(row.cells.get(c.task)) for c in table.columns]
            out.append("| " + " | ".join([row.label, *cells, format_avg(row)]) + " |")
        out += ["", "Mean ± sample std (ddof=1) over seeds, x100; n = seeds. Avg: one number per task "
                    "(MNLI m/mm and QQP Acc/F1 averaged first), averaged over tasks."]
        if table.notes:
            out += ["", *(f"- {note}" for note in table.notes)]
        out.append("")
    return "\n".join(out)


def write_csv(tables: Sequence[Table], path: Path, row_keys: Sequence[str] = DEFAULT_ROWS) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["backbone", "method", *row_keys, "task", "metric", "mean", "std", "n", "seeds"])
        for table in tables:
            for row in table.rows:
                head = [table.backbone, row.label, *row.key]
                for column in table.columns:
                    cell = row.cells.get(column.task)
                    for key, stat in zip(column.keys, cell.stats if cell else [], strict=False):
                        writer.writerow([*head, column.task, key, _num(stat.mean), _num(stat.std), stat.n,
                                         " ".join(map(str, cell.seeds))])
                writer.writerow([*head, "Avg", "avg" if row.complete else "avg_incomplete", _num(row.avg), "",
                                 len(row.cells), ""])


def _num(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.4f}"


def render_png(tables: Sequence[Table], path: Path) -> None:
    """Grouped bars: tasks (and Avg) on x, one bar per row; error bars = std of the per-run task number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 1, figsize=(2 + 1.3 * (max(len(t.columns) for t in tables) + 1),
                                                     3.6 * len(tables)), squeeze=False)
    for ax, table in zip(axes[:, 0], tables, strict=True):
        names = [c.header for c in table.columns] + ["Avg"]
        width = 0.8 / max(1, len(table.rows))
        for i, row in enumerate(table.rows):
            heights, errors = [], []
            for column in table.columns:
                cell = row.cells.get(column.task)
                heights.append(cell.value if cell else math.nan)
                errors.append(statistics.stdev(cell.per_run) if cell and len(cell.per_run) > 1 else math.nan)
            heights.append(row.avg if row.avg is not None else math.nan)
            errors.append(math.nan)
            xs = [x + (i - (len(table.rows) - 1) / 2) * width for x in range(len(names))]
            ax.bar(xs, heights, width, yerr=errors, capsize=2, label=row.label)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("score x100")
        ax.set_title(table.backbone)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders (searched recursively) or metrics.json files")
    parser.add_argument("--out", help="folder for results.md/.csv/.png (default: the first path)")
    parser.add_argument("--metrics", choices=("final", "best"), default="final",
                        help="final weights (default) or the best evaluation of each run")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help="comma-separated config keys that make a row (default: allocator.name)")
    args = parser.parse_args(argv)
    row_keys = tuple(k.strip() for k in args.rows.split(",") if k.strip())
    runs = collect(args.paths, row_keys, args.metrics)
    if not runs:
        where = " ".join(args.paths)
        print(f"error: no finished run (metrics.json with '{args.metrics}') under {where}", file=sys.stderr)
        return 1
    tables = summarise(runs, row_keys)
    markdown = render_markdown(tables)
    print(markdown)
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"# Results ({len(runs)} runs, {args.metrics} metrics)\n\n{markdown}")
    write_csv(tables, out / "results.csv", row_keys)
    render_png(tables, out / "results.png")
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
