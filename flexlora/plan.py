"""The vocabulary between allocators and adapters: what to change (RankPlan) and what changed (SlotChange).

Allocators emit a :class:`RankPlan`; the adapters apply it and report a :class:`SlotChange` per matrix;
optimizer-state surgery and the allocators' own trackers follow those changes. Plain data, so a plan
pickles for the DDP broadcast. Neither side imports the other: both import this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

GrowInit = Literal["zero_impact", "orthogonal", "small_value", "all_zero"]


@dataclass(frozen=True)
class GrowSpec:
    """How a newly grown slot is initialised (docs/architecture.md §3.4: zero-impact initialisation and its ablations).

    ``std``: standard deviation of the new P column and Q row, or ``"auto"``: 1 / sqrt(length) per vector, so
    both have unit expected norm whatever the matrix width (a fixed std gives a squared norm of width x std^2).
    ``value``: for ``small_value``, the new direction's *effective* singular value ``(alpha / r0) |lambda| |p| |q|``
    (unused by the other kinds). No field has a default: the allocator configs hold the one set of defaults.
    """

    kind: GrowInit
    std: float | str
    value: float

    def __post_init__(self) -> None:
        assert self.std == "auto" or float(self.std) > 0, "grow std must be auto or > 0 (validated by the config)"

    def std_for(self, length: int) -> float:
        """The std of a new vector with ``length`` entries."""
        return length**-0.5 if self.std == "auto" else float(self.std)


@dataclass
class RankPlan:
    """One allocation event's decision; applying it is the adapters' job.

    ``prune``: live slots to deactivate, per matrix. ``grow``: number of free slots to activate, per
    matrix. ``zero_lambda``: AdaLoRA's soft mask (lambda = 0, the slot stays live). ``budget`` is the
    total live rank (or, for AdaLoRA, the soft budget) the plan aims at; ``importance`` the per-matrix
    scores the decision used, for logging (None where a score is undefined, e.g. entropy at rank 1).
    ``skipped_full``: how many of the best-scored grow candidates were passed over because every slot of
    theirs was live (the slot capacity bound).
    """

    step: int
    prune: dict[str, list[int]] = field(default_factory=dict)
    grow: dict[str, int] = field(default_factory=dict)
    zero_lambda: dict[str, list[int]] = field(default_factory=dict)
    grow_spec: GrowSpec | None = None  # required by a plan that grows (the allocator's config supplies it)
    budget: int | None = None
    importance: dict[str, float | None] = field(default_factory=dict)
    skipped_full: int = 0

    def is_empty(self) -> bool:
        return not (any(self.prune.values()) or any(self.grow.values()) or any(self.zero_lambda.values()))

    def changes_rank(self) -> bool:
        return any(self.prune.values()) or any(self.grow.values())


@dataclass
class SlotChange:
    """What applying a plan did to one matrix's slots, in the order it happened.

    Live slots are kept a contiguous prefix, so pruning slot i swaps it with the last live slot first:
    ``swaps`` lists those exchanges (every per-slot state, optimizer moments and score trackers included,
    must follow them), and ``reset`` the final indices whose per-slot state restarts from zero (the pruned
    slots, now dead, and the grown ones).
    """

    swaps: list[tuple[int, int]] = field(default_factory=list)
    reset: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.swaps or self.reset)

    def apply_to(self, tensor: torch.Tensor, dim: int) -> None:
        """Make a per-slot tensor (optimizer moments, step counts, score trackers) follow this change: the
        swaps in order, then zeros at the reset slots. In place."""
        import torch

        for i, j in self.swaps:
            if i != j:
                index = torch.tensor([i, j], device=tensor.device)
                tensor.index_copy_(dim, index, tensor.index_select(dim, index.flip(0)))
        if self.reset:
            tensor.index_fill_(dim, torch.as_tensor(self.reset, dtype=torch.long, device=tensor.device), 0)
