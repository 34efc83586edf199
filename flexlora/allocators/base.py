"""The allocator protocol: observe every optimizer step, plan (purely) at event steps, keep own state."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from flexlora.adapters.layer import SlotLoRALayer
from flexlora.adapters.penalty import orthogonality_penalty
from flexlora.allocators.config import AllocatorConfig
from flexlora.errors import FlexLoRAError
from flexlora.plan import RankPlan, SlotChange

Adapters = Mapping[str, SlotLoRALayer]


def orthogonality_term(config: AllocatorConfig, adapters: Adapters) -> torch.Tensor | None:
    """The unweighted orthogonality penalty when ``config`` uses one (SVD form, orth_reg > 0), else None; the
    Lightning module and every allocator's ``penalty`` share it."""
    if config.orth_reg <= 0 or config.form != "svd":
        return None
    return orthogonality_penalty(adapters.values(), config.orth_form)


class Allocator(ABC):
    """Decides rank changes; never mutates adapters (the caller applies the returned plan).

    Steps are optimizer steps t = 1..T. After the optimizer step t (peft's ``update_and_allocate`` order):
    ``observe(adapters, t)`` sees the updated weights and the gradients that step used (accumulated, clipped),
    then ``plan(adapters, t)`` decides.
    """

    dynamic: bool = True
    # what the loop must provide (the engine builds each when it binds and hands it over through ``connect``):
    # "delta_grad": a DeltaGradRecorder, dL/d(dW) of every matrix each step (IncreLoRA's score)
    requires: tuple[str, ...] = ()

    def __init__(self, config: AllocatorConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self.services: dict[str, Any] = {}
        self.total_steps: int | None = None
        self.t_init = 0
        self.t_final = 0
        self.names: list[str] = []

    def bind(self, adapters: Adapters, total_steps: int) -> None:
        """Fix the matrices and the run length T; raises FlexLoRAError when the schedule cannot work."""
        if not adapters:
            raise FlexLoRAError("the model has no adapters to allocate rank to")
        if total_steps < 1:
            raise FlexLoRAError(f"the run has {total_steps} optimizer steps; set trainer.max_steps or max_epochs")
        self.names = list(adapters)
        self.total_steps = int(total_steps)
        self.t_init, self.t_final = self.config.resolve_steps(self.total_steps)
        self._validate(adapters)

    def connect(self, **services: Any) -> None:
        """Receive the services named in ``requires``."""
        self.services.update(services)

    def still_requires(self, service: str) -> bool:
        """Whether ``service`` is still needed (the engine drops what is not, e.g. hooks after growth ends)."""
        return service in self.requires

    def penalty(self, adapters: Adapters) -> torch.Tensor | None:
        """The allocator's extra loss term (weighted), or None: the orthogonality penalty of the SVD form."""
        raw = orthogonality_term(self.config, adapters)
        return None if raw is None else self.config.orth_reg * raw

    def _validate(self, adapters: Adapters) -> None:  # noqa: B027 - optional hook
        """Allocator-specific checks against T and the number of matrices."""

    def observe(self, adapters: Adapters, step: int) -> None:  # noqa: B027 - optional hook
        """Accumulate statistics from the updated weights and step t's gradients (default: nothing)."""

    @abstractmethod
    def plan(self, adapters: Adapters, step: int) -> RankPlan | None:
        """The decision for optimizer step ``step`` (None when nothing changes). Must not mutate anything."""

    def importance(self, adapters: Adapters) -> dict[str, float | None]:
        """Per-matrix scores for logging (default: none)."""
        return {}

    def on_applied(self, changes: Mapping[str, SlotChange]) -> None:  # noqa: B027 - optional hook
        """A plan was applied: per-slot state the allocator keeps (score trackers) follows ``changes``."""

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "t_init": self.t_init, "t_final": self.t_final, "names": self.names}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.total_steps is not None and state.get("total_steps") not in (None, self.total_steps):
            raise FlexLoRAError(
                f"checkpoint was made for a run of {state['total_steps']} optimizer steps, this run has "
                f"{self.total_steps}; resume with the same trainer.max_steps / max_epochs and batch size"
            )
        self.names = list(state.get("names", self.names))

    def schedule_error(self, why: str) -> FlexLoRAError:
        c = self.config
        return FlexLoRAError(
            f"allocator {c.name}: {why} (t_init={self.t_init}, t_final={self.t_final}, delta_t={c.delta_t}, "
            f"T={self.total_steps} optimizer steps). Lower allocator.t_init / allocator.t_final / "
            "allocator.delta_t, or train for more steps"
        )


class StaticAllocator(Allocator):
    """LoRA: a fixed rank everywhere, no events."""

    dynamic = False

    def plan(self, adapters: Adapters, step: int) -> RankPlan | None:
        return None
