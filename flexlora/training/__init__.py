"""Lightning side: the LightningModule, the rank-allocation Callback, reporting to loggers."""

from flexlora.training.callback import RankAllocationCallback
from flexlora.training.module import FlexLoRAModule

__all__ = ["FlexLoRAModule", "RankAllocationCallback"]
