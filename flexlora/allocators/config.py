"""Validated allocator configurations, one dataclass per method (peft's config-dataclass style).

These dataclasses are the single schema of the ``allocator`` config group: Hydra registers them in its
ConfigStore (``flexlora.conf_store``), so a wrong type or an unknown choice fails when the config is
composed, and ``__post_init__`` checks the relations between fields before a run starts. Choice fields
are ``Literal`` types and every whitelist is derived from them; each field documents itself in
``metadata["help"]``. Schedule steps (``t_init``, ``t_final``) are optimizer steps; a float in (0, 1) means a
fraction of the run's total steps T, resolved when T is known.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from flexlora.errors import FlexLoRAError
from flexlora.plan import GrowInit, GrowSpec

OrthForm = Literal["code", "paper"]
Schedule = Literal["constant", "cubic", "cubic_late"]
Importance = Literal["entropy", "nuclear", "frobenius", "sensitivity", "random"]
Direction = Literal["both", "prune_only", "grow_only"]
RankOne = Literal["reference", "zero"]
OptimizerState = Literal["surgery", "released_reset"]
GROW_STD_AUTO = "auto"

OPTIMIZER_STATE_HELP = (
    "surgery: after a rank change only the touched slots' moments and step counts restart; everything else and "
    "the LR schedule are untouched | released_reset: the released FlexLoRA trainer: every moment and step count "
    "(head included) reset at each event / masking step, and from the first one on the LR held at its peak "
    "with weight decay 0"
)

# FlexLoRA's slot capacity when max_rank is null: this many times r0 (see the README's capacity note).
DEFAULT_CAPACITY = 2


@dataclass
class AllocatorConfig:
    """Fields shared by all allocators: the adapter's shape and the schedule window."""

    name: str = field(default="lora", metadata={"help": "allocator: lora | adalora | flexlora"})
    rank: int = field(default=8, metadata={"help": "r0: initial rank per matrix; sets the constant scale alpha / r0"})
    max_rank: int | None = field(
        default=None, metadata={"help": "slot capacity per matrix; null = derived per allocator"}
    )
    alpha: float = field(
        default=16.0, metadata={"help": "scale numerator: the update is (alpha / r0) B A (or P diag(lambda) Q)"}
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    init_std: float = field(default=0.02, metadata={"help": "std of P and Q at t = 0 (SVD form)"})
    orth_reg: float = field(default=0.0, metadata={"help": "gamma: weight of the orthogonality penalty (SVD form)"})
    orth_form: OrthForm = field(
        default="code", metadata={"help": "code: mean ||M - I||_F (released code, peft); paper: sum of squares"}
    )
    t_init: float = field(
        default=0, metadata={"help": "steps (int) or fraction of T (float in (0, 1)) before the first event"}
    )
    t_final: float = field(default=0, metadata={"help": "steps (int) or fraction of T at the end with a fixed pattern"})
    delta_t: int = field(default=1, metadata={"help": "optimizer steps between allocation events"})

    def __post_init__(self) -> None:
        _coerce_choices(self)
        for key in ("rank", "delta_t"):
            if getattr(self, key) < 1:
                raise FlexLoRAError(f"allocator.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_rank is None:
            self.max_rank = self.default_max_rank()
        if self.max_rank < self.rank:
            raise FlexLoRAError(
                f"allocator.max_rank ({self.max_rank}) < allocator.rank ({self.rank}): slot capacity must hold "
                "the initial rank; set allocator.max_rank >= allocator.rank"
            )
        if self.orth_reg < 0:
            raise FlexLoRAError(f"allocator.orth_reg must be >= 0, got {self.orth_reg}")
        for key in ("t_init", "t_final"):
            value = getattr(self, key)
            if value < 0 or (not float(value).is_integer() and value >= 1):
                raise FlexLoRAError(
                    f"allocator.{key}={value}: use a step count (int >= 0) or a fraction of the run in [0, 1)"
                )

    form: str = field(default="svd", init=False, metadata={"help": "adapter form (set by the allocator)"})

    def default_max_rank(self) -> int:
        return self.rank

    @property
    def start_rank(self) -> int:
        """Live slots per matrix at the start of training."""
        return self.rank

    def resolve_steps(self, total_steps: int) -> tuple[int, int]:
        """(t_init, t_final) in optimizer steps for a run of ``total_steps``."""

        def resolve(value: float) -> int:
            return round(value * total_steps) if 0 < value < 1 else int(value)

        return resolve(self.t_init), resolve(self.t_final)

    def adapter_kwargs(self) -> dict[str, Any]:
        return {
            "form": self.form,
            "rank": self.rank,
            "max_rank": self.max_rank,
            "init_rank": self.start_rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "init_std": self.init_std,
        }


@dataclass
class LoRAConfig(AllocatorConfig):
    """Static LoRA: fixed rank, no events; the schedule fields are accepted and unused."""

    name: str = field(default="lora", metadata={"help": "allocator name"})
    form: str = field(default="lora", init=False, metadata={"help": "adapter form"})


@dataclass
class AdaLoRAConfig(AllocatorConfig):
    """AdaLoRA: sensitivity-scored soft masking from n * rank down to n * target_rank (docs/architecture.md §3.1)."""

    name: str = field(default="adalora", metadata={"help": "allocator name"})
    rank: int = field(default=12, metadata={"help": "r0: initial rank per matrix; sets the constant scale alpha / r0"})
    alpha: float = field(default=24.0, metadata={"help": "scale numerator (presets: alpha_per_rank x rank)"})
    orth_reg: float = field(default=0.1, metadata={"help": "gamma: weight of the orthogonality penalty"})
    t_init: float = field(default=0.1, metadata={"help": "steps (int) or fraction of T before the first event"})
    t_final: float = field(default=0.2, metadata={"help": "steps (int) or fraction of T at the end, pattern fixed"})
    delta_t: int = field(default=10, metadata={"help": "optimizer steps between allocation events"})
    target_rank: int = field(default=8, metadata={"help": "final average rank: the budget ends at n * target_rank"})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity I"})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty U"})
    optimizer_state: OptimizerState = field(default="surgery", metadata={"help": OPTIMIZER_STATE_HELP})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.target_rank <= self.rank:
            raise FlexLoRAError(f"allocator.target_rank ({self.target_rank}) must be in [1, rank={self.rank}]")
        _check_betas(self.beta1, self.beta2)


