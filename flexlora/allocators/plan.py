"""RankPlan: what an allocator decided at one step. Plain data, so it pickles for a DDP broadcast."""

from __future__ import annotations

from dataclasses import dataclass, field

from flexlora.adapters.layer import GrowSpec


@dataclass
class RankPlan:
    """One allocation event's decision; applying it is the adapters' job (see :func:`apply_plan`).

    ``prune``: live slots to deactivate, per matrix. ``grow``: number of free slots to activate, per
    matrix. ``zero_lambda``: AdaLoRA's soft mask (lambda = 0, the slot stays live). ``budget`` is the
    total live rank (or, for AdaLoRA, the soft budget) the plan aims at; ``importance`` the per-matrix
    scores the decision used, for logging.
    """

    step: int
    prune: dict[str, list[int]] = field(default_factory=dict)
    grow: dict[str, int] = field(default_factory=dict)
    zero_lambda: dict[str, list[int]] = field(default_factory=dict)
    grow_spec: GrowSpec = field(default_factory=GrowSpec)
    budget: int | None = None
    importance: dict[str, float] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (any(self.prune.values()) or any(self.grow.values()) or any(self.zero_lambda.values()))

    def changes_rank(self) -> bool:
        return any(self.prune.values()) or any(self.grow.values())
