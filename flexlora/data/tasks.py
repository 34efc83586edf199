"""What each task is: its text fields, labels, official metrics and where its splits live (hub and TSV)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flexlora.errors import FlexLoRAError


@dataclass(frozen=True)
class EvalSplit:
    name: str  # prefix of logged metrics, e.g. "val" -> "val/accuracy"
    hub_split: str
    tsv_file: str


@dataclass(frozen=True)
class TaskSpec:
    """One classification (or regression) task.

    ``tsv_columns``: header names of (text_a, text_b, label) in the canonical GLUE TSV; ``None`` for
    CoLA, whose files have no header and are read by position (``tsv_positions``). ``labels`` maps the
    TSV's label strings to the ids used by ``nyu-mll/glue`` on the hub (so both sources agree).
    """

    name: str
    hub_config: str
    hub_text: tuple[str, str | None]
    num_labels: int
    metrics: tuple[str, ...]
    tsv_columns: tuple[str, str | None, str] | None
    labels: dict[str, int] | None = None
    tsv_positions: tuple[int, int | None, int] | None = None
    eval_splits: tuple[EvalSplit, ...] = (EvalSplit("val", "validation", "dev.tsv"),)
    train_tsv: str = "train.tsv"
    tsv_dir_names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


_NLI2 = {"entailment": 0, "not_entailment": 1}

TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec(
        "cola", "cola", ("sentence", None), 2, ("mcc", "accuracy"), None,
        tsv_positions=(3, None, 1), tsv_dir_names=("CoLA",),
    ),
    "sst2": TaskSpec(
        "sst2", "sst2", ("sentence", None), 2, ("accuracy",), ("sentence", None, "label"),
        tsv_dir_names=("SST-2",),
    ),
    "mrpc": TaskSpec(
        "mrpc", "mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1"), ("#1 String", "#2 String", "Quality"),
        tsv_dir_names=("MRPC",),
    ),
    "qqp": TaskSpec(
        "qqp", "qqp", ("question1", "question2"), 2, ("accuracy", "f1"), ("question1", "question2", "is_duplicate"),
        tsv_dir_names=("QQP",),
    ),
    "stsb": TaskSpec(
        "stsb", "stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearman"), ("sentence1", "sentence2", "score"),
        tsv_dir_names=("STS-B",),
    ),
    "mnli": TaskSpec(
        "mnli", "mnli", ("premise", "hypothesis"), 3, ("accuracy",), ("sentence1", "sentence2", "gold_label"),
        labels={"entailment": 0, "neutral": 1, "contradiction": 2},
        eval_splits=(
            EvalSplit("val_m", "validation_matched", "dev_matched.tsv"),
            EvalSplit("val_mm", "validation_mismatched", "dev_mismatched.tsv"),
        ),
        tsv_dir_names=("MNLI",),
    ),
    "qnli": TaskSpec(
        "qnli", "qnli", ("question", "sentence"), 2, ("accuracy",), ("question", "sentence", "label"),
        labels=_NLI2, tsv_dir_names=("QNLI",),
    ),
    "rte": TaskSpec(
        "rte", "rte", ("sentence1", "sentence2"), 2, ("accuracy",), ("sentence1", "sentence2", "label"),
        labels=_NLI2, tsv_dir_names=("RTE",),
    ),
    "tweets": TaskSpec("tweets", "", ("text", None), 2, ("accuracy", "f1"), None),
}


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise FlexLoRAError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
