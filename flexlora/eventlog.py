"""The run's event log: one record per allocation event (plus the start and end patterns), and its file.

One log, one resume path: the allocation Callback owns the records and keeps them in its checkpoint state;
``ranks.jsonl`` mirrors them, a whole line per event. On resume the file is rewritten from the checkpoint's
records, so an event written after the checkpoint by a killed run never appears twice. Readers (tables,
figures, the notebook) use :func:`read_events`, which tolerates a torn last line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flexlora.rundir import atomic_write_text


def json_safe(value: Any) -> Any:
    """NaN / inf become None, so every line is strict JSON (other tools read these files too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class EventLog:
    """The records of one run, in order; a file sink is optional (rank 0 only)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []

    def append(self, record: Mapping[str, Any]) -> None:
        entry = json_safe(dict(record))
        self.records.append(entry)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:  # one write of a whole line
                handle.write(json.dumps(entry) + "\n")

    def reset(self, records: Iterable[Mapping[str, Any]] = ()) -> None:
        """Replace the records (fresh start, or a checkpoint's) and rewrite the file to match, atomically."""
        self.records = [json_safe(dict(r)) for r in records]
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def events(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "event"]


def read_events(path: Path | str) -> list[dict[str, Any]]:
    """The records of a ranks.jsonl; a torn last line (a run killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records
