"""The task-family registry: everything the rest of the package needs to know about a family, in one entry.

Entries name their code as ``"module:attribute"`` strings, imported when first used, so this module imports
nothing heavy (the result tables read it without torch). Adding a family: write its ``Family`` subclass, then one
``register_family`` call here; ``tests/test_family_registry.py`` fails if an entry's code does not resolve.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FamilyEntry:
    name: str
    family: str  # the Family subclass
    backbones: str  # backbone options of the family, for error messages
    tables: str  # (runs, row_keys) -> list[Table]: the family's result tables
    task_schema: str  # its task config schema: a key of flexlora.schemas.TASK_SCHEMAS
    peft_task_type: str | None = None  # peft's TaskType for export (None: a custom head, no task type)
    preprocessor: str | None = None  # (backbone config) -> tokenizer / image processor saved beside an export
    auto_class: str = "AutoModel"  # the transformers class an exported adapter's model card loads the base with
    head_size_argument: bool = True  # whether that class needs num_labels (a new head), in the card's snippet
    # (run, unit) -> the run's compared evaluation sets, for ``flexlora-aggregate --compare``; ``unit(split,
    # metric, label, order)`` makes one. None: the family has no per-example predictions to resample.
    compare_units: str | None = None

    @staticmethod
    def resolve(path: str) -> Any:
        module, _, attr = path.partition(":")
        return getattr(importlib.import_module(module), attr)


FAMILIES: dict[str, FamilyEntry] = {}


def register_family(entry: FamilyEntry) -> FamilyEntry:
    FAMILIES[entry.name] = entry
    return entry


def family_entry(name: str) -> FamilyEntry:
    from flexlora.errors import FlexLoRAError

    if name not in FAMILIES:
        raise FlexLoRAError(f"unknown task family {name!r}; registered: {', '.join(FAMILIES)}")
    return FAMILIES[name]


register_family(FamilyEntry(
    "classification", "flexlora.families.classification:ClassificationFamily", "minilm, tiny_deberta, deberta_v3_base",
    tables="flexlora.aggregate.tables:glue_tables", task_schema="glue_schema", peft_task_type="SEQ_CLS",
    auto_class="AutoModelForSequenceClassification",
    compare_units="flexlora.aggregate.compare:task_units",
    preprocessor="flexlora.backbones.text:load_tokenizer"))
register_family(FamilyEntry(
    "causal_lm", "flexlora.families.causal_lm:CausalLMFamily", "tiny_llama, smollm2_135m, llama3_8b",
    tables="flexlora.aggregate.families:commonsense_tables", task_schema="commonsense_schema",
    peft_task_type="CAUSAL_LM", compare_units="flexlora.aggregate.families:commonsense_units",
    auto_class="AutoModelForCausalLM", head_size_argument=False,
    preprocessor="flexlora.families.causal_lm:load_tokenizer"))
register_family(FamilyEntry(
    "image", "flexlora.families.image:ImageFamily", "tiny_vit, vit_b16_in21k",
    tables="flexlora.aggregate.families:vtab_tables", task_schema="vtab_schema",
    compare_units="flexlora.aggregate.families:vtab_units", auto_class="AutoModelForImageClassification",
    preprocessor="flexlora.backbones.vision:load_image_processor"))
register_family(FamilyEntry(
    "synthetic", "flexlora.families.synthetic:SyntheticFamily", "synthetic",
    tables="flexlora.aggregate.families:rank_recovery_tables", task_schema="rank_recovery_schema"))
