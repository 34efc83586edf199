"""Importance scores, budget schedules and the LoRA / AdaLoRA / FlexLoRA policies.

Pure decision logic: knows nothing of Lightning or Hydra and never mutates adapters. The package resolves
its names lazily (PEP 562), so ``flexlora.allocators.config`` (the schemas and the method registry) imports
without torch, for the config store and the result tables.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flexlora.allocators.base import Allocator
    from flexlora.allocators.config import AllocatorConfig

_EXPORTS = {
    "AdaLoRAAllocator": "adalora",
    "Allocator": "base",
    "StaticAllocator": "base",
    "METHODS": "config",
    "AdaLoRAConfig": "config",
    "AllocatorConfig": "config",
    "FlexLoRAConfig": "config",
    "LoRAConfig": "config",
    "Method": "config",
    "allocator_config": "config",
    "choices": "config",
    "literal_fields": "config",
    "FlexLoRAAllocator": "flexlora",
    "event_budget": "flexlora",
    "SensitivityTracker": "importance",
    "spectral_entropy": "importance",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"flexlora.allocators.{_EXPORTS[name]}"), name)
    if name == "RankPlan":
        from flexlora.plan import RankPlan

        return RankPlan
    raise AttributeError(f"module 'flexlora.allocators' has no attribute {name!r}")


def build_allocator(config: AllocatorConfig | Mapping[str, Any], seed: int = 0) -> Allocator:
    """The allocator for a validated config (or a plain mapping with a ``name``); ``seed`` seeds its own RNG."""
    from flexlora.allocators.config import allocator_config, load_methods

    if not isinstance(config, Mapping) and not hasattr(config, "name"):
        raise TypeError(f"expected an allocator config, got {type(config).__name__}")
    if isinstance(config, Mapping):
        config = allocator_config(config)
    method = load_methods()[config.name]
    if type(config) is not method.config:
        raise TypeError(f"allocator {config.name!r} expects {method.config.__name__}, got {type(config).__name__}")
    return method.policy_class()(config, seed)


__all__ = ["RankPlan", "build_allocator", *sorted(_EXPORTS)]
