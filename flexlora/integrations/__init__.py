"""Adapters of :class:`flexlora.engine.RankAllocationEngine` to training loops other than Lightning."""
