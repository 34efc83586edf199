"""Rank figures from an event log (no Lightning): shared by the run reporter, the notebook and the tables.

Every function takes plain records (``ranks.jsonl`` lines: ``step``, ``kind``, ``ranks``, ``importance``,
``total_rank``, ``budget``) and returns a matplotlib Figure; the caller saves, shows or logs it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")  # files only; decided when a figure is made, never at import
    import matplotlib.pyplot as plt

    return plt


def layer_grid(values: Mapping[str, float]) -> tuple[list[str], list[str], list[list[float]]]:
    """Arrange per-matrix values as layers x module types (rows: layer index, columns: module type).

    A module name like ``deberta.encoder.layer.3.attention.self.query_proj`` has layer ``3`` and type
    ``attention.self.query_proj``; names without a layer index go to a row named after their prefix.
    """
    layers: list[str] = []
    types: list[str] = []
    cells: dict[tuple[str, str], float] = {}
    for name, value in values.items():
        match = re.search(r"\.(\d+)\.(.+)$", name)
        layer, kind = (match.group(1), match.group(2)) if match else (name.rsplit(".", 1)[0], name.rsplit(".", 1)[-1])
        if layer not in layers:
            layers.append(layer)
        if kind not in types:
            types.append(kind)
        cells[(layer, kind)] = float(value)
    grid = [[cells.get((layer, kind), float("nan")) for kind in types] for layer in layers]
    return layers, types, grid


def short_name(name: str) -> str:
    """``deberta.encoder.layer.3.attention.self.query_proj`` -> ``3.query_proj``."""
    layers, types, _ = layer_grid({name: 0})
    return f"{layers[0]}.{types[0].replace('attention.self.', '').replace('attention.', 'attn.')}"


def heatmap_figure(ranks: Mapping[str, int], title: str):
    """Final (or any) live rank as layers x module types, annotated."""
    plt = _pyplot()
    layers, types, grid = layer_grid(ranks)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(types), max(3.0, 0.9 + 0.35 * len(layers))))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(types)), [t.replace("attention.", "attn.") for t in types], rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [f"layer {x}" for x in layers])
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:g}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=ax, label="live rank")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def dynamics_figure(records: Sequence[Mapping[str, Any]], title: str = ""):
    """Total live rank (and budget) over the events, and every matrix's live rank per record."""
    plt = _pyplot()
    steps = [r["step"] for r in records]
    names = list(records[0]["ranks"]) if records else []
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 4 + 0.12 * len(names)), gridspec_kw={"height_ratios": [1, 2]})
    top.plot(steps, [r["total_rank"] for r in records], marker=".", label="total live rank")
    budgets = [(r["step"], r["budget"]) for r in records if r.get("budget") is not None]
    if budgets:
        top.plot(*zip(*budgets, strict=True), linestyle="--", label="budget")
    top.set_xlabel("optimizer step")
    top.set_ylabel("rank")
    top.legend()
    if title:
        top.set_title(title)
    matrix = [[r["ranks"][n] for r in records] for n in names]
    image = bottom.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    if len(names) <= 80:
        bottom.set_yticks(range(len(names)), [short_name(n) for n in names], fontsize=6)
    ticks = [str(r["step"]) if r.get("kind") == "event" else str(r.get("kind")) for r in records]
    if len(records) <= 60:
        bottom.set_xticks(range(len(records)), ticks, rotation=90, fontsize=6)
    bottom.set_xlabel("start, allocation events (optimizer step), end")
    fig.colorbar(image, ax=bottom, label="live rank")
    fig.tight_layout()
    return fig


def importance_figure(events: Sequence[Mapping[str, Any]], title: str = ""):
    """Importance per matrix at each event (log10 when the scores span many decades, as AdaLoRA's do);
    None when no event carries scores."""
    scored = [e for e in events if e.get("importance")]
    if not scored:
        return None
    plt = _pyplot()
    names = list(scored[0]["importance"])
    values = [[_num(e["importance"].get(n)) for e in scored] for n in names]
    flat = [v for row in values for v in row if v == v]
    log_scale = bool(flat) and min(flat) > 0 and max(flat) / min(flat) > 1e3
    if log_scale:
        values = [[math.log10(v) if v == v else v for v in row] for row in values]
    fig, ax = plt.subplots(figsize=(min(16, 4 + 0.25 * len(scored)), 1.5 + 0.18 * len(names)))
    image = ax.imshow(values, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(names)), [short_name(n) for n in names], fontsize=7)
    ax.set_xticks(range(len(scored)), [str(e["step"]) for e in scored], rotation=90, fontsize=7)
    ax.set_xlabel("event (optimizer step)")
    ax.set_title(title or "importance per matrix at each event")
    fig.colorbar(image, ax=ax, label="log10 importance" if log_scale else "importance")
    fig.tight_layout()
    return fig


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan
