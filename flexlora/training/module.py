"""The LightningModule: any task family's backbone with slot adapters (LoRA, AdaLoRA or FlexLoRA alike)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch.optim import Optimizer
from transformers import get_linear_schedule_with_warmup

from flexlora.adapters import SlotLoRALayer, inject
from flexlora.allocators.base import orthogonality_term
from flexlora.allocators.config import AllocatorConfig, allocator_config
from flexlora.backbones.heads import init_head, set_output_bias
from flexlora.errors import FlexLoRAError
from flexlora.families import EvalRecords, Family, make_family
from flexlora.faults import fault_point
from flexlora.optim.groups import param_groups


class AdaptedBackboneModule(L.LightningModule):
    """Hosts a backbone whose target matrices carry slot adapters; the task family supplies model, loss and
    evaluation. Loss = task loss + orth_reg * orthogonality penalty, added explicitly.

    ``optimizer`` is a partial (Hydra ``_partial_: true``) that receives the named param groups; the
    default is :class:`flexlora.optim.SlotAdamW`, which every allocator shares. Every evaluation gathers the
    per-example predictions of each split (across processes under DDP) and computes the official metrics
    from them once; ``last_metrics`` / ``last_records`` keep the latest evaluation for metrics.json and
    predictions.jsonl.
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        allocator: Mapping[str, Any],
        task: Mapping[str, Any],
        optimizer: Callable[..., Optimizer],
        warmup_steps: float = 0,
        head_lr: float | None = None,
        seed: int = 0,
        family: Family | None = None,
    ) -> None:
        super().__init__()
        # logger=False: the run's full Hydra config is what loggers get (train.py); these would overwrite it.
        self.save_hyperparameters(ignore=["optimizer", "family"], logger=False)
        # the run's one family object (train.build), or built here when the module is used on its own
        self.family: Family = family if family is not None else make_family(task, backbone, seed)
        self.allocator_config: AllocatorConfig = allocator_config(allocator)
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.head_lr = head_lr
        self.eval_splits = self.family.eval_splits
        self.model = self.family.build_model()
        backbone = self.family.backbone  # typed (flexlora.schemas)
        head_modules = list(backbone.head_modules)
        init_head(self.model, head_modules, seed)  # the same head for every allocator of a seed
        if (bias := self.family.head_bias()) is not None:
            set_output_bias(self.model, head_modules, bias)
        generator = torch.Generator().manual_seed(seed)
        self.adapters: dict[str, SlotLoRALayer] = inject(
            self.model, _targets(backbone.target_modules), head_modules=head_modules,
            generator=generator, **self.allocator_config.adapter_kwargs(),
        )
        self.eval_history: list[dict[str, float]] = []
        self.last_metrics: dict[str, float] = {}
        self.last_records: dict[str, EvalRecords] = {}
        self.degenerate: dict[str, str] = {}
        self._collected: dict[str, EvalRecords] = {}
        # A pretrained backbone is reloaded from its source, so checkpoints hold only what training changes.
        self.base_is_reloadable = bool(backbone.pretrained)
        self.strict_loading = not self.base_is_reloadable

    # ------------------------------------------------------------------ steps
    def on_train_epoch_start(self) -> None:
        self.model.train()  # never inherit eval mode from loading or from a validation loop

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        task_loss = self.family.training_loss(self.model, batch)
        loss = task_loss
        penalty = orthogonality_term(self.allocator_config, self.adapters)  # None for LoRA
        if penalty is not None:
            loss = loss + self.allocator_config.orth_reg * penalty
            self.log("train/orth", penalty.detach(), on_step=True, on_epoch=False)
        if not torch.isfinite(loss):
            raise FlexLoRAError(
                f"the training loss is {loss.item()} at optimizer step {self.global_step + 1}; training stopped and "
                "the last good checkpoint is kept. Lower the learning rate or check the data"
            )
        size = self.family.batch_size(batch)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        self.log("train/task_loss", task_loss.detach(), on_step=True, on_epoch=False, batch_size=size)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._collected = {split: EvalRecords() for split in self.eval_splits}

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        fault_point("validation")
        split = self.eval_splits[dataloader_idx]
        self._collected[split].extend(self.family.evaluate_batch(self.model, batch, split))

    def on_validation_epoch_end(self) -> None:
        per_split: dict[str, dict[str, float]] = {}
        records: dict[str, EvalRecords] = {}
        for split in self.eval_splits:
            records[split] = self._gather(self._collected.get(split, EvalRecords()))
            per_split[split] = self.family.metrics(split, records[split]) if records[split].idx else {}
        metrics = {k: v for values in per_split.values() for k, v in values.items()}
        metrics.update(self.family.summary_metrics(per_split))
        metrics.update(self.family.model_metrics(self.model, self.adapters))
        self._collected = {}
        if self.trainer.sanity_checking:
            return
        self.log_dict({k: float(v) for k, v in metrics.items()}, add_dataloader_idx=False)
        self.last_metrics, self.last_records = metrics, records
        self.degenerate = {s: why for s, r in records.items() if (why := self.family.degenerate(r))}
        self.eval_history.append({"step": self.global_step, **metrics})

    def _gather(self, records: EvalRecords) -> EvalRecords:
        """Every process's records of a split, merged in example order (identical on all processes)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * world
            torch.distributed.all_gather_object(parts, records)
            merged = EvalRecords()
            for part in parts:
                merged.extend(part)
            records = merged
        return records.sorted()

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """Adapters and head apart (the head may have its own lr, ``head_lr``); no decay on biases and norms."""
        return param_groups(self.named_parameters(), self.adapters, self.head_lr)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.param_groups())
        total = int(self.trainer.estimated_stepping_batches)
        warmup = self.warmup_steps
        warmup = round(warmup * total) if isinstance(warmup, float) and warmup < 1 else int(warmup)
        scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ compact state
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What a run changes: trainable tensors and buffers (slot masks); everything for config-built backbones."""
        state = self.state_dict()
        if not self.base_is_reloadable:
            return state
        frozen = {name for name, p in self.named_parameters() if not p.requires_grad}
        return {k: v for k, v in state.items() if k not in frozen}

    def load_trained_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a :meth:`trained_state_dict`; every trainable tensor and every slot mask must be in it."""
        required = set(self.trained_state_dict())
        missing = sorted(required - set(state))
        unexpected = sorted(set(state) - set(self.state_dict()))
        if missing or unexpected:
            raise FlexLoRAError(
                f"the saved state does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                "was it made with a different backbone or allocator config?"
            )
        self.load_state_dict(dict(state), strict=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trained_state_dict()
        checkpoint["eval_history"] = list(self.eval_history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted(set(self.trained_state_dict()) - set(checkpoint["state_dict"]))
        if missing:
            raise FlexLoRAError(f"checkpoint lacks {len(missing)} trained tensors, e.g. {missing[:3]}")
        self.eval_history = list(checkpoint.get("eval_history", []))

    # ------------------------------------------------------------------ reporting
    def rank_pattern(self) -> dict[str, int]:
        return {name: layer.live_rank for name, layer in self.adapters.items()}

    def trainable_parameters(self) -> int:
        """Trainable numbers that the final adapter uses: live slots of the adapters plus the head."""
        adapter_ids = {id(p) for layer in self.adapters.values() for p, _ in layer.slot_params()}
        head = sum(p.numel() for p in self.parameters() if p.requires_grad and id(p) not in adapter_ids)
        live = 0
        for layer in self.adapters.values():
            per_slot = layer.in_features + layer.out_features + (1 if layer.lora_E is not None else 0)
            live += layer.live_rank * per_slot
        return head + live


def _targets(value: Any) -> str | list[str]:
    if isinstance(value, str):
        return value
    try:
        return [str(v) for v in value]
    except TypeError as err:
        raise FlexLoRAError(
            f"backbone.target_modules must be a regex string or a list of names, got {value!r}"
        ) from err
