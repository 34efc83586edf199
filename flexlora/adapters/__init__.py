"""Adapter layer, injection and the orthogonality penalty. Knows nothing of Lightning or Hydra."""

from flexlora.adapters.apply import apply_plan
from flexlora.adapters.inject import find_adapters, inject, matches
from flexlora.adapters.layer import SLOT_AXIS_ATTR, SlotLoRALayer, slot_axis
from flexlora.adapters.penalty import orthogonality_penalty

__all__ = [
    "SLOT_AXIS_ATTR",
    "SlotLoRALayer",
    "apply_plan",
    "find_adapters",
    "inject",
    "matches",
    "orthogonality_penalty",
    "slot_axis",
]
