"""GLUE splits through the ``datasets`` library, cached by fingerprint so a repeated run neither re-reads nor
re-tokenises. Local TSVs go through the library's csv loader (pandas, tab, ``QUOTE_NONE``); as pandas pads short
rows and turns an over-long first row into an index without a word, each file is scanned once, before its first
parse, for encoding and field counts. Every ``map`` gets an explicit fingerprint, so a fresh process finds the
cached arrow files without hashing functions or tokenizers through dill.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from pathlib import Path
from typing import Any

import datasets

from flexlora.errors import FlexLoRAError
from flexlora.tasks import TaskSpec

# Bump when the converted or tokenised columns change: old caches must then stop matching.
_VERSION = "glue-1"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what pandas' C parser and the csv module both treat as a line end


def load_glue(spec: TaskSpec, data_dir: str | None, hub_id: str = "nyu-mll/glue", *,
              cache_dir: str | None = None) -> datasets.DatasetDict:
    """``train`` plus the spec's eval splits with ``text_a``, ``text_b`` (pair tasks), ``label`` and ``idx``.

    ``cache_dir`` is where the arrow caches live (``None``: the library's ``HF_DATASETS_CACHE``); the converted
    and tokenised splits are written next to the parsed ones, so one folder holds everything for a run.
    """
    if data_dir:
        return _load_local(spec, Path(data_dir).expanduser(), cache_dir)
    return _load_hub(spec, hub_id, cache_dir)


def tokenize(splits: datasets.DatasetDict, tokenizer: Any, max_length: int) -> datasets.DatasetDict:
    """``input_ids``/``attention_mask`` (+ ``token_type_ids``), ``labels`` and ``idx`` per split, cached next
    to each input split; the fingerprint names the input, the tokenizer's content and ``max_length``."""
    identity = _tokenizer_identity(tokenizer)
    out = {}
    for name, split in splits.items():
        pair = "text_b" in split.column_names
        out[name] = split.map(
            _tokenize_batch, batched=True, remove_columns=[c for c in split.column_names if c != "idx"],
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "pair": pair},
            new_fingerprint=_digest("tokenize", split._fingerprint, identity, max_length),
            load_from_cache_file=True, desc=f"tokenise {name}",
        )
    return datasets.DatasetDict(out)


def tune_split(train: datasets.Dataset, fraction: float = 0.1, max_size: int = 2000,
               seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest of train, held-out part) for hyper-parameter search. Drawn by a private generator seeded with
    ``seed`` only, so every run of a sweep scores on the same examples whatever its training seed."""
    if not 0 < fraction < 1 or max_size < 1:
        raise FlexLoRAError(f"tune_split: fraction must be in (0, 1) and max_size >= 1, got {fraction}, {max_size}")
    if len(train) < 2:
        raise FlexLoRAError(f"tune_split: the training split has {len(train)} example(s); at least 2 are needed")
    size = min(max_size, max(1, round(len(train) * fraction)), len(train) - 1)
    held = set(random.Random(seed).sample(range(len(train)), size))
    keep = [i for i in range(len(train)) if i not in held]
    return train.select(keep), train.select(sorted(held))


# ---------------------------------------------------------------- local TSV
def _load_local(spec: TaskSpec, root: Path, cache_dir: str | None) -> datasets.DatasetDict:
    if not root.is_dir():
        raise FlexLoRAError(
            f"task.data_dir={str(root)!r} is not a folder; point it at the GLUE {spec.name} folder holding "
            f"{spec.train_tsv} (e.g. glue_data/{spec.tsv_dir_names[0] if spec.tsv_dir_names else spec.name})"
        )
    files = {"train": root / spec.train_tsv} | {s.name: root / s.tsv_file for s in spec.eval_splits}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise FlexLoRAError(
            f"GLUE {spec.name}: {root} lacks {', '.join(missing)}; task.data_dir must be the task's folder of "
            f"canonical GLUE TSV files ({', '.join(p.name for p in files.values())})"
        )
    out = {}
    for name, path in files.items():
        layout = _layout(path, spec)
        parsed = _parse(path, spec, layout, cache_dir)
        out[name] = parsed.map(
            _convert_batch, batched=True, with_indices=True, remove_columns=parsed.column_names,
            fn_kwargs={"spec": spec, "positions": layout[0], "path": str(path)}, features=_features(spec),
            new_fingerprint=_digest("tsv", parsed._fingerprint, spec, layout), load_from_cache_file=True,
            desc=f"convert {spec.name}/{name}",
        )
    return datasets.DatasetDict(out)


def _parse(path: Path, spec: TaskSpec, layout: tuple[Any, int, int], cache_dir: str | None) -> datasets.Dataset:
    """One file through the library's csv loader, into an arrow cache keyed by its path and mtime. One builder
    per file: MNLI's dev files have more columns than its train file, which one set of names cannot cover."""
    names = [f"f{i}" for i in range(layout[1])]
    builder = datasets.load_dataset_builder(
        "csv", data_files={"train": str(path)}, cache_dir=cache_dir, delimiter="\t", quoting=3,
        keep_default_na=False, encoding="utf-8-sig", header=None if spec.tsv_columns is None else 0,
        column_names=names, features=datasets.Features({n: datasets.Value("string") for n in names}),
    )
    if not os.path.exists(os.path.join(builder.cache_dir, datasets.config.DATASET_INFO_FILENAME)):
        _scan(path, spec, layout)  # first parse only: a cache exists only for a file that passed
    try:
        builder.download_and_prepare()
        return builder.as_dataset(split="train")
    except Exception as err:  # pandas/pyarrow errors arrive wrapped in the library's DatasetGenerationError
        cause: BaseException = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(cause))
        if found:
            raise FlexLoRAError(
                f"{path}:{found[2]}: expected {found[1]} tab-separated fields, found {found[3]}; the file must be "
                "canonical GLUE TSV (tab-separated, no quoting)"
            ) from err
        first = (str(cause).strip().splitlines() or [""])[0]
        raise FlexLoRAError(f"{path}: cannot read it into the cache ({type(cause).__name__}: {first})") from err


