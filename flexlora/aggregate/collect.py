"""Reading run folders: every complete ``metrics.json`` becomes one :class:`Run`; anything else is reported.

Why so defensive: aggregation runs while a sweep is still writing, so half-written files, failed runs and
reruns of the same seed are normal, and each must be listed rather than crash the table or count twice.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora.rundir import METRICS, PREDICTIONS
from flexlora.tasks import TASKS

DEFAULT_ROWS = ("allocator.name",)


@dataclass
class Run:
    """One finished run, with the config values the tables group by."""

    path: Path  # its metrics.json
    backbone: str
    row: tuple[str, ...]  # values of the row keys, e.g. ("flexlora",)
    task: str  # config.task.name ("vtab", "commonsense", "rte", ...)
    seed: Any
    final: dict[str, float]
    trainable_params: int | None = None
    main_metric: str | None = None
    subtask: str = ""  # VTAB task folder, rank-recovery spectrum; "" otherwise
    split: str = "test"  # config.task.split: "tune" runs are tabulated apart from reportable ones
    degenerate: dict[str, bool] = field(default_factory=dict)
    degenerate_reason: dict[str, str] = field(default_factory=dict)  # split -> what collapsed (train.py's line)
    predictions: Path | None = None  # predictions.jsonl beside metrics.json, when it exists
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        """The task family (TASKS); unknown tasks are tabulated with the classification tasks, as before."""
        spec = TASKS.get(self.task)
        return spec.family if spec else "classification"

    @property
    def degenerate_splits(self) -> list[str]:
        return sorted(s for s, flag in self.degenerate.items() if flag)

    def describe_degenerate(self) -> str:
        """``val: constant predictions: every example predicted class 0 (...)``, one entry per flagged split."""
        return "; ".join(f"{s}: {self.degenerate_reason[s]}" if self.degenerate_reason.get(s) else s
                         for s in self.degenerate_splits)


def shown(path: Path) -> str:
    """A run's path as table notes print it: relative to the working folder when below it (tables get committed)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def get(config: dict[str, Any], dotted: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; None when any part is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def metric_files(paths: Iterable[str | Path]) -> list[Path]:
    """Every metrics.json below folders, plus files given directly (``*.tmp`` partial writes never count)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            if path.suffix == ".tmp":
                warn(f"skipping {path}: a partial write (*.tmp), not a metrics.json")
            else:
                files.append(path)
        elif path.is_dir():
            files += sorted(path.rglob(METRICS))
        else:
            warn(f"{path} does not exist")
    return files


def _subtask(task: str, config: dict[str, Any]) -> str:
    """The value that tells runs of one task apart (a VTAB folder, a rank-recovery spectrum; TaskSpec.subtask_key)."""
    spec = TASKS.get(task)
    if spec is None or spec.subtask_key is None:
        return ""
    key, folder_name = spec.subtask_key
    value = get(config, key)
    if not value:
        return "?"
    return Path(str(value)).name if folder_name else str(value)


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def collect(paths: Iterable[str | Path], row_keys: Sequence[str] = DEFAULT_ROWS, which: str = "final",
            skipped: list[str] | None = None) -> list[Run]:
    """Every readable, finished run below ``paths`` (folders or metrics.json files).

    ``which``: ``final`` (the final weights, default) or ``best`` (the best value per metric over the run's
    evaluations, as papers that report the best dev epoch do). Runs that are unreadable (still being written) or
    have no metrics are warned about and, when ``skipped`` is given, listed there as ``"path: reason"``.
    """
    runs: list[Run] = []

    def skip(file: Path, reason: str) -> None:
        warn(f"skipping {file}: {reason}")
        if skipped is not None:
            skipped.append(f"{file}: {reason}")

    for file in metric_files(paths):
        try:
            metrics = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            skip(file, f"unreadable, unfinished run? ({err})")
            continue
        if not isinstance(metrics, dict):
            skip(file, "not a JSON object")
            continue
        final, config = metrics.get(which), metrics.get("config") or {}
        if not isinstance(final, dict) or not final:
            skip(file, f"no '{which}' metrics (unfinished or failed run?)")
            continue
        task = get(config, "task.name")
        if task is None:
            skip(file, "its config names no task")
            continue
        name = metrics.get("predictions") or PREDICTIONS
        predictions = file.parent / str(name)
        degenerate, reasons = metrics.get("degenerate"), metrics.get("degenerate_reason")
        runs.append(Run(
            path=file, backbone=str(get(config, "backbone.name") or "?"),
            row=tuple(str(get(config, k)) for k in row_keys), task=str(task), seed=get(config, "seed"),
            final=_numbers(final), trainable_params=metrics.get("trainable_params"),
            main_metric=get(config, "task.main_metric") or metrics.get("optimized_metric"),
            subtask=_subtask(str(task), config), split=str(get(config, "task.split") or "test"),
            degenerate={str(k): bool(v) for k, v in degenerate.items()} if isinstance(degenerate, dict) else {},
            degenerate_reason={str(k): str(v) for k, v in reasons.items()} if isinstance(reasons, dict) else {},
            predictions=predictions if predictions.is_file() else None, config=config,
        ))
    return runs


def seed_order(seed: Any) -> tuple[int, Any]:
    return (0, seed) if isinstance(seed, int | float) else (1, str(seed))


def dedupe(runs: Sequence[Run], notes: list[str], describe: Any = None) -> list[Run]:
    """One run per (backbone, split, row, task, subtask, seed): the newest metrics.json; duplicates go into notes.

    ``describe(run)`` names a run in the note (default: its row values).
    """
    newest: dict[tuple, Run] = {}
    for run in sorted(runs, key=lambda r: (r.path.stat().st_mtime, str(r.path))):
        key = (run.backbone, run.split, run.row, run.task, run.subtask, run.seed)
        if key in newest:
            name = describe(run) if describe else " ".join(run.row)
            what = " ".join(x for x in (run.task, run.subtask) if x)
            kept, ignored = shown(run.path), shown(newest[key].path)
            notes.append(f"duplicate {name} {what} seed {run.seed}: kept {kept}, ignored {ignored}")
        newest[key] = run
    return list(newest.values())
