"""Task families: how a family builds its model, computes its loss and evaluates (one LightningModule for all)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flexlora.errors import FlexLoRAError
from flexlora.families.base import EvalRecords, Family, TaskData
from flexlora.tasks import task_spec

BACKBONES_FOR = {
    "classification": "minilm, tiny_deberta, deberta_v3_base",
    "causal_lm": "tiny_llama, smollm2_135m, llama3_8b",
    "image": "tiny_vit, vit_b16_in21k",
    "synthetic": "synthetic",
}


def family_class(name: str) -> type[Family]:
    if name == "classification":
        from flexlora.families.classification import ClassificationFamily as cls
    elif name == "causal_lm":
        from flexlora.families.causal_lm import CausalLMFamily as cls
    elif name == "image":
        from flexlora.families.image import ImageFamily as cls
    else:
        from flexlora.families.synthetic import SyntheticFamily as cls
    return cls


def make_family(task: Mapping[str, Any], backbone: Mapping[str, Any], seed: int = 0) -> Family:
    """The family object of a task config, after checking that the backbone belongs to the same family."""
    spec = task_spec(str(task["name"]))
    backbone_family = backbone.get("family", "classification")
    if backbone_family != spec.family:
        raise FlexLoRAError(
            f"task={spec.name} is a {spec.family} task but backbone={backbone.get('name')} is a {backbone_family} "
            f"backbone; choose one of: backbone={BACKBONES_FOR[spec.family]}"
        )
    return family_class(spec.family)(task, backbone, seed)


__all__ = ["EvalRecords", "Family", "TaskData", "family_class", "make_family"]
