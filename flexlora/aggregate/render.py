"""Tables out: Markdown (what the papers print), long-format CSV (what plots and diffs read), a PNG bar chart."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from flexlora.aggregate.collect import DEFAULT_ROWS
from flexlora.aggregate.core import Table, format_avg, format_cell, format_number


def render_markdown(tables: Sequence[Table]) -> str:
    out = []
    for table in tables:
        header = ["Method (# Params)", *(c.title for c in table.columns), *table.extra_headers]
        header += ["Avg"] if table.show_avg else []
        out += [f"## {table.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in table.rows:
            cells = [format_cell(row.cells.get(c.task)) for c in table.columns]
            cells += [format_number(row.extras.get(h)) for h in table.extra_headers]
            cells += [format_avg(row)] if table.show_avg else []
            out.append("| " + " | ".join([row.label, *cells]) + " |")
        if table.caption:
            out += ["", table.caption]
        if table.notes:
            out += ["", *(f"- {note}" for note in table.notes)]
        out.append("")
    return "\n".join(out)


def _num(value: float | None, scale: float = 100.0) -> str:
    if value is None or math.isnan(value):
        return ""
    return f"{value:.4f}" if scale == 100.0 else f"{value:.6g}"


def write_csv(tables: Sequence[Table], path: Path, row_keys: Sequence[str] = DEFAULT_ROWS) -> None:
    """One line per method, column and metric key (scaled as in the table), plus group means and Avg."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["table", "backbone", "method", *row_keys, "task", "metric", "mean", "std", "n", "seeds",
                         "degenerate_seeds"])
        for table in tables:
            for row in table.rows:
                head = [table.kind, table.backbone, row.label, *row.key]
                for column in table.columns:
                    cell = row.cells.get(column.task)
                    for key, stat in zip(column.keys, cell.stats if cell else [], strict=False):
                        writer.writerow([*head, column.task, key, _num(stat.mean, column.scale),
                                         _num(stat.std, column.scale), stat.n, " ".join(map(str, cell.seeds)),
                                         " ".join(map(str, cell.degenerate))])
                for name in table.extra_headers:
                    writer.writerow([*head, name, "group_mean", _num(row.extras.get(name)), "", "", "", ""])
                if table.show_avg:
                    writer.writerow([*head, "Avg", "avg" if row.complete else "avg_incomplete", _num(row.avg), "",
                                     len(row.cells), "", ""])


def render_png(tables: Sequence[Table], path: Path) -> bool:
    """Grouped bars per table: columns (and Avg) on x, one bar per row; error bars = std of the per-run number.

    Tables of unscaled, mixed-direction metrics (rank recovery) are left out. False when nothing was drawn.
    """
    tables = [t for t in tables if t.plot and t.rows]
    if not tables:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width_in = min(40.0, 2 + 1.3 * (max(len(t.columns) + len(t.extra_headers) for t in tables) + 1))
    fig, axes = plt.subplots(len(tables), 1, figsize=(width_in, 3.6 * len(tables)), squeeze=False)
    for ax, table in zip(axes[:, 0], tables, strict=True):
        names = [c.header for c in table.columns] + table.extra_headers + (["Avg"] if table.show_avg else [])
        width = 0.8 / max(1, len(table.rows))
        for i, row in enumerate(table.rows):
            heights, errors = [], []
            for column in table.columns:
                cell = row.cells.get(column.task)
                heights.append(cell.value if cell else math.nan)
                errors.append(statistics.stdev(cell.per_run) if cell and len(cell.per_run) > 1 else math.nan)
            extra = [row.extras.get(h) for h in table.extra_headers] + ([row.avg] if table.show_avg else [])
            heights += [math.nan if v is None else v for v in extra]
            errors += [math.nan] * len(extra)
            xs = [x + (i - (len(table.rows) - 1) / 2) * width for x in range(len(names))]
            ax.bar(xs, heights, width, yerr=errors, capsize=2, label=row.label)
        ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 10 else 0, fontsize=8)
        ax.set_ylabel("score x100")
        ax.set_title(table.title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
