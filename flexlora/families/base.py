"""The task-family contract: one LightningModule and one DataModule serve every family through it.

A family says how its model is built, what a training batch's loss is, how an evaluation batch becomes
per-example predictions, and which official metrics those predictions give. Families know nothing of
Lightning: the module gathers their predictions (across processes under DDP) and computes metrics once per
evaluation, so every reported number comes from the gathered predictions (``flexlora.metrics``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flexlora.schemas import TASK_SCHEMAS, BackboneConfig, TaskConfig, backbone_config, config_object
from flexlora.tasks import TaskSpec, task_spec


@dataclass
class EvalRecords:
    """Per-example results of one evaluation batch (or of a whole split once gathered)."""

    idx: list[int] = field(default_factory=list)
    label: list[Any] = field(default_factory=list)
    prediction: list[Any] = field(default_factory=list)
    score: list[Any] | None = None
    loss_sum: float = 0.0
    loss_count: int = 0

    def extend(self, other: EvalRecords) -> None:
        self.idx += other.idx
        self.label += other.label
        self.prediction += other.prediction
        if other.score is not None:
            self.score = (self.score or []) + other.score
        self.loss_sum += other.loss_sum
        self.loss_count += other.loss_count

    def sorted(self) -> EvalRecords:
        """In example order, so metrics and files do not depend on how processes sharded the split."""
        order = sorted(range(len(self.idx)), key=self.idx.__getitem__)
        pick = lambda values: [values[i] for i in order]  # noqa: E731
        return EvalRecords(pick(self.idx), pick(self.label), pick(self.prediction),
                           pick(self.score) if self.score is not None else None, self.loss_sum, self.loss_count)


@dataclass
class TaskData:
    """What a family's data source gives the DataModule: datasets and how to batch them."""

    train: Any  # a map-style dataset (torch Dataset, datasets.Dataset or a list)
    evals: dict[str, Any]
    train_collate: Callable[[list[Any]], Any]
    eval_collate: Callable[[list[Any]], Any]


def task_name(task: Mapping[str, Any] | TaskConfig) -> str:
    """The task's name, from a typed task config or a plain config node."""
    return str(task.name if isinstance(task, TaskConfig) else task["name"])


class Family(ABC):
    """What differs between task families. Built from the task and backbone config nodes (``make_family``),
    which become typed schema objects here: the family's own task schema (named in its registry entry) and
    ``BackboneConfig``. Family code reads their attributes; the defaults are the schemas'."""

    # The rule ``degenerate`` applies, written into every metrics.json: a study that selects on a stricter rule
    # tells a run scored under an older one from a checked run (flexlora.studies.ScoreRecord). Rename it whenever
    # the rule flags more splits.
    degenerate_check = "constant-or-near-constant"

    def __init__(self, task: Mapping[str, Any] | TaskConfig, backbone: Mapping[str, Any] | BackboneConfig,
                 seed: int = 0) -> None:
        from flexlora.family_registry import family_entry

        self.spec: TaskSpec = task_spec(task_name(task))
        self.task: Any = config_object(TASK_SCHEMAS[family_entry(self.spec.family).task_schema], task)
        self.backbone: BackboneConfig = backbone_config(backbone)
        self.seed = seed

    # -------------------------------------------------------------- declared by the config
    @property
    def eval_splits(self) -> list[str]:
        """The evaluation splits a run reports: ``tune`` under ``task.split=tune``, else the task's own."""
        return ["tune"] if self.task.split == "tune" else [s.name for s in self.spec.eval_splits]

    @property
    def metric_names(self) -> Sequence[str]:
        return self.spec.metrics

    @property
    def regression(self) -> bool:
        return self.spec.is_regression

    supports_tune = True  # task.split=tune: evaluate on a held-out part of the training data

    def check(self) -> None:
        """Cheap checks of the config against the data on disk, run before any model is built."""
        from flexlora.errors import FlexLoRAError

        if self.task.split == "tune" and not self.supports_tune:
            raise FlexLoRAError(f"task={self.spec.name} has no split=tune; use split=test (the default)")

    # -------------------------------------------------------------- data
    @abstractmethod
    def load_data(self) -> TaskData:
        """Read and prepare the splits (tokenise, index); the DataModule batches and shards them."""

    # -------------------------------------------------------------- model
    @abstractmethod
    def build_model(self) -> nn.Module:
        """The backbone with its task head, in train mode, before adapters are injected."""

    def head_bias(self) -> float | None:
        """Where a regression head's output bias starts (the training targets' mean); None: no change."""
        return None

    @abstractmethod
    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The task loss of one training batch (the orthogonality penalty is added by the module)."""

    @abstractmethod
    def evaluate_batch(self, model: nn.Module, batch: Any, split: str) -> EvalRecords:
        """Per-example predictions (and loss sums where the task has a loss) of one evaluation batch."""

    def batch_size(self, batch: Any) -> int:
        return int(batch["labels"].shape[0])

    # -------------------------------------------------------------- metrics
    def metrics(self, split: str, records: EvalRecords) -> dict[str, float]:
        """Official metrics of one gathered split (scikit-learn / scipy on the predictions)."""
        from flexlora.metrics import official_metrics

        values = {f"{split}/{k}": v for k, v in official_metrics(self.metric_names, records.label,
                                                                  records.prediction).items()}
        if records.loss_count:
            values[f"{split}/loss"] = records.loss_sum / records.loss_count
        return values

    def degenerate(self, records: EvalRecords) -> str:
        """Why a split's predictions are degenerate (all the same), or '' when they are not."""
        from flexlora.metrics import describe_degenerate

        if not records.prediction:
            return ""
        return describe_degenerate(records.prediction, self.regression, records.label)

    def summary_metrics(self, per_split: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """Metrics across splits (commonsense's average); default none."""
        return {}

    def model_metrics(self, model: nn.Module, adapters: Mapping[str, Any]) -> dict[str, float]:
        """Metrics read off the trained model itself (rank recovery); default none."""
        return {}
