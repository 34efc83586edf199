"""A run folder: its file names, one atomic-write helper, and reading / writing what training leaves there.

Every writer goes through :func:`atomic_write` (write a temporary file in the same folder, flush it to disk,
rename), so a reader never sees half a file and a killed run leaves either the old file or the new one.
``metrics.json`` is written last: a folder with a complete one is a finished run. Training, export, the result
tables, the studies and the benchmarks read and write run folders through this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
EVENTS = "ranks.jsonl"
RANK_PATTERN = "rank_pattern.json"
TRAINED_STATE = "trained_state.safetensors"
CHECKPOINTS = "checkpoints"


def atomic_write(path: Path | str, write: Callable[[IO[Any]], None], binary: bool = False) -> Path:
    """``write(handle)`` into a temporary sibling of ``path``, fsync, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb" if binary else "w") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text))


def write_json(path: Path | str, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def read_metrics(run_dir: Path | str) -> dict[str, Any] | None:
    """The metrics of a finished run (a complete, parseable metrics.json with final metrics), else None."""
    try:
        metrics = json.loads((Path(run_dir) / METRICS).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("final") else None


def is_finished(run_dir: Path | str) -> bool:
    return read_metrics(run_dir) is not None


def save_trained_state(state: Mapping[str, Any], run_dir: Path | str) -> Path:
    """The final trained tensors (safetensors) in the run folder."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in state.items()})
    return atomic_write(Path(run_dir) / TRAINED_STATE, lambda handle: handle.write(data), binary=True)


def load_trained_state(run_dir: Path | str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / TRAINED_STATE))
