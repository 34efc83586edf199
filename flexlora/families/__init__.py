"""Task families: how a family builds its model, computes its loss and evaluates (one LightningModule for all)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flexlora.errors import FlexLoRAError
from flexlora.families.base import EvalRecords, Family, TaskData, task_name
from flexlora.family_registry import FAMILIES, family_entry, register_family
from flexlora.schemas import BackboneConfig, TaskConfig, backbone_config
from flexlora.tasks import task_spec


def family_class(name: str) -> type[Family]:
    entry = family_entry(name)
    return entry.resolve(entry.family)


def make_family(task: Mapping[str, Any] | TaskConfig, backbone: Mapping[str, Any] | BackboneConfig,
                seed: int = 0) -> Family:
    """The family object of a task config, after checking that the backbone belongs to the same family.

    The family turns both nodes into typed schema objects (``Family.__init__``)."""
    backbone = backbone_config(backbone)
    spec = task_spec(task_name(task))
    if backbone.family != spec.family:
        raise FlexLoRAError(
            f"task={spec.name} is a {spec.family} task but backbone={backbone.name} is a {backbone.family} "
            f"backbone; choose one of: backbone={family_entry(spec.family).backbones}"
        )
    return family_class(spec.family)(task, backbone, seed)


__all__ = ["FAMILIES", "EvalRecords", "Family", "TaskData", "family_class", "make_family", "register_family"]
