"""Validated allocator configurations, one dataclass per method (peft's config-dataclass style).

The same field names are used by every Hydra file under ``conf/allocator/`` and by every experiment.
Schedule steps (``t_init``, ``t_final``) are optimizer steps; a float in (0, 1) means a fraction of
the run's total steps T, resolved when T is known.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flexlora.adapters.layer import GrowSpec
from flexlora.errors import FlexLoRAError


@dataclass
class AllocatorConfig:
    """Fields shared by all allocators: the adapter's shape and the schedule window."""

    name: str = "lora"
    rank: int = 8
    max_rank: int | None = None
    alpha: float = 16.0
    dropout: float = 0.0
    init_std: float = 0.02
    orth_reg: float = 0.0
    orth_form: str = "code"
    t_init: int | float = 0
    t_final: int | float = 0
    delta_t: int = 1

    form: str = dataclasses.field(default="svd", init=False)

    def __post_init__(self) -> None:
        if self.max_rank is None:
            self.max_rank = self.default_max_rank()
        if self.rank < 1:
            raise FlexLoRAError(f"allocator.rank must be >= 1, got {self.rank}")
        if self.max_rank < self.rank:
            raise FlexLoRAError(
                f"allocator.max_rank ({self.max_rank}) < allocator.rank ({self.rank}): slot capacity must hold "
                "the initial rank; set allocator.max_rank >= allocator.rank"
            )
        if self.orth_form not in ("code", "paper"):
            raise FlexLoRAError(f"allocator.orth_form must be 'code' or 'paper', got {self.orth_form!r}")
        if self.orth_reg < 0:
            raise FlexLoRAError(f"allocator.orth_reg must be >= 0, got {self.orth_reg}")
        if self.delta_t < 1:
            raise FlexLoRAError(f"allocator.delta_t must be >= 1, got {self.delta_t}")
        for key in ("t_init", "t_final"):
            value = getattr(self, key)
            if value < 0 or (isinstance(value, float) and value >= 1):
                raise FlexLoRAError(
                    f"allocator.{key}={value}: use a step count (int >= 0) or a fraction of the run in [0, 1)"
                )

    def default_max_rank(self) -> int:
        return self.rank

    def resolve_steps(self, total_steps: int) -> tuple[int, int]:
        """(t_init, t_final) in optimizer steps for a run of ``total_steps``."""

        def resolve(value: int | float) -> int:
            return round(value * total_steps) if isinstance(value, float) else int(value)

        return resolve(self.t_init), resolve(self.t_final)

    def adapter_kwargs(self) -> dict[str, Any]:
        return {
            "form": self.form, "rank": self.rank, "max_rank": self.max_rank, "alpha": self.alpha,
            "dropout": self.dropout, "init_std": self.init_std,
        }


@dataclass
class LoRAConfig(AllocatorConfig):
    """Static LoRA: fixed rank, no events; the schedule fields are accepted and unused."""

    name: str = "lora"
    form: str = dataclasses.field(default="lora", init=False)


@dataclass
class AdaLoRAConfig(AllocatorConfig):
    name: str = "adalora"
    target_rank: int = 4
    beta1: float = 0.85
    beta2: float = 0.85

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.target_rank <= self.rank:
            raise FlexLoRAError(
                f"allocator.target_rank ({self.target_rank}) must be in [1, rank={self.rank}]"
            )
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise FlexLoRAError(f"allocator.beta1/beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")


@dataclass
class FlexLoRAConfig(AllocatorConfig):
    name: str = "flexlora"
    budget_per_event: int = 4
    schedule: str = "constant"
    importance: str = "entropy"
    direction: str = "both"
    grow_init: str = "zero_impact"
    grow_std: float = 1.0
    grow_value: float = 1e-3
    beta1: float = 0.85  # only for importance=sensitivity
    beta2: float = 0.85

    def default_max_rank(self) -> int:
        return 2 * self.rank

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {
            "schedule": ("constant", "cubic", "cubic_late"),
            "importance": ("entropy", "nuclear", "frobenius", "sensitivity"),
            "direction": ("both", "prune_only", "grow_only"),
            "grow_init": ("zero_impact", "orthogonal", "small_value", "all_zero"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise FlexLoRAError(f"allocator.{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        if self.budget_per_event < 1:
            raise FlexLoRAError(f"allocator.budget_per_event must be >= 1, got {self.budget_per_event}")
        if self.grow_std <= 0:
            raise FlexLoRAError(f"allocator.grow_std must be > 0, got {self.grow_std}")
        if self.direction != "prune_only" and self.max_rank == self.rank:
            raise FlexLoRAError(
                f"allocator.max_rank == rank ({self.rank}) leaves no free slot to grow into; "
                "set allocator.max_rank > allocator.rank (default 2 * rank) or direction=prune_only"
            )

    def grow_spec(self) -> GrowSpec:
        return GrowSpec(kind=self.grow_init, std=self.grow_std, value=self.grow_value)  # type: ignore[arg-type]


CONFIGS: dict[str, type[AllocatorConfig]] = {"lora": LoRAConfig, "adalora": AdaLoRAConfig, "flexlora": FlexLoRAConfig}


def allocator_config(values: Mapping[str, Any]) -> AllocatorConfig:
    """Build the validated config for ``values['name']``; unknown fields are an error, not ignored."""
    values = dict(values)
    name = values.get("name")
    if name not in CONFIGS:
        raise FlexLoRAError(f"allocator.name must be one of {', '.join(CONFIGS)}; got {name!r}")
    cls = CONFIGS[name]
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FlexLoRAError(f"allocator {name!r} has no field(s) {unknown}; valid fields: {sorted(known)}")
    return cls(**values)
