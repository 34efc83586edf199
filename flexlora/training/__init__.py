"""Lightning side: the LightningModule, the rank-allocation Callback, reporting, checkpoints and preemption."""

from flexlora.training.callback import RankAllocationCallback
from flexlora.training.module import AdaptedBackboneModule

__all__ = ["AdaptedBackboneModule", "RankAllocationCallback"]
