"""Image classification on ViT: VTAB-1k tasks in their folder layout (train800val200 -> test, or tune)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flexlora.families.base import EvalRecords, Family, TaskData


class ImageFamily(Family):
    """``task=vtab task.data_dir=<vtab-1k>/<task>``: top-1 accuracy on ``test`` (``tune`` under split=tune)."""

    @functools.cached_property
    def splits(self) -> Any:
        from flexlora.data.vtab import VTAB_TASKS, load_vtab_splits
        from flexlora.errors import FlexLoRAError

        if not self.task.data_dir:
            raise FlexLoRAError("task=vtab needs task.data_dir=<vtab-1k folder>/<task>, e.g. vtab-1k/cifar")
        folder = Path(self.task.data_dir).name
        known = VTAB_TASKS[folder].num_classes if folder in VTAB_TASKS else None
        num_classes = self.task.num_classes or known  # a label beyond a known count is a data error
        return load_vtab_splits(self.task.data_dir, self.task.split, num_classes=num_classes)

    def check(self) -> None:
        super().check()
        _ = self.splits.num_classes  # reads the list files: their errors come before any model is built

    def load_data(self) -> TaskData:
        from flexlora.backbones.vision import load_image_processor
        from flexlora.data.vtab import VTABImageDataset, collate_images

        processor = load_image_processor(self.backbone)
        train = self.splits["train"]
        evaluation = self.splits["val"]
        limit = self.task.max_train_samples
        train = train[: int(limit)] if limit is not None else train
        limit = self.task.max_eval_samples
        evaluation = evaluation[: int(limit)] if limit is not None else evaluation
        return TaskData(train=VTABImageDataset(train, processor),
                        evals={self.eval_splits[0]: VTABImageDataset(evaluation, processor)},
                        train_collate=collate_images, eval_collate=collate_images)

    def build_model(self) -> nn.Module:
        from flexlora.backbones.vision import load_image_classifier

        return load_image_classifier(self.backbone, self.splits.num_classes)

    @staticmethod
    def _logits(model: nn.Module, batch: Any) -> torch.Tensor:
        return model(pixel_values=batch["pixel_values"]).logits

    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self._logits(model, batch).float(), batch["labels"])

    def evaluate_batch(self, model: nn.Module, batch: Any, split: str) -> EvalRecords:
        logits = self._logits(model, batch).float()
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
        predictions = logits.argmax(dim=-1).tolist()
        return EvalRecords(batch["idx"].tolist(), batch["labels"].tolist(), predictions, None, float(loss),
                           len(predictions))
