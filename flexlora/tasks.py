"""What each task is, in one place: its family, official metrics, main metric, table header, and (GLUE) where
its splits live. Light (no torch): the Hydra resolvers, the result tables and the data code all read it.

Evaluation split names: GLUE dev sets are ``val`` (MNLI ``val_m`` / ``val_mm``); VTAB-1k's test set is
``test``; commonsense uses one split per evaluated set (``boolq``, ...) plus the ``avg`` of their accuracies.
``task.split=tune`` (hyper-parameter search) evaluates on a held-out part of the training data instead,
and its metrics are named ``tune/...`` so a search result can never be mistaken for a reported one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from flexlora.errors import FlexLoRAError

Family = Literal["classification", "causal_lm", "image", "synthetic"]


@dataclass(frozen=True)
class EvalSplit:
    name: str  # prefix of logged metrics, e.g. "val" -> "val/accuracy"
    hub_split: str = ""
    tsv_file: str = ""


@dataclass(frozen=True)
class TaskSpec:
    """One task. ``metrics``: the official metrics of every evaluation split. ``keys``: the metrics.json keys
    whose mean is the task's number in the papers' tables, under the column ``header`` / ``label``.

    GLUE fields: ``tsv_columns`` are header names of (text_a, text_b, label) in the canonical TSV (``None`` for
    CoLA, read by position, ``tsv_positions``); ``labels`` maps TSV label strings to the ids of
    ``nyu-mll/glue`` on the hub, so both sources agree.
    """

    name: str
    family: Family
    header: str
    label: str
    metrics: tuple[str, ...]
    keys: tuple[str, ...]
    num_labels: int | None = None  # None: read from the data (VTAB) or not a classifier
    lower_is_better: bool = False
    hub_config: str = ""
    hub_text: tuple[str, str | None] = ("sentence", None)
    tsv_columns: tuple[str, str | None, str] | None = None
    labels: dict[str, int] | None = None
    tsv_positions: tuple[int, int | None, int] | None = None
    eval_splits: tuple[EvalSplit, ...] = (EvalSplit("val", "validation", "dev.tsv"),)
    train_tsv: str = "train.tsv"
    tsv_dir_names: tuple[str, ...] = field(default_factory=tuple)
    # a classification task not read as GLUE: "module:function" returning {split: {column: values}}
    reader: str | None = None
    # what tells a task's runs apart in result tables besides the task: (config key, keep only the folder name)
    subtask_key: tuple[str, bool] | None = None

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def main_metric(self) -> str:
        return self.keys[0]

    def main_metric_for(self, split: str = "test") -> str:
        """The metric sweepers optimise and tables rank by; ``tune/...`` under ``task.split=tune``."""
        metric = self.main_metric
        if split == "tune":
            return "tune/" + metric.split("/", 1)[1]
        return metric


_NLI2 = {"entailment": 0, "not_entailment": 1}


def _glue(name: str, header: str, label: str, metrics: tuple[str, ...], keys: tuple[str, ...], num_labels: int,
          hub_text: tuple[str, str | None], tsv_columns: tuple[str, str | None, str] | None, folder: str,
          **extra: Any) -> TaskSpec:
    return TaskSpec(name, "classification", header, label, metrics, keys, num_labels=num_labels, hub_config=name,
                    hub_text=hub_text, tsv_columns=tsv_columns, tsv_dir_names=(folder,), **extra)


# The AdaLoRA paper's column order (its Table 1), then the offline tweets task and the other families.
TASKS: dict[str, TaskSpec] = {
    "mnli": _glue("mnli", "MNLI", "m/mm", ("accuracy",), ("val_m/accuracy", "val_mm/accuracy"), 3,
                  ("premise", "hypothesis"), ("sentence1", "sentence2", "gold_label"), "MNLI",
                  labels={"entailment": 0, "neutral": 1, "contradiction": 2},
                  eval_splits=(EvalSplit("val_m", "validation_matched", "dev_matched.tsv"),
                               EvalSplit("val_mm", "validation_mismatched", "dev_mismatched.tsv"))),
    "sst2": _glue("sst2", "SST-2", "Acc", ("accuracy",), ("val/accuracy",), 2, ("sentence", None),
                  ("sentence", None, "label"), "SST-2"),
    "cola": _glue("cola", "CoLA", "Mcc", ("mcc", "accuracy"), ("val/mcc",), 2, ("sentence", None), None, "CoLA",
                  tsv_positions=(3, None, 1)),
    "qqp": _glue("qqp", "QQP", "Acc/F1", ("accuracy", "f1"), ("val/accuracy", "val/f1"), 2,
                 ("question1", "question2"), ("question1", "question2", "is_duplicate"), "QQP"),
    "qnli": _glue("qnli", "QNLI", "Acc", ("accuracy",), ("val/accuracy",), 2, ("question", "sentence"),
                  ("question", "sentence", "label"), "QNLI", labels=_NLI2),
    "rte": _glue("rte", "RTE", "Acc", ("accuracy",), ("val/accuracy",), 2, ("sentence1", "sentence2"),
                 ("sentence1", "sentence2", "label"), "RTE", labels=_NLI2),
    "mrpc": _glue("mrpc", "MRPC", "Acc", ("accuracy", "f1"), ("val/accuracy",), 2, ("sentence1", "sentence2"),
                  ("#1 String", "#2 String", "Quality"), "MRPC"),
    "stsb": _glue("stsb", "STS-B", "Corr", ("pearson", "spearman"), ("val/pearson",), 1,
                  ("sentence1", "sentence2"), ("sentence1", "sentence2", "score"), "STS-B"),
    "tweets": TaskSpec("tweets", "classification", "tweets", "Acc", ("accuracy", "f1"), ("val/accuracy",),
                       num_labels=2, hub_text=("text", None), reader="flexlora.data.tweets:load_tweets"),
    "commonsense": TaskSpec("commonsense", "causal_lm", "Commonsense", "Acc", ("accuracy",), ("avg/accuracy",)),
    "vtab": TaskSpec("vtab", "image", "VTAB-1k", "Acc", ("accuracy",), ("test/accuracy",),
                     eval_splits=(EvalSplit("test"),), subtask_key=("task.data_dir", True)),
    "rank_recovery": TaskSpec("rank_recovery", "synthetic", "Rank recovery", "MSE", ("mse", "relative_mse"),
                              ("val/mse",), lower_is_better=True, eval_splits=(EvalSplit("val"),),
                              subtask_key=("task.spectrum", False)),
}
GLUE_TASKS = tuple(name for name, spec in TASKS.items() if spec.hub_config)


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise FlexLoRAError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