def _layout(path: Path, spec: TaskSpec) -> tuple[tuple[int, int | None, int], int, int]:
    """(positions of text_a, text_b, label), number of fields, fewest fields a row may have."""
    if spec.tsv_columns is None:
        assert spec.tsv_positions is not None
        width = max(p for p in spec.tsv_positions if p is not None) + 1
        return spec.tsv_positions, width, width
    with path.open("rb") as handle:
        first = handle.readline()
    header = _LINE_BREAK.split(_decode(first, path).removeprefix("\ufeff"), maxsplit=1)[0].split("\t")
    try:
        ia, il = header.index(spec.tsv_columns[0]), header.index(spec.tsv_columns[2])
        ib = header.index(spec.tsv_columns[1]) if spec.tsv_columns[1] else None
    except ValueError:
        raise FlexLoRAError(
            f"{path}:1: header {header[:10]} lacks a column GLUE {spec.name} needs "
            f"({[c for c in spec.tsv_columns if c]}); is this the right task's file?"
        ) from None
    # MNLI rows may stop early (optional annotator labels), as in the old reader
    fewest = max(p for p in (ia, ib, il) if p is not None) + 1 if spec.name == "mnli" else len(header)
    return (ia, ib, il), len(header), fewest


def _scan(path: Path, spec: TaskSpec, layout: tuple[Any, int, int]) -> None:
    """Encoding and field count of every line: pandas would pad short rows or shift long ones silently."""
    _, width, fewest = layout
    lines, skip = _lines(path, spec)
    what = f"{width} tab-separated fields" + (" like its header" if skip else f" (GLUE {spec.name} layout)")
    rows = [(number, line.count("\t") + 1) for number, line in enumerate(lines[skip:], start=skip + 1)
            if line.strip(" ")]  # pandas skips empty and all-space lines; so did the old reader
    for number, fields in rows:
        if not fewest <= fields <= width:
            raise FlexLoRAError(f"{path}:{number}: expected {what}, found {fields}; the file must be canonical GLUE "
                                "TSV (tab-separated, no quoting)")
    if not rows:
        where = f"{path}:{skip + 1}: no examples" + (" after the header" if skip else "")
        raise FlexLoRAError(f"{where}; GLUE {spec.name} needs at least one")


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise FlexLoRAError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at byte offset {err.start}); "
            "GLUE TSV files are UTF-8, re-save the file as UTF-8"
        ) from None


def _lines(path: Path, spec: TaskSpec) -> tuple[list[str], int]:
    """The file's lines and how many of them are the header (0 or 1)."""
    return _LINE_BREAK.split(_decode(path.read_bytes(), path).removeprefix("\ufeff")), int(spec.tsv_columns is not None)


def _line_of(path: str, spec: TaskSpec, row: int) -> int:
    """Line number (header = 1) of the ``row``-th example, counting the blank lines pandas skipped."""
    lines, skip = _lines(Path(path), spec)
    seen = -1
    for number, line in enumerate(lines[skip:], start=skip + 1):
        seen += bool(line.strip(" "))
        if seen == row:
            return number
    return row + skip + 1


def _convert_batch(batch: dict[str, list[Any]], indices: list[int], *, spec: TaskSpec, positions: Any,
                   path: str) -> dict:
    ia, ib, il = positions
    labels: list[int | float] = []
    for row, raw in zip(indices, batch[f"f{il}"], strict=True):
        text = (raw or "").strip()
        try:
            labels.append(_label(text, spec))
        except (KeyError, ValueError):
            line = _line_of(path, spec, row)
            raise FlexLoRAError(f"{path}:{line}: label {text!r} is not {_expected(spec)}") from None
    out: dict[str, list[Any]] = {"text_a": batch[f"f{ia}"], "label": labels, "idx": indices}
    if ib is not None and spec.hub_text[1] is not None:
        out["text_b"] = batch[f"f{ib}"]
    return out


