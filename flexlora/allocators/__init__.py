"""Importance scores, budget schedules and the LoRA / AdaLoRA / FlexLoRA policies.

Pure decision logic: knows nothing of Lightning or Hydra and never mutates adapters.
"""

from collections.abc import Mapping
from typing import Any

from flexlora.allocators.adalora import AdaLoRAAllocator
from flexlora.allocators.base import Allocator, StaticAllocator
from flexlora.allocators.config import (
    AdaLoRAConfig,
    AllocatorConfig,
    FlexLoRAConfig,
    LoRAConfig,
    allocator_config,
)
from flexlora.allocators.flexlora import FlexLoRAAllocator, event_budget
from flexlora.allocators.importance import SensitivityTracker, spectral_entropy
from flexlora.allocators.plan import RankPlan


def build_allocator(config: AllocatorConfig | Mapping[str, Any]) -> Allocator:
    """The allocator for a validated config (or a plain mapping with a ``name``)."""
    if not isinstance(config, AllocatorConfig):
        config = allocator_config(config)
    if isinstance(config, FlexLoRAConfig):
        return FlexLoRAAllocator(config)
    if isinstance(config, AdaLoRAConfig):
        return AdaLoRAAllocator(config)
    return StaticAllocator(config)


__all__ = [
    "AdaLoRAAllocator",
    "AdaLoRAConfig",
    "Allocator",
    "AllocatorConfig",
    "FlexLoRAAllocator",
    "FlexLoRAConfig",
    "LoRAConfig",
    "RankPlan",
    "SensitivityTracker",
    "StaticAllocator",
    "allocator_config",
    "build_allocator",
    "event_budget",
    "spectral_entropy",
]
