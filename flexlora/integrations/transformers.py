"""FlexLoRA / AdaLoRA under the Hugging Face ``Trainer`` (and TRL's trainers built on it).

    model = AutoModelForSequenceClassification.from_pretrained(...)
    adapters = inject(model, ["query", "value"], head_modules=["classifier"], **config.adapter_kwargs())
    engine = RankAllocationEngine(adapters, config, seed=args.seed)
    trainer = FlexLoRATrainer(engine=engine, model=model, args=args, train_dataset=...)
    trainer.train()

:class:`FlexLoRACallback` tells the engine where the Trainer's loop is: ``observe`` in ``on_optimizer_step``
(after ``optimizer.step()``, before ``zero_grad``, so step t's clipped gradients are still there) and
``allocate`` in ``on_step_end`` (after the LR scheduler's step, with ``global_step`` = t), the order the
Lightning callback uses. :class:`FlexLoRATrainer` adds what the Trainer cannot know: the optimizer that
supports slot surgery (:class:`flexlora.optim.SlotAdamW`, with the same parameter groups as ``run.py``) and the
orthogonality term in the loss. Under ``accelerate`` / torchrun the plan is decided on rank 0 and broadcast.
Install with ``pip install flexlora[hf]``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from flexlora.engine import RankAllocationEngine
from flexlora.optim import SlotAdamW
from flexlora.optim.groups import param_groups


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer under accelerate's ``AcceleratedOptimizer`` wrapper (surgery needs its state)."""
    while not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer"):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


class FlexLoRACallback(TrainerCallback):
    """Drives a :class:`RankAllocationEngine` from the Trainer's events; the engine's state rides in
    ``state.stateful_callbacks`` of every Trainer checkpoint."""

    def __init__(self, engine: RankAllocationEngine) -> None:
        self.engine = engine
        self._pending: dict[str, Any] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self.engine.bind(_unwrap(optimizer), int(state.max_steps))
        if self._pending:
            self.engine.load_state_dict(self._pending)
            self._pending = None
        elif not self.engine.event_log.records:
            self.engine.start()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.engine.observe(state.global_step + 1)  # the Trainer counts the step after this event

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.engine.allocate(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.engine.end(state.global_step)

    # transformers' ExportableState protocol: saved with checkpoints, handed back on resume
    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"_pending": self.engine.state_dict()}}


class FlexLoRATrainer(Trainer):
    """A ``Trainer`` whose optimizer is :class:`SlotAdamW` over ``run.py``'s parameter groups, whose loss carries
    the allocator's orthogonality term, and which registers a :class:`FlexLoRACallback` for ``engine``."""

    def __init__(self, *args: Any, engine: RankAllocationEngine, head_lr: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.engine = engine
        self.head_lr = head_lr
        self.add_callback(FlexLoRACallback(engine))
        if getattr(self, "loss_is_scaled_for_ga", None) is None:
            # Trainer counts a loss as normalised over the accumulated batch when the model takes **kwargs; a
            # classification head does, and still returns a per-batch mean: accumulated steps would then sum
            # instead of average (run.py averages). Only a causal-LM loss divides by num_items_in_batch.
            self.loss_is_scaled_for_ga = bool(
                getattr(self, "_loss_shifts_labels", False) and self.model_accepts_loss_kwargs
            ) or self.compute_loss_func is not None

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = model if model is not None else self.model
            self.optimizer = SlotAdamW(
                param_groups(model.named_parameters(), self.engine.adapters, self.head_lr),
                lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon, weight_decay=self.args.weight_decay,
            )
        return self.optimizer

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        penalty = self.engine.penalty()
        if penalty is None:
            return result
        if self.loss_is_scaled_for_ga and num_items_in_batch is not None:
            # the Trainer will not divide by the accumulation steps: the penalty counts once per step, as in run.py
            penalty = penalty / self.current_gradient_accumulation_steps
        if return_outputs:
            loss, outputs = result
            return loss + penalty, outputs
        return result + penalty
