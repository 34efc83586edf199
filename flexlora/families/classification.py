"""Sequence classification and regression on text encoders: GLUE (hub or canonical TSVs) and tweets."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flexlora.families.base import EvalRecords, Family, TaskData


class ClassificationFamily(Family):
    """GLUE and tweets: a classifier head on an encoder, cross-entropy (MSE for STS-B)."""

    @functools.cached_property
    def raw_splits(self) -> Any:
        """The text splits this run uses (train, then the evaluation splits), before tokenising; read once."""
        import datasets

        from flexlora.data.glue import load_glue, tune_split

        task = self.task
        if self.spec.reader is not None:
            from flexlora.family_registry import FamilyEntry

            read = FamilyEntry.resolve(self.spec.reader)
            raw = datasets.DatasetDict({
                split: datasets.Dataset.from_dict({**columns, "idx": list(range(len(columns["label"])))})
                for split, columns in read().items()
            })
        else:
            raw = load_glue(self.spec, task.data_dir, task.hub_id)
        if task.split == "tune":
            train, held_out = tune_split(raw["train"], seed=int(task.tune_seed))
            raw = datasets.DatasetDict({"train": train, "tune": held_out})
        return datasets.DatasetDict({name: _first(split, self._limit(name)) for name, split in raw.items()})

    def load_data(self) -> TaskData:
        from transformers import DataCollatorWithPadding

        from flexlora.backbones.text import load_tokenizer
        from flexlora.data.glue import tokenize

        tokenizer = load_tokenizer(self.backbone)
        splits = tokenize(self.raw_splits, tokenizer, int(self.task.max_length))
        collate = DataCollatorWithPadding(tokenizer)
        return TaskData(
            train=splits["train"].with_format("torch"),
            evals={name: splits[name].with_format("torch") for name in self.eval_splits},
            train_collate=collate, eval_collate=collate,
        )

    def head_bias(self) -> float | None:
        """Regression: the mean of the training targets (the head's output bias starts there)."""
        if not self.regression:
            return None
        labels = self.raw_splits["train"]["label"]
        return float(sum(labels) / len(labels))

    def _limit(self, split: str) -> int | None:
        value = self.task.max_train_samples if split == "train" else self.task.max_eval_samples
        return int(value) if value is not None else None

    def build_model(self) -> nn.Module:
        from flexlora.backbones.text import build_classifier

        assert self.spec.num_labels is not None
        return build_classifier(self.backbone, self.spec.num_labels)

    @staticmethod
    def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "idx")}
        return model(**inputs).logits

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction=reduction)
        return F.cross_entropy(logits.float(), labels, reduction=reduction)

    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self._loss(self._logits(model, batch), batch["labels"])

    def evaluate_batch(self, model: nn.Module, batch: Any, split: str) -> EvalRecords:
        logits = self._logits(model, batch)
        labels = batch["labels"]
        loss = self._loss(logits, labels, reduction="sum")
        if self.regression:
            predictions = logits.squeeze(-1).float().tolist()
            scores = None
        else:
            predictions = logits.argmax(dim=-1).tolist()
            scores = [[round(p, 6) for p in row] for row in logits.float().softmax(dim=-1).tolist()]
        return EvalRecords(batch["idx"].tolist(), labels.tolist(), predictions, scores, float(loss), len(predictions))


def _first(split: Any, limit: int | None) -> Any:
    return split.select(range(limit)) if limit is not None and limit < len(split) else split
