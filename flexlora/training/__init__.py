"""Lightning side: the LightningModule, the rank-allocation Callback, the optimizer and its surgery."""

from flexlora.training.callback import RankAllocationCallback
from flexlora.training.module import FlexLoRAModule
from flexlora.training.optim import SlotAdamW

__all__ = ["FlexLoRAModule", "RankAllocationCallback", "SlotAdamW"]