@dataclass
class FlexLoRAConfig(AllocatorConfig):
    """FlexLoRA: entropy-scored prune-and-grow under the fixed total n * rank (docs/architecture.md §3.2)."""

    name: str = field(default="flexlora", metadata={"help": "allocator name"})
    orth_reg: float = field(default=0.1, metadata={"help": "gamma: weight of the orthogonality penalty"})
    t_init: float = field(default=0.1, metadata={"help": "steps (int) or fraction of T before the first event"})
    t_final: float = field(default=0.2, metadata={"help": "steps (int) or fraction of T at the end, pattern fixed"})
    delta_t: int = field(default=10, metadata={"help": "optimizer steps between allocation events"})
    budget_per_event: int = field(default=4, metadata={"help": "b0: matrices shrunk (and grown) per event"})
    schedule: Schedule = field(
        default="constant",
        metadata={"help": "per-event budget: constant b0 | cubic b0 (1-p)^3 | cubic_late b0 (1-p^3)"},
    )
    importance: Importance = field(
        default="entropy",
        metadata={
            "help": "per-matrix score: entropy (the method) | nuclear | frobenius | "
            "sensitivity (AdaLoRA's, averaged) | random (control: b random matrices, the run's own generator)"
        },
    )
    direction: Direction = field(
        default="both",
        metadata={
            "help": "both: prune and grow (total fixed) | prune_only: start at init_rank > rank and "
            "prune down to n * rank | grow_only: start below and grow up to it"
        },
    )
    init_rank: int | None = field(
        default=None,
        metadata={
            "help": "live rank per matrix at t = 0; null = rank (both), round(1.5 * rank) "
            "(prune_only), round(0.5 * rank) (grow_only)"
        },
    )
    rank_one: RankOne = field(
        default="reference",
        metadata={
            "help": "entropy of a rank-1 matrix (log 1 = 0): reference = what the released code's NaN "
            "does under topk (never shrunk, first to grow) | zero = score 0 (rank 1 becomes nearly absorbing)"
        },
    )
    grow_init: GrowInit = field(
        default="zero_impact",
        metadata={
            "help": "new slot: zero_impact (lambda 0) | orthogonal (lambda 0, Gram-Schmidt, typical "
            "live norm) | small_value (effective singular value grow_value) | all_zero (paper ablation; never trains)"
        },
    )
    grow_std: Any = field(
        default=GROW_STD_AUTO,
        metadata={
            "help": "std of a new slot's P column and Q row: auto = 1/sqrt(width) per vector (unit expected norm "
            "at any width) | a number (1.0 = the released code; README)"
        },
    )
    grow_value: float = field(
        default=1e-3, metadata={"help": "grow_init=small_value: effective singular value (alpha/r0)|lambda||p||q|"}
    )
    beta1: float = field(default=0.85, metadata={"help": "sensitivity EMA factor (importance=sensitivity only)"})
    beta2: float = field(default=0.85, metadata={"help": "uncertainty EMA factor (importance=sensitivity only)"})
    optimizer_state: OptimizerState = field(default="surgery", metadata={"help": OPTIMIZER_STATE_HELP})

    def __post_init__(self) -> None:
        _coerce_choices(self)
        self.grow_std = _grow_std(self.grow_std)
        if self.init_rank is None:
            self.init_rank = {
                "both": self.rank,
                "prune_only": round(1.5 * self.rank),
                "grow_only": max(1, round(0.5 * self.rank)),
            }[self.direction]
        super().__post_init__()
        if self.budget_per_event < 1:
            raise FlexLoRAError(f"allocator.budget_per_event must be >= 1, got {self.budget_per_event}")
        if self.grow_value <= 0:
            raise FlexLoRAError(f"allocator.grow_value must be > 0, got {self.grow_value}")
        _check_betas(self.beta1, self.beta2)
        wanted = {"both": "== rank", "prune_only": "> rank", "grow_only": "< rank"}[self.direction]
        ok = {
            "both": self.init_rank == self.rank,
            "prune_only": self.init_rank > self.rank,
            "grow_only": 1 <= self.init_rank < self.rank,
        }[self.direction]
        if not ok:
            raise FlexLoRAError(
                f"allocator.direction={self.direction} needs allocator.init_rank {wanted} ({self.rank}), got "
                f"{self.init_rank}: every direction ends at n x rank; set init_rank accordingly or null"
            )
        if self.max_rank < self.init_rank:
            raise FlexLoRAError(
                f"allocator.max_rank ({self.max_rank}) < allocator.init_rank ({self.init_rank}); raise max_rank"
            )
        if self.direction != "prune_only" and self.max_rank == self.rank:
            raise FlexLoRAError(
                f"allocator.max_rank == rank ({self.rank}) leaves no free slot to grow into; "
                f"set allocator.max_rank > allocator.rank (default {DEFAULT_CAPACITY} * rank) or direction=prune_only"
            )

    def default_max_rank(self) -> int:
        if self.direction == "prune_only":
            return max(self.rank, self.init_rank or self.rank)
        return max(DEFAULT_CAPACITY * self.rank, self.init_rank or 0)

    @property
    def start_rank(self) -> int:
        assert self.init_rank is not None
        return self.init_rank

    def grow_spec(self) -> GrowSpec:
        return GrowSpec(kind=self.grow_init, std=self.grow_std, value=self.grow_value)


