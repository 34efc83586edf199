"""Config schemas of the backbone and task groups (the allocator schemas live in flexlora.allocators.config).

Registered with Hydra's ConfigStore by :mod:`flexlora.conf_store`, so a wrong type, an unknown field or a
value outside a ``Literal`` fails when the config is composed; every field documents itself in
``metadata["help"]``. Light (no torch), like the allocator schemas.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar

BackboneFamily = Literal["classification", "causal_lm", "image", "synthetic"]
Dtype = Literal["float32", "bfloat16", "float16"]
Split = Literal["test", "tune"]
EvalProtocol = Literal["loglik", "generate"]
Spectrum = Literal["flat", "decaying"]


@dataclass
class BackboneConfig:
    name: str = field(default="???", metadata={"help": "the backbone's name (the file name in conf/backbone)"})
    family: BackboneFamily = field(default="classification", metadata={"help": "task family the backbone serves"})
    hub_id: str | None = field(
        default=None, metadata={"help": "canonical Hugging Face Hub id, recorded in exported adapters"}
    )
    pretrained: str | None = field(
        default=None, metadata={"help": "hub id, local save_pretrained folder, or pkg:<python package>"}
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside the pretrained folder or package"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer source; null = pretrained"})
    from_config: dict[str, Any] | None = field(
        default=None, metadata={"help": "model_type + config kwargs of a random model (no weights)"}
    )
    config: dict[str, Any] = field(
        default_factory=lambda: {}, metadata={"help": "overrides of the Hugging Face config, e.g. {cls_dropout: 0.1}"}
    )
    dtype: Dtype | None = field(default=None, metadata={"help": "parameter dtype; null = as loaded"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward (large causal LMs)"}
    )
    target_modules: Any = field(
        default="???", metadata={"help": "adapted Linear/Conv1D modules: a full-match regex or a list of name suffixes"}
    )
    head_modules: list[str] = field(
        default_factory=lambda: [], metadata={"help": "modules trained in full besides the adapters (the task head)"}
    )
    width: int | None = field(default=None, metadata={"help": "synthetic backbone: the width d of its d x d matrices"})
    image_size: int | None = field(default=None, metadata={"help": "input resolution of a config-built vision model"})
    processor: dict[str, Any] | None = field(
        default=None, metadata={"help": "image processor kwargs (config-built) or overrides (pretrained)"}
    )
    target_preset: str | None = field(
        default=None, metadata={"help": "name of a target_presets entry (ViT: mlp | attn)"}
    )
    target_presets: dict[str, Any] | None = field(default=None, metadata={"help": "named target-module choices"})


@dataclass
class TaskConfig:
    name: str = field(default="???", metadata={"help": "task name (flexlora.tasks.TASKS)"})
    data_dir: str | None = field(
        default=None, metadata={"help": "local data folder; GLUE: null = the Hugging Face Hub"}
    )
    split: Split = field(
        default="test",
        metadata={"help": "test: report on the evaluation set; tune: hold out part of the training data"},
    )
    batch_size: int = field(default=32, metadata={"help": "training batch size (per process)"})
    eval_batch_size: int = field(default=64, metadata={"help": "evaluation batch size (per process)"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "cap on training examples (quick experiments)"}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "cap on evaluation examples per split"})


@dataclass
class GlueTaskConfig(TaskConfig):
    hub_id: str = field(default="nyu-mll/glue", metadata={"help": "hub dataset used when data_dir is null"})
    max_length: int = field(default=128, metadata={"help": "tokens per example (truncation)"})
    tune_seed: int = field(
        default=0, metadata={"help": "split=tune: seed of the held-out part (independent of the run's seed)"}
    )


@dataclass
class CommonsenseTaskConfig(TaskConfig):
    train_sets: list[str] | None = field(
        default=None, metadata={"help": "set folders to train on; null = every folder with a train.json"}
    )
    eval_sets: list[str] = field(
        default_factory=lambda: [
            "boolq",
            "piqa",
            "social_i_qa",
            "hellaswag",
            "winogrande",
            "ARC-Easy",
            "ARC-Challenge",
            "openbookqa",
        ],
        metadata={"help": "sets to evaluate (<data_dir>/<set>/test.json)"},
    )
    eval_protocol: EvalProtocol = field(
        default="loglik", metadata={"help": "generate: greedy decoding (the papers') | loglik: candidate scoring"}
    )
    cutoff_len: int = field(default=256, metadata={"help": "training tokens per example (LLM-Adapters' cutoff_len)"})
    max_new_tokens: int = field(default=32, metadata={"help": "generate protocol: tokens to decode"})
    eval_batch_size: int = field(default=16, metadata={"help": "evaluation items per batch"})
    tune_size: int = field(default=600, metadata={"help": "split=tune: training records held out for scoring"})
    tune_seed: int = field(default=0, metadata={"help": "split=tune: seed of the held-out sample (not the run's)"})


@dataclass
class VTABTaskConfig(TaskConfig):
    num_classes: int | None = field(
        default=None, metadata={"help": "classes; null = the VTAB-1k table's count for a known task, else read"}
    )


@dataclass
class RankRecoveryTaskConfig(TaskConfig):
    budget_rank: int = field(
        default=8, metadata={"help": "teacher ranks sum to n x budget_rank (set it to the allocator's final rank)"}
    )
    max_target_rank: int | None = field(default=None, metadata={"help": "largest teacher rank; null = 2 x budget_rank"})
    spectrum: Spectrum = field(
        default="flat", metadata={"help": "teacher singular values: flat | decaying (geometric)"}
    )
    update_scale: float = field(default=0.5, metadata={"help": "teacher update norm relative to the base weight norm"})
    teacher_seed: int | None = field(
        default=None, metadata={"help": "seed of the teacher and the data; null = the run's seed"}
    )
    n_train: int = field(default=4096, metadata={"help": "training examples"})
    n_val: int = field(default=1024, metadata={"help": "validation examples"})


Schema = TypeVar("Schema")


def config_object(schema: type[Schema], values: Mapping[str, Any] | Schema) -> Schema:
    """The typed object of a config node: a composed run's node (``to_plain``) or a hand-written mapping.

    Fields the mapping leaves out take the schema's defaults, which are written only there; a field the schema
    does not have is refused (composition refuses it too, so only hand-written mappings can get here with one).
    The code reads attributes of the result, never ``.get(key, default)``."""
    if isinstance(values, schema):
        return values
    known = {f.name for f in fields(schema)}  # type: ignore[arg-type]
    values = {k: v for k, v in values.items() if k != "defaults"}  # a raw group file's Hydra defaults list
    unknown = sorted(set(values) - known)
    if unknown:
        from flexlora.errors import FlexLoRAError

        raise FlexLoRAError(f"{schema.__name__} has no field(s) {unknown}; known: {sorted(known)}")
    return schema(**{str(k): v for k, v in values.items()})


def backbone_config(values: Mapping[str, Any] | BackboneConfig) -> BackboneConfig:
    return config_object(BackboneConfig, values)


TASK_SCHEMAS: dict[str, type[TaskConfig]] = {
    "glue_schema": GlueTaskConfig,
    "commonsense_schema": CommonsenseTaskConfig,
    "vtab_schema": VTABTaskConfig,
    "rank_recovery_schema": RankRecoveryTaskConfig,
}
