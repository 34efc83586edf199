"""SlotAdamW and optimizer-state surgery: plain torch, importable without Lightning or Hydra."""

from flexlora.optim.slot_adamw import SlotAdamW, slot_dim
from flexlora.optim.surgery import (
    SurgeryError,
    apply_surgery,
    change_slots,
    reset_layer_slots,
    reset_slots,
    supports_slot_surgery,
)

__all__ = [
    "SlotAdamW",
    "SurgeryError",
    "apply_surgery",
    "change_slots",
    "reset_layer_slots",
    "reset_slots",
    "slot_dim",
    "supports_slot_surgery",
]