def _label(text: str, spec: TaskSpec) -> int | float:
    """The hub's id for a TSV label, by the old reader's rules; KeyError/ValueError when the task has none such."""
    if spec.is_regression:
        if not math.isfinite(score := float(text)):
            raise ValueError(text)
        return score
    if spec.labels is not None:
        return spec.labels[text]
    if not 0 <= (value := int(text)) < (spec.num_labels or 0):
        raise ValueError(text)
    return value


def _expected(spec: TaskSpec) -> str:
    names = spec.labels or [str(i) for i in range(spec.num_labels or 0)]
    return "a number (the similarity score)" if spec.is_regression else "one of " + ", ".join(names)


def _features(spec: TaskSpec) -> datasets.Features:
    columns = {"text_a": datasets.Value("string")} | ({"text_b": datasets.Value("string")} if spec.hub_text[1] else {})
    columns["label"] = datasets.Value("float64" if spec.is_regression else "int64")
    columns["idx"] = datasets.Value("int64")
    return datasets.Features(columns)


# ---------------------------------------------------------------- hub
def _load_hub(spec: TaskSpec, hub_id: str, cache_dir: str | None) -> datasets.DatasetDict:
    from flexlora.backbones.hub import hub_reachable

    reachable, why = hub_reachable()
    try:
        if not reachable and os.environ.get("HF_HUB_OFFLINE") is None:
            raise ConnectionError(why)
        dataset = datasets.load_dataset(hub_id, spec.hub_config, cache_dir=cache_dir)
    except Exception as err:  # datasets raises many types for "not available"
        raise FlexLoRAError(
            f"GLUE {spec.name}: cannot load {hub_id}/{spec.hub_config} from the Hugging Face Hub or its cache "
            f"({why or type(err).__name__}). Pass task.data_dir=<folder with {spec.train_tsv} and "
            f"{', '.join(s.tsv_file for s in spec.eval_splits)}> to read canonical GLUE TSV files instead "
            "(or set HF_HUB_OFFLINE=1 if the dataset is already in your Hugging Face cache)"
        ) from err
    key_a, key_b = spec.hub_text
    out = {}
    for name, hub_split in [("train", "train")] + [(s.name, s.hub_split) for s in spec.eval_splits]:
        part = dataset[hub_split]
        out[name] = part.map(
            _hub_batch, batched=True, with_indices=True, remove_columns=part.column_names,
            fn_kwargs={"key_a": key_a, "key_b": key_b}, features=_features(spec),
            new_fingerprint=_digest("hub", part._fingerprint, key_a, key_b), load_from_cache_file=True,
            desc=f"convert {spec.name}/{name}",
        )
    return datasets.DatasetDict(out)


def _hub_batch(batch: dict[str, list[Any]], indices: list[int], *, key_a: str, key_b: str | None) -> dict:
    out = {"text_a": batch[key_a], "label": batch["label"], "idx": indices}
    if key_b is not None:
        out["text_b"] = batch[key_b]
    return out


# ---------------------------------------------------------------- tokenisation
def _tokenize_batch(batch: dict[str, list[Any]], *, tokenizer: Any, max_length: int, pair: bool) -> dict:
    texts = (batch["text_a"], batch["text_b"]) if pair else (batch["text_a"],)
    encoded = dict(tokenizer(*texts, truncation=True, max_length=max_length))
    encoded["labels"] = batch["label"]
    return encoded


def _tokenizer_identity(tokenizer: Any) -> str:
    """What decides the token ids: class, source, vocabulary and the whole pipeline (normaliser, special tokens,
    post-processor), hashed once per call. Library versions are included: an upgrade may change the output."""
    import tokenizers
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # to_str() opens with version, truncation, padding: the state the last call left, not the tokenizer's
        # identity. The rest (vocab, normaliser, post-processor...) decides the ids. Re-encoding JSON costs 0.1 s.
        text = backend.to_str()
        content = text[max(text.find('"added_tokens":'), 0):]
    else:  # a slow (Python) tokenizer: its vocabulary and settings
        content = repr(sorted(tokenizer.get_vocab().items())) + repr(sorted(tokenizer.init_kwargs.items()))
    parts = (type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), tokenizer.truncation_side,
             tuple(tokenizer.model_input_names), repr(tokenizer.special_tokens_map), transformers.__version__,
             tokenizers.__version__, hashlib.sha256(content.encode()).hexdigest())
    return repr(parts)


def _digest(*parts: Any) -> str:
    """A cache key (64 hex chars at most, as the library requires) from the module version and ``parts``."""
    return hashlib.sha256(repr((_VERSION, *parts)).encode()).hexdigest()[:40]

