"""VTAB-1k image classification in the folder layout of NOAH / VPT: list files plus an ``images/`` folder.

A task folder holds ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``, one
``<relative image path> <integer label>`` per line. The papers' protocol (``split="test"``) trains on
train800val200 and reports top-1 accuracy on test; ``split="tune"`` trains on train800 and evaluates on
val200 for hyper-parameter search. The evaluation split is always called ``val`` so that every run logs
``val/accuracy``. Every listed image is checked to exist and read as an image when the data is set up; pixels are
decoded lazily, one per ``__getitem__``: a test set can hold ~20k images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from flexlora.errors import FlexLoRAError

Protocol = Literal["test", "tune"]
LIST_FILES: tuple[str, ...] = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")
# (training list, evaluation list) of each protocol
PROTOCOLS: dict[str, tuple[str, str]] = {
    "test": ("train800val200.txt", "test.txt"),
    "tune": ("train800.txt", "val200.txt"),
}
GROUPS: tuple[str, ...] = ("Natural", "Specialized", "Structured")


@dataclass(frozen=True)
class VTABTask:
    """One VTAB-1k task: its folder name (NOAH's ``get_vtab1k.py``), table name, group and class count."""

    folder: str
    display: str
    group: str
    num_classes: int


def _tasks(group: str, rows: Sequence[tuple[str, str, int]]) -> list[VTABTask]:
    return [VTABTask(folder, display, group, n) for folder, display, n in rows]


# In the column order of the papers' VTAB-1k tables. Folder names and class counts are those written and read
# by NOAH (data/vtab-source/get_vtab1k.py, lib/datasets.py); VPT's own code reads tfds, not these folders.
VTAB_TASKS: dict[str, VTABTask] = {
    t.folder: t
    for t in [
        *_tasks("Natural", [
            ("cifar", "Cifar100", 100), ("caltech101", "Caltech101", 102), ("dtd", "DTD", 47),
            ("oxford_flowers102", "Flowers102", 102), ("oxford_iiit_pet", "Pets", 37), ("svhn", "SVHN", 10),
            ("sun397", "Sun397", 397),
        ]),
        *_tasks("Specialized", [
            ("patch_camelyon", "Camelyon", 2), ("eurosat", "EuroSAT", 10), ("resisc45", "Resisc45", 45),
            ("diabetic_retinopathy", "Retinopathy", 5),
        ]),
        *_tasks("Structured", [
            ("clevr_count", "Clevr-Count", 8), ("clevr_dist", "Clevr-Dist", 6), ("dmlab", "DMLab", 6),
            ("kitti", "KITTI-Dist", 4), ("dsprites_loc", "dSpr-Loc", 16), ("dsprites_ori", "dSpr-Ori", 16),
            ("smallnorb_azi", "sNORB-Azim", 18), ("smallnorb_ele", "sNORB-Elev", 9),
        ]),
    ]
}


def vtab_task(folder: str) -> VTABTask:
    """The task named by its folder; unknown names list the known ones (typos are the usual cause)."""
    try:
        return VTAB_TASKS[folder]
    except KeyError:
        raise FlexLoRAError(
            f"unknown VTAB-1k task {folder!r}; the 19 task folders are: {', '.join(VTAB_TASKS)}"
        ) from None


class VTABEntry(tuple[Path, int]):
    """``(image path, label)`` that also remembers its list file, line and index, for ``idx`` and messages.

    A plain 2-tuple to its consumers (``for path, label in entries`` works); the extra fields ride along.
    """

    source: Path
    line: int
    index: int

    def __new__(cls, path: Path, label: int, source: Path, line: int, index: int) -> VTABEntry:
        self = super().__new__(cls, (path, label))
        self.source, self.line, self.index = source, line, index
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # so spawned DataLoader workers can unpickle it
        return (self[0], self[1], self.source, self.line, self.index)

    @property
    def where(self) -> str:
        """``list file:line``, the place a user fixes a bad entry."""
        return f"{self.source}:{self.line}"


class VTABSplits(dict[str, list[VTABEntry]]):
    """``{"train": [...], "val": [...]}`` plus ``num_classes`` (max label + 1 over the folder's lists)."""

    num_classes: int

    def __init__(self, splits: Mapping[str, list[VTABEntry]], num_classes: int) -> None:
        super().__init__(splits)
        self.num_classes = num_classes


def _missing_list_message(path: Path) -> str:
    folder = path.parent
    if not folder.is_dir():
        return (
            f"{path} not found: the folder {folder} does not exist; point the data directory at a VTAB-1k task "
            f"folder (e.g. vtab-1k/{next(iter(VTAB_TASKS))}) holding {', '.join(LIST_FILES)}"
        )
    present = sorted(p.name for p in folder.glob("*.txt"))
    has = ", ".join(present) if present else "no .txt list files"
    return (
        f"{path} not found; {folder} has {has}, but a VTAB-1k task folder needs {', '.join(LIST_FILES)} "
        "(as written by NOAH's get_vtab1k.py)"
    )


def _read_entries(path: Path) -> list[tuple[str, int, int]]:
    """``(relative path, label, file line)`` per non-blank line; every malformation names file and line."""
    if not path.is_file():
        raise FlexLoRAError(_missing_list_message(path))
    rows: list[tuple[str, int, int]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            text = raw.strip()
            if not text:
                continue
            parts = text.rsplit(None, 1)  # the path may contain spaces; the label is the last field
            if len(parts) < 2:
                raise FlexLoRAError(
                    f"{path}:{lineno}: expected '<relative image path> <integer label>', got {text!r} "
                    "(no label); add the label or delete the line"
                )
            rel, raw_label = parts
            try:
                label = int(raw_label)
            except ValueError:
                raise FlexLoRAError(
                    f"{path}:{lineno}: label {raw_label!r} is not an integer; expected "
                    "'<relative image path> <integer label>' with a class index 0, 1, 2, ..."
                ) from None
            if label < 0:
                raise FlexLoRAError(
                    f"{path}:{lineno}: label {label} is negative; class indices start at 0, fix the label"
                )
            rows.append((rel, label, lineno))
    if not rows:
        raise FlexLoRAError(
            f"{path} has no entries; expected one '<relative image path> <integer label>' per line"
        )
    return rows


def read_list(path: str | Path) -> list[tuple[str, int]]:
    """The ``(relative image path, label)`` pairs of one VTAB-1k list file, in file order."""
    return [(rel, label) for rel, label, _ in _read_entries(Path(path))]


def load_vtab_splits(
    data_dir: str | Path,
    split: Protocol = "test",
    *,
    num_classes: int | None = None,
    check_files: bool = True,
) -> VTABSplits:
    """The ``train`` and ``val`` entries of a task folder under a protocol.

    ``split="test"``: train800val200 / test (the papers' numbers); ``split="tune"``: train800 / val200.
    ``num_classes`` defaults to max label + 1 over all list files present; given explicitly, a label at or
    beyond it is an error naming file and line. ``check_files`` checks up front that every image exists and
    reads as an image (no pixel decode); what only a full decode finds still surfaces lazily, naming file and line.
    """
    if split not in PROTOCOLS:
        raise FlexLoRAError(f"VTAB split must be 'test' (train800val200 -> test) or 'tune' (train800 -> val200), "
                            f"got {split!r}")
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise FlexLoRAError(
            f"VTAB-1k task folder {folder} does not exist; set the data directory to a folder such as "
            f"vtab-1k/{next(iter(VTAB_TASKS))} holding {', '.join(LIST_FILES)}"
        )
    train_name, eval_name = PROTOCOLS[split]
    lists = {name: _read_entries(folder / name) for name in (train_name, eval_name)}
    # the other lists count for num_classes too when present (they are the same task's labels)
    for name in LIST_FILES:
        if name not in lists and (folder / name).is_file():
            lists[name] = _read_entries(folder / name)

    if num_classes is None:
        num_classes = 1 + max(label for rows in lists.values() for _, label, _ in rows)
    elif num_classes < 1:
        raise FlexLoRAError(f"num_classes must be >= 1, got {num_classes}")
    else:
        for name, rows in lists.items():
            for _, label, lineno in rows:
                if label >= num_classes:
                    raise FlexLoRAError(
                        f"{folder / name}:{lineno}: label {label} is out of range for {num_classes} classes "
                        f"(labels 0..{num_classes - 1}); fix the label or the number of classes"
                    )

    splits: dict[str, list[VTABEntry]] = {}
    for split_name, list_name in (("train", train_name), ("val", eval_name)):
        source = folder / list_name
        entries = [
            VTABEntry(folder / rel, label, source, lineno, index)
            for index, (rel, label, lineno) in enumerate(lists[list_name])
        ]
        if check_files:
            _check_exist(entries)
        splits[split_name] = entries
    return VTABSplits(splits, num_classes)


def _check_exist(entries: Sequence[VTABEntry]) -> None:
    """Every listed image exists and its file is a readable image (header and integrity, ``PIL.Image.verify``:
    no pixel decode, so a 20k-image test list costs seconds); a broken file is named with its list line now,
    not when the batch holding it is drawn."""
    missing = [e for e in entries if not e[0].is_file()]
    if missing:
        first = missing[0]
        more = f" ({len(missing)} of {len(entries)} listed images are missing)" if len(missing) > 1 else ""
        raise FlexLoRAError(
            f"{first.where}: image {first[0]} does not exist{more}; paths are relative to the task folder "
            f"{first.source.parent}, check that images/ was extracted there"
        )
    for entry in entries:
        try:
            with Image.open(entry[0]) as image:
                image.verify()
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            raise FlexLoRAError(
                f"{entry.where}: cannot decode image {entry[0]} ({type(err).__name__}: {err}); replace the file or "
                "remove its line from the list"
            ) from err


class VTABImageDataset(Dataset):
    """Decodes, converts to RGB, resizes and normalises one image per item with a ViT image processor.

    ``processor`` is a transformers image processor (the PIL/NumPy backend, so no torchvision); its
    ``size``, ``image_mean`` and ``image_std`` decide the tensor. Items are
    ``{"pixel_values": FloatTensor(3, H, W), "labels": int, "idx": int}`` with ``idx`` the entry's index in
    its list file, so predictions can be written back in file order.
    """

    def __init__(self, entries: Sequence[tuple[Path, int]], processor: Any) -> None:
        self.entries = list(entries)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self.entries[i]
        path, label = Path(entry[0]), int(entry[1])
        where = entry.where if isinstance(entry, VTABEntry) else f"entry {i}"
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")  # grayscale and palette images -> 3 identical / expanded channels
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            raise FlexLoRAError(
                f"{where}: cannot decode image {path} ({type(err).__name__}: {err}); replace the file or remove "
                "its line from the list"
            ) from err
        pixels = self.processor(images=rgb, return_tensors="np")["pixel_values"][0]
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)),
            "labels": label,
            "idx": entry.index if isinstance(entry, VTABEntry) else i,
        }


def collate_images(batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stacks items into ``pixel_values`` (B, 3, H, W) float, ``labels`` (B,) long and ``idx`` (B,) long."""
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "labels": torch.tensor([int(item["labels"]) for item in batch], dtype=torch.long),
        "idx": torch.tensor([int(item["idx"]) for item in batch], dtype=torch.long),
    }