def _grow_std(value: Any) -> float | str:
    """``auto`` or a positive number (Hydra hands numbers on the command line over as they are typed)."""
    if isinstance(value, str) and value.strip().lower() == GROW_STD_AUTO:
        return GROW_STD_AUTO
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise FlexLoRAError(f"allocator.grow_std must be auto or a number > 0, got {value!r}")
    return number


def _check_betas(beta1: float, beta2: float) -> None:
    if not (0 < beta1 < 1 and 0 < beta2 < 1):
        raise FlexLoRAError(f"allocator.beta1/beta2 must be in (0, 1), got {beta1}, {beta2}")


def literal_fields(cls: type) -> dict[str, tuple[str, ...]]:
    """The Literal-typed fields of a config class and their allowed values (the one place whitelists live)."""
    hints = get_type_hints(cls)
    out: dict[str, tuple[str, ...]] = {}
    for name, hint in hints.items():
        args = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) is not Literal else [hint]
        for candidate in args:
            if get_origin(candidate) is Literal:
                out[name] = tuple(str(v) for v in get_args(candidate))
    return out


def choices(cls: type, name: str) -> tuple[str, ...]:
    """The allowed values of one Literal-typed field."""
    return literal_fields(cls)[name]


def _coerce_choices(config: Any) -> None:
    """Accept Hydra's Enum values for Literal fields, and refuse values outside the Literal."""
    allowed_by_field = literal_fields(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, enum.Enum):
            value = value.name
            setattr(config, f.name, value)
        allowed = allowed_by_field.get(f.name)
        if allowed and value is not None and value not in allowed:
            raise FlexLoRAError(f"allocator.{f.name} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class Method:
    """One registered allocator: its config schema, its policy (a class, or "module:Class" imported when first
    built, so this module stays importable without torch) and the name the papers' tables use."""

    name: str
    label: str
    config: type[AllocatorConfig]
    policy: Any

    def policy_class(self) -> type:
        if isinstance(self.policy, str):
            module, _, attr = self.policy.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.policy


METHODS: dict[str, Method] = {}


def register_method(name: str, label: str, config: type[AllocatorConfig], policy: Any) -> Method:
    """Register an allocator once: its config dataclass (the Hydra schema ``allocator/<name>_schema``) and its
    policy. ``conf/allocator/<name>.yaml`` and an entry per budget preset make it selectable."""
    if name in METHODS and METHODS[name].config is not config:
        raise FlexLoRAError(f"allocator {name!r} is registered twice")
    METHODS[name] = Method(name, label, config, policy)
    return METHODS[name]


register_method("lora", "LoRA", LoRAConfig, "flexlora.allocators.base:StaticAllocator")
register_method("adalora", "AdaLoRA", AdaLoRAConfig, "flexlora.allocators.adalora:AdaLoRAAllocator")
register_method("flexlora", "FlexLoRA", FlexLoRAConfig, "flexlora.allocators.flexlora:FlexLoRAAllocator")
# methods whose config and policy share one module register themselves when it is imported
EXTERNAL_METHODS = ("flexlora.allocators.increlora",)


def load_methods() -> dict[str, Method]:
    """Every registered method, the self-registering modules imported (they need torch)."""
    for module in EXTERNAL_METHODS:
        importlib.import_module(module)
    return METHODS


def allocator_config(values: Mapping[str, Any]) -> AllocatorConfig:
    """Build the validated config for ``values['name']``; unknown fields are an error, not ignored."""
    load_methods()
    values = dict(values)
    name = values.get("name")
    if isinstance(name, enum.Enum):
        name = name.name
    if name not in METHODS:
        raise FlexLoRAError(f"allocator.name must be one of {', '.join(METHODS)}; got {name!r}")
    cls = METHODS[name].config
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FlexLoRAError(f"allocator {name!r} has no field(s) {unknown}; valid fields: {sorted(known)}")
    return cls(**values)
