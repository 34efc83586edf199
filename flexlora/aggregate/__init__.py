"""Run folders -> the papers' result tables and paired comparisons (``flexlora-aggregate``, see ``cli``).

Light on purpose (no torch unless VTAB runs are present): it runs on a laptop over a copied ``multirun/``.
"""

from flexlora.aggregate.collect import DEFAULT_ROWS, Run, collect
from flexlora.aggregate.core import Cell, Column, Row, Stat, Table, format_avg, format_cell
from flexlora.aggregate.render import render_markdown, render_png, write_csv
from flexlora.aggregate.tables import summarise

__all__ = [
    "DEFAULT_ROWS", "Cell", "Column", "Row", "Run", "Stat", "Table", "collect", "format_avg", "format_cell",
    "render_markdown", "render_png", "summarise", "write_csv",
]
