"""Rank recovery: regress a planted teacher whose per-matrix update ranks are known (flexlora.synthetic).

``backbone=synthetic`` is the frozen random residual network; ``task=rank_recovery`` draws the teacher (its
ranks sum to n x the allocator's rank, the same budget every method ends at) and Gaussian inputs. Besides
``val/mse`` and ``val/relative_mse`` (MSE over the frozen network's MSE: 1 = nothing learned), the run
reports ``rank/spearman`` (final live rank vs the teacher's rank per matrix; 0 for a constant allocation)
and ``rank/energy`` (fraction of the teacher's update energy the learned updates reproduce).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from flexlora.families.base import EvalRecords, Family, TaskData


class _Indexed(Dataset):
    """(x, y) pairs as dicts with the example's index, the shape every family's batches have."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "labels": self.y[i], "idx": i}


def _collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([it["x"] for it in items]), "labels": torch.stack([it["labels"] for it in items]),
            "idx": torch.tensor([it["idx"] for it in items])}


class SyntheticFamily(Family):
    supports_tune = False  # the validation data is drawn fresh from the teacher: nothing to hold out
    degenerate_check = "none"  # see degenerate(): errors, not class decisions

    def _config(self) -> Any:
        from flexlora.synthetic import SyntheticConfig

        spec = {k: v for k, v in dict(self.backbone.from_config or {}).items() if k != "model_type"}
        return SyntheticConfig(**spec)

    @functools.cached_property
    def teacher(self) -> Any:
        from flexlora.synthetic import build_frozen_net, draw_teacher

        config = self._config()
        task = self.task
        rank = int(task.budget_rank)
        return draw_teacher(
            config, config.n_matrices, rank, int(task.max_target_rank or 2 * rank),
            spectrum=str(task.spectrum), seed=self._teacher_seed(),
            update_scale=float(task.update_scale), base=build_frozen_net(config),
        )

    def _teacher_seed(self) -> int:
        return int(self.task.teacher_seed if self.task.teacher_seed is not None else self.seed)

    @functools.cached_property
    def data(self) -> dict[str, Any]:
        """The regression splits (x, teacher(x)); deterministic, so the data and the model side agree."""
        from flexlora.synthetic import build_frozen_net, make_regression_data

        config = self._config()
        base = build_frozen_net(config)
        return make_regression_data(self.teacher.apply_to(base), int(self.task.n_train), int(self.task.n_val),
                                    config.dim, seed=self._teacher_seed() + 1, base_net=base)

    def load_data(self) -> TaskData:
        return TaskData(train=_Indexed(*self.data["train"].tensors), evals={"val": _Indexed(*self.data["val"].tensors)},
                        train_collate=_collate, eval_collate=_collate)

    def build_model(self) -> nn.Module:
        from flexlora.synthetic import build_frozen_net

        return build_frozen_net(self._config()).train()

    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return F.mse_loss(model(batch["x"]), batch["labels"])

    def evaluate_batch(self, model: nn.Module, batch: Any, split: str) -> EvalRecords:
        out = model(batch["x"])
        per_example = (out - batch["labels"]).square().mean(dim=1)
        return EvalRecords(batch["idx"].tolist(), [None] * len(per_example), per_example.tolist(), None,
                           float(per_example.sum()), len(per_example))

    def metrics(self, split: str, records: EvalRecords) -> dict[str, float]:
        """MSE over examples and outputs; relative to the frozen network's MSE on the same split."""
        mse = sum(records.prediction) / max(1, len(records.prediction))  # predictions hold per-example MSEs
        initial = self._initial_mse(split)
        return {f"{split}/mse": mse, f"{split}/relative_mse": mse / initial if initial > 0 else float("nan")}

    def _initial_mse(self, split: str) -> float:
        return float(self.data[split].initial_mse)

    def model_metrics(self, model: nn.Module, adapters: Mapping[str, Any]) -> dict[str, float]:
        from flexlora.synthetic import captured_energy, learned_updates, rank_spearman

        teacher = self.teacher
        ranks = {name: adapters_for(adapters, name).live_rank for name in teacher.matrix_names}
        learned = learned_updates(adapters, teacher.matrix_names)
        return {"rank/spearman": rank_spearman(ranks, teacher.target_ranks),
                "rank/energy": captured_energy(learned, teacher.updates)}

    def degenerate(self, records: EvalRecords) -> str:
        return ""  # predictions are per-example errors here, not class decisions

    def batch_size(self, batch: Any) -> int:
        return int(batch["x"].shape[0])


def adapters_for(adapters: Mapping[str, Any], name: str) -> Any:
    """The adapter of teacher matrix ``name`` (adapter names may carry a wrapper prefix such as ``model.``)."""
    for key, layer in adapters.items():
        if key == name or key.endswith("." + name):
            return layer
    raise KeyError(f"no adapter for {name}")
