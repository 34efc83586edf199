"""The LightningModule: a Hugging Face classifier with slot adapters, trained on one task."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim import Optimizer
from torchmetrics import MetricCollection
from torchmetrics.classification import Accuracy, F1Score, MatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from transformers import get_linear_schedule_with_warmup

from flexlora.adapters import SlotLoRALayer, inject, orthogonality_penalty
from flexlora.allocators import AllocatorConfig, allocator_config
from flexlora.data.tasks import TaskSpec, task_spec
from flexlora.errors import FlexLoRAError
from flexlora.models import build_classifier

NO_DECAY = ("bias", "LayerNorm.weight", "layernorm.weight", "layer_norm.weight", "LayerNorm.bias")


def build_metrics(spec: TaskSpec, prefix: str) -> MetricCollection:
    """The task's official GLUE metrics (CoLA MCC, STS-B Pearson/Spearman, MRPC/QQP acc+F1, else acc)."""
    factories: dict[str, Callable[[], Any]] = {
        "accuracy": lambda: Accuracy(task="multiclass", num_classes=spec.num_labels),
        "f1": lambda: F1Score(task="binary"),
        "mcc": lambda: MatthewsCorrCoef(task="binary"),
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
    }
    return MetricCollection({name: factories[name]() for name in spec.metrics}, prefix=f"{prefix}/")


class FlexLoRAModule(L.LightningModule):
    """Hosts the adapted backbone. Loss = task loss + orth_reg * orthogonality penalty, added explicitly.

    ``optimizer`` is a partial (Hydra ``_partial_: true``) that receives the named param groups; the
    default is :class:`flexlora.optim.SlotAdamW`, which every allocator shares.
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        allocator: Mapping[str, Any],
        task: str,
        optimizer: Callable[..., Optimizer],
        warmup_steps: int | float = 0,
        eval_splits: Sequence[str] = ("val",),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.spec = task_spec(task)
        self.allocator_config: AllocatorConfig = allocator_config(allocator)
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.eval_splits = list(eval_splits)
        self.model = build_classifier(backbone, self.spec.num_labels)
        generator = torch.Generator().manual_seed(seed)
        self.adapters: dict[str, SlotLoRALayer] = inject(
            self.model, _targets(backbone["target_modules"]), head_modules=list(backbone.get("head_modules") or []),
            generator=generator, **self.allocator_config.adapter_kwargs(),
        )
        self.val_metrics = torch.nn.ModuleDict({s: build_metrics(self.spec, s) for s in self.eval_splits})
        self.eval_history: list[dict[str, float]] = []
        # A pretrained backbone is reloaded from its source, so checkpoints hold only what training changes.
        self.base_is_reloadable = bool(backbone.get("pretrained"))
        self.strict_loading = not self.base_is_reloadable

    # ------------------------------------------------------------------ steps
    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.model(**inputs).logits

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.spec.is_regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def on_train_epoch_start(self) -> None:
        self.model.train()  # never inherit eval mode from loading or from a validation loop

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        task_loss = self.task_loss(logits, batch["labels"])
        loss = task_loss
        gamma = self.allocator_config.orth_reg
        if gamma > 0:
            penalty = orthogonality_penalty(self.adapters.values(), self.allocator_config.orth_form)
            loss = loss + gamma * penalty
            self.log("train/orth", penalty.detach(), on_step=True, on_epoch=False)
        if not torch.isfinite(loss):
            raise FlexLoRAError(
                f"the training loss is {loss.item()} at optimizer step {self.global_step + 1}; training stopped and "
                "the last good checkpoint is kept. Lower the learning rate or check the data"
            )
        batch_size = batch["labels"].shape[0]
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log("train/task_loss", task_loss.detach(), on_step=True, on_epoch=False, batch_size=batch_size)
        for group in self.trainer.optimizers[0].param_groups if self._trainer is not None else []:
            self.log(f"train/lr_{group.get('name', 'group')}", group["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        split = self.eval_splits[dataloader_idx]
        logits = self(batch)
        labels = batch["labels"]
        loss = self.task_loss(logits, labels)
        self.log(f"{split}/loss", loss, on_epoch=True, add_dataloader_idx=False, batch_size=labels.shape[0],
                 sync_dist=True)
        preds = logits.squeeze(-1).float() if self.spec.is_regression else logits.argmax(dim=-1)
        self.val_metrics[split].update(preds, labels)

    def on_validation_epoch_end(self) -> None:
        results: dict[str, float] = {}
        for split in self.eval_splits:
            values = self.val_metrics[split].compute()
            self.val_metrics[split].reset()
            self.log_dict(values, prog_bar=True, add_dataloader_idx=False)
            results.update({k: float(v) for k, v in values.items()})
        if not self.trainer.sanity_checking:
            self.eval_history.append({"step": self.global_step, **results})

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters in two named groups: no weight decay on biases and LayerNorm."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if any(k in name for k in NO_DECAY) else decay).append(param)
        groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted(set(self.trained_state_dict()) - set(checkpoint["state_dict"]))
        if missing:
            raise FlexLoRAError(f"checkpoint lacks {len(missing)} trained tensors, e.g. {missing[:3]}")

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
