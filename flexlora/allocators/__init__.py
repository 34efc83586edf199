"""Importance scores, budget schedules and the LoRA / AdaLoRA / FlexLoRA policies.

Pure decision logic: knows nothing of Lightning or Hydra and never mutates adapters.
"""

from collections.abc import Mapping
from typing import Any

from flexlora.allocators.adalora import AdaLoRAAllocator
from flexlora.allocators.base import Allocator, StaticAllocator
from flexlora.allocators.config import (
    METHODS,
    AdaLoRAConfig,
    AllocatorConfig,
    FlexLoRAConfig,
    LoRAConfig,
    Method,
    allocator_config,
    choices,
    literal_fields,
)
from flexlora.allocators.flexlora import FlexLoRAAllocator, event_budget
from flexlora.allocators.importance import SensitivityTracker, spectral_entropy
from flexlora.plan import RankPlan

_POLICIES: dict[type[AllocatorConfig], type[Allocator]] = {
    LoRAConfig: StaticAllocator,
    AdaLoRAConfig: AdaLoRAAllocator,
    FlexLoRAConfig: FlexLoRAAllocator,
}


def build_allocator(config: AllocatorConfig | Mapping[str, Any], seed: int = 0) -> Allocator:
    """The allocator for a validated config (or a plain mapping with a ``name``); ``seed`` seeds its own RNG."""
    if not isinstance(config, AllocatorConfig):
        config = allocator_config(config)
    return _POLICIES[type(config)](config, seed)  # type: ignore[arg-type]


__all__ = [
    "METHODS",
    "AdaLoRAAllocator",
    "AdaLoRAConfig",
    "Allocator",
    "AllocatorConfig",
    "FlexLoRAAllocator",
    "FlexLoRAConfig",
    "LoRAConfig",
    "Method",
    "RankPlan",
    "SensitivityTracker",
    "StaticAllocator",
    "allocator_config",
    "build_allocator",
    "choices",
    "event_budget",
    "literal_fields",
    "spectral_entropy",
]
