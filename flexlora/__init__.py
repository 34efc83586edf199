"""flexlora: FlexLoRA, AdaLoRA and LoRA on Hugging Face backbones, trained with Lightning, composed with Hydra.

The method outside the harness (any training loop; see the README's "Use it in your own loop"):
``inject`` adapters, an allocator config (``FlexLoRAConfig`` ...), ``RankAllocationEngine``, ``SlotAdamW`` over
``param_groups``. Names resolve lazily, so ``import flexlora`` stays cheap (no torch until one is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RankAllocationEngine": "flexlora.engine",
    "inject": "flexlora.adapters",
    "SlotLoRALayer": "flexlora.adapters",
    "SlotAdamW": "flexlora.optim",
    "param_groups": "flexlora.optim.groups",
    "LoRAConfig": "flexlora.allocators.config",
    "AdaLoRAConfig": "flexlora.allocators.config",
    "FlexLoRAConfig": "flexlora.allocators.config",
    "adapted_to_peft": "flexlora.export",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flexlora' has no attribute {name!r}")


__all__ = ["__version__", *sorted(_EXPORTS)]
