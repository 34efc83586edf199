"""IncreLoRA (Zhang et al., 2023, "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient
Fine-tuning"): start every matrix at a small rank and add rank, a few matrices at a time, to those whose update
matters most, until the total reaches the budget. Config, policy and registration in this one module.

Mechanism, checked against the paper and its released code (FeiyuZhang98/IncreLoRA, ``loralib``):

* Score of matrix k at step t: ``I_k = sum |dW_k * G_k| / sqrt(numel(dW_k))`` with ``G_k = dL/d(dW_k)``, the
  gradient of the loss with respect to the whole update (the released code forms dW explicitly and reads G in a
  backward hook; here :class:`flexlora.adapters.delta_grad.DeltaGradRecorder` recovers it from the layer's input
  and output gradient). Smoothed like AdaLoRA: ``Ibar <- b1 Ibar + (1 - b1) I``, ``Ubar <- b2 Ubar + (1 - b2)
  |I - Ibar|`` (with the updated Ibar), score ``Ibar * Ubar``; scores update only while the budget is not reached.
* Every ``delta_t`` steps after ``t_init``, the ``top_h`` best-scored matrices gain ``add_rank`` slots each, until
  the total live rank is ``n * rank``. Released defaults (GLUE scripts): initial rank 1 (``lora_r``), add_rank =
  rank / 2 (its table {2: 1, 4: 2, 6: 3, 8: 4}), top_h 3 - 5, beta 0.85, orthogonality weight 0.1 - 0.3.
* A new slot has lambda = 0 and P, Q ~ N(0, 0.02^2) (the released reserve vectors' init), so the output does not
  change when it is added.

Deviations, each forced by a decision every method here shares: the scale is the constant alpha / rank (the
released code divides by the current rank, so every growth rescales the whole update); the last round is capped
so the total lands exactly on the budget (the released last round can overshoot); slots have a capacity
(``max_rank``, a matrix at capacity is passed over and counted in ``skipped_full``); the released "advance
learning" (reserve vectors trained at a fixed lambda of 1e-5 before they are added) is not reproduced; the score
uses the step's updated dW (peft's order) and, under DDP, rank 0's local G.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from flexlora.allocators.base import Adapters, Allocator
from flexlora.allocators.config import (
    DEFAULT_CAPACITY,
    AllocatorConfig,
    _check_betas,
    _coerce_choices,
    _grow_std,
    register_method,
)
from flexlora.errors import FlexLoRAError
from flexlora.plan import GrowSpec, RankPlan


@dataclass
class IncreLoRAConfig(AllocatorConfig):
    """IncreLoRA: gradient-scored incremental growth from init_rank up to n * rank."""

    name: str = field(default="increlora", metadata={"help": "allocator name"})
    orth_reg: float = field(default=0.1, metadata={"help": "gamma: weight of the orthogonality penalty"})
    t_init: float = field(default=0.1, metadata={"help": "steps (int) or fraction of T before the first event"})
    t_final: float = field(default=0.3, metadata={"help": "steps (int) or fraction of T at the end, pattern fixed"})
    delta_t: int = field(default=10, metadata={"help": "optimizer steps between allocation events"})
    init_rank: int = field(default=1, metadata={"help": "live rank per matrix at t = 0 (released lora_r: 1)"})
    top_h: int = field(default=4, metadata={"help": "matrices that gain rank per event (released scripts: 3-5)"})
    add_rank: int | None = field(
        default=None, metadata={"help": "slots each chosen matrix gains per event; null = max(1, rank // 2)"}
    )
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the score I"})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty |I - Ibar|"})
    grow_std: Any = field(
        default=0.02, metadata={"help": "std of a new slot's P column and Q row (released: 0.02); auto = 1/sqrt(d)"}
    )

    def __post_init__(self) -> None:
        _coerce_choices(self)
        self.grow_std = _grow_std(self.grow_std)
        if self.add_rank is None:
            self.add_rank = max(1, self.rank // 2)
        super().__post_init__()
        for key in ("init_rank", "top_h", "add_rank"):
            if getattr(self, key) < 1:
                raise FlexLoRAError(f"allocator.{key} must be >= 1, got {getattr(self, key)}")
        if self.init_rank >= self.rank:
            raise FlexLoRAError(
                f"allocator.init_rank ({self.init_rank}) must be < rank ({self.rank}): IncreLoRA grows up to n x rank"
            )
        _check_betas(self.beta1, self.beta2)

    def default_max_rank(self) -> int:
        return DEFAULT_CAPACITY * self.rank

    @property
    def start_rank(self) -> int:
        return self.init_rank

    def grow_spec(self) -> GrowSpec:
        return GrowSpec(kind="zero_impact", std=self.grow_std, value=0.0)  # value: read by small_value only


def delta_score(delta: torch.Tensor, grad: torch.Tensor) -> float:
    """``sum |dW * G| / sqrt(numel(dW))``: how much the loss reacts to the update, per matrix."""
    return float((delta.float() * grad.float()).abs().sum() / math.sqrt(delta.numel()))


class IncreLoRAAllocator(Allocator):
    """Adds ``add_rank`` slots to the ``top_h`` best-scored matrices every ``delta_t`` steps until n * rank."""

    config: IncreLoRAConfig
    requires = ("delta_grad",)

    def __init__(self, config: IncreLoRAConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.ipt: dict[str, float] = {}
        self.unc: dict[str, float] = {}
        self.live_total = 0
        self.budget = 0

    def _validate(self, adapters: Adapters) -> None:
        assert self.total_steps is not None
        c = self.config
        self.budget = c.rank * len(adapters)
        self.live_total = sum(layer.live_rank for layer in adapters.values())
        events = len(self.event_steps())
        rounds = math.ceil((self.budget - self.live_total) / (min(c.top_h, len(adapters)) * c.add_rank))
        if events == 0 or rounds > events:
            raise self.schedule_error(
                f"IncreLoRA needs {rounds} events to grow from {self.live_total} to {self.budget} slots with "
                f"top_h={c.top_h}, add_rank={c.add_rank}, but the window has {events}; raise allocator.top_h or "
                "allocator.add_rank, or lower delta_t"
            )

    def event_steps(self) -> list[int]:
        assert self.total_steps is not None
        end = self.total_steps - self.t_final
        return list(range(self.t_init + self.config.delta_t, end, self.config.delta_t))

    def still_requires(self, service: str) -> bool:
        return service == "delta_grad" and self.live_total < self.budget

    def observe(self, adapters: Adapters, step: int) -> None:
        recorder = self.services.get("delta_grad")
        if recorder is None:
            raise FlexLoRAError("IncreLoRA scores need the delta_grad service: drive it through RankAllocationEngine")
        if self.live_total >= self.budget:
            recorder.clear()
            return
        b1, b2 = self.config.beta1, self.config.beta2
        for name, layer in adapters.items():
            grad = recorder.pop(name)
            if grad is None:
                continue
            with torch.no_grad():
                score = delta_score(layer.delta_weight(), grad)
            ipt = b1 * self.ipt.get(name, 0.0) + (1 - b1) * score
            self.ipt[name] = ipt
            self.unc[name] = b2 * self.unc.get(name, 0.0) + (1 - b2) * abs(score - ipt)

    def importance(self, adapters: Adapters) -> dict[str, float | None]:
        return {name: self.ipt.get(name, 0.0) * self.unc.get(name, 0.0) for name in adapters}

    def plan(self, adapters: Adapters, step: int) -> RankPlan | None:
        steps = self.event_steps()
        if step not in steps or self.live_total >= self.budget:
            return None
        last = step == steps[-1]
        importance = self.importance(adapters)
        order = sorted(adapters, key=lambda n: -importance[n])  # stable: ties go to the earlier matrix
        remaining = self.budget - self.live_total
        grow: dict[str, int] = {}
        skipped = 0
        for name in order:
            if remaining == 0 or (len(grow) == self.config.top_h and not last):
                break
            layer = adapters[name]
            room = layer.max_rank - layer.live_rank
            if room == 0:
                skipped += 1
                continue
            # the last event gives every remaining slot, so each run ends on the budget
            add = min(room, remaining) if last and len(grow) >= self.config.top_h else min(
                self.config.add_rank, room, remaining)
            grow[name] = add
            remaining -= add
        self.live_total = self.budget - remaining
        return RankPlan(step=step, grow=grow, grow_spec=self.config.grow_spec(), budget=self.budget,
                        importance=dict(importance), skipped_full=skipped)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(ipt=dict(self.ipt), unc=dict(self.unc), live_total=self.live_total, budget=self.budget)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.ipt, self.unc = dict(state["ipt"]), dict(state["unc"])
        self.live_total, self.budget = int(state["live_total"]), int(state["budget"])


register_method("increlora", "IncreLoRA", IncreLoRAConfig, IncreLoRAAllocator)
