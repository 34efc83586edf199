"""An independent reference reader for canonical GLUE TSVs (the csv module, QUOTE_NONE), as the project read
them before flexlora/data/glue.py moved to the datasets library: tests check that both give the same rows."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from flexlora.errors import FlexLoRAError
from flexlora.tasks import TaskSpec

Columns = dict[str, list[Any]]


def read_glue_tsv(path: Path, spec: TaskSpec) -> Columns:
    """Parse one canonical GLUE TSV (tab, ``csv.QUOTE_NONE``, UTF-8 with optional BOM).

    A row that does not fit the task's layout is an error naming the file and line.
    """
    if not path.is_file():
        raise FlexLoRAError(
            f"GLUE {spec.name}: {path} does not exist; task.data_dir must be the task's folder of canonical GLUE "
            f"TSV files ({spec.train_tsv}, {', '.join(s.tsv_file for s in spec.eval_splits)})"
        )
    text_a: list[str] = []
    text_b: list[str] = []
    labels: list[float | int] = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if spec.tsv_columns is None:
            assert spec.tsv_positions is not None
            ia, ib, il = spec.tsv_positions
            width = max(p for p in (ia, ib, il) if p is not None) + 1
            layout = f"{width} positional fields"
        else:
            header = next(reader, None)
            if header is None:
                raise FlexLoRAError(f"{path}: the file is empty")
            try:
                ia, il = header.index(spec.tsv_columns[0]), header.index(spec.tsv_columns[2])
                ib = header.index(spec.tsv_columns[1]) if spec.tsv_columns[1] else None
            except ValueError as err:
                raise FlexLoRAError(
                    f"{path}:1: header {header[:10]} lacks a column GLUE {spec.name} needs "
                    f"({[c for c in spec.tsv_columns if c]}); is this the right task's file?"
                ) from err
            width = len(header)
            layout = f"{width} fields like its header"
        for row in reader:
            line = reader.line_num
            if not row or row == [""]:
                continue
            needed = max(p for p in (ia, ib, il) if p is not None) + 1
            if len(row) < needed or (spec.tsv_columns is not None and len(row) != width and spec.name != "mnli"):
                raise FlexLoRAError(
                    f"{path}:{line}: malformed GLUE {spec.name} row, expected {layout}, got {len(row)}; "
                    "the file must be canonical GLUE TSV (tab-separated, no quoting)"
                )
            raw_label = row[il].strip()
            try:
                if spec.is_regression:
                    label: float | int = float(raw_label)
                elif spec.labels is not None:
                    label = spec.labels[raw_label]
                else:
                    label = int(raw_label)
                    if not 0 <= label < spec.num_labels:
                        raise ValueError(raw_label)
            except (KeyError, ValueError) as err:
                raise FlexLoRAError(
                    f"{path}:{line}: malformed GLUE {spec.name} row, label {raw_label!r} is not a valid label"
                ) from err
            text_a.append(row[ia])
            if ib is not None:
                text_b.append(row[ib])
            labels.append(label)
    columns: Columns = {"text_a": text_a, "label": labels}
    if spec.hub_text[1] is not None:
        columns["text_b"] = text_b
    return columns


def load_glue_tsv(data_dir: str | os.PathLike, spec: TaskSpec) -> dict[str, Columns]:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FlexLoRAError(
            f"task.data_dir={str(data_dir)!r} is not a folder; point it at the GLUE {spec.name} folder holding "
            f"{spec.train_tsv} (e.g. glue_data/{spec.tsv_dir_names[0] if spec.tsv_dir_names else spec.name})"
        )
    splits = {"train": read_glue_tsv(root / spec.train_tsv, spec)}
    for split in spec.eval_splits:
        splits[split.name] = read_glue_tsv(root / split.tsv_file, spec)
    return splits


# ---------------------------------------------------------------- Hub
def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Quick TCP check of the Hub endpoint, so an unreachable hub fails in seconds, not after retries."""
