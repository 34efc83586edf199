"""Regression data from the teacher, and the benchmark's answers: rank Spearman and captured energy."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from flexlora.errors import FlexLoRAError
from flexlora.synthetic.net import *  # noqa: F403
from flexlora.synthetic.net import _generator


# ---------------------------------------------------------------------------------------------- data
class RegressionSplit(TensorDataset):
    """``(x, y)`` pairs plus ``initial_mse``: the MSE of the untrained student (the frozen net) on this split."""

    def __init__(self, x: Tensor, y: Tensor, initial_mse: float) -> None:
        super().__init__(x, y)
        self.initial_mse = initial_mse


@torch.no_grad()
def _predict(net: nn.Module, x: Tensor, batch: int = 4096) -> Tensor:
    was_training = net.training
    net.eval()
    out = torch.cat([net(chunk) for chunk in x.split(batch)])
    net.train(was_training)
    return out


def make_regression_data(
    net_teacher: nn.Module,
    n_train: int,
    n_val: int,
    dim: int,
    seed: int,
    *,
    base_net: nn.Module | None = None,
) -> dict[str, RegressionSplit]:
    """``{"train", "val"}``: ``x ~ N(0, I)``, ``y = teacher(x)``, each split from its own stream of ``seed``.

    Targets are *not* normalised: the student starts exactly at the frozen network and must reach the teacher
    in the teacher's own units; rescaling ``y`` would need a matching head and break that. Comparability across
    seeds comes from :func:`regression_metrics` instead: ``relative_mse = mse / initial_mse`` with
    ``initial_mse = mean((y - base_net(x))^2)``, the error of the untrained student (so 1 = nothing learned,
    0 = teacher recovered). Without ``base_net`` ``initial_mse`` is NaN and only the raw ``mse`` is meaningful.
    """
    splits: dict[str, RegressionSplit] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        x = torch.randn(n, dim, generator=_generator(seed, "regression", split), dtype=torch.float32)
        y = _predict(net_teacher, x)
        initial = float(((y - _predict(base_net, x)) ** 2).mean()) if base_net is not None and n else math.nan
        splits[split] = RegressionSplit(x, y, initial)
    return splits


def regression_metrics(pred: Tensor, target: Tensor, initial_mse: float) -> dict[str, Tensor]:
    """``mse`` (raw, teacher units) and ``relative_mse`` (``mse / initial_mse``, comparable across seeds)."""
    mse = F.mse_loss(pred.float(), target.float())
    return {"mse": mse, "relative_mse": mse / initial_mse}


def relative_output_change(
    net_teacher: nn.Module, base_net: nn.Module, dim: int, n: int = 4096, seed: int = 0
) -> float:
    """``||teacher(x) - base(x)||_F / ||base(x)||_F`` over ``n`` Gaussian inputs: how far the teacher moved."""
    x = torch.randn(n, dim, generator=_generator(seed, "output-change"), dtype=torch.float32)
    base_out = _predict(base_net, x)
    return float(torch.linalg.matrix_norm(_predict(net_teacher, x) - base_out) / torch.linalg.matrix_norm(base_out))


# ---------------------------------------------------------------------------------------------- metrics
def rank_spearman(final_ranks: Mapping[str, int], target_ranks: Mapping[str, int]) -> float:
    """Spearman correlation of final live ranks against ``r*_k`` over the target matrices (scipy, tie-aware).

    Convention of this benchmark: a constant allocation on either side (static LoRA gives every matrix ``r0``)
    carries no ordering information, so it scores 0.0 rather than scipy's NaN.
    """
    names = list(target_ranks)
    missing = [n for n in names if n not in final_ranks]
    if missing:
        raise FlexLoRAError(f"final_ranks lacks target matrices {missing[:5]}{'...' if len(missing) > 5 else ''}")
    final = np.array([final_ranks[n] for n in names], dtype=float)
    target = np.array([target_ranks[n] for n in names], dtype=float)
    if len(names) < 2 or np.ptp(final) == 0 or np.ptp(target) == 0:
        return 0.0
    rho = float(stats.spearmanr(final, target).statistic)
    return 0.0 if math.isnan(rho) else rho


def _residual_and_energy(
    learned: Mapping[str, Tensor], teacher: Mapping[str, Tensor]
) -> tuple[dict[str, float], dict[str, float]]:
    if set(learned) != set(teacher):
        missing, extra = sorted(set(teacher) - set(learned)), sorted(set(learned) - set(teacher))
        raise FlexLoRAError(
            f"learned and teacher updates name different matrices (missing {missing[:5]}, extra {extra[:5]}); "
            "strip any wrapper prefix so names read like blocks.0.w1"
        )
    residual, energy = {}, {}
    for name, target in teacher.items():
        got = learned[name]
        if got.shape != target.shape:
            raise FlexLoRAError(f"{name}: learned update has shape {tuple(got.shape)}, teacher {tuple(target.shape)}")
        t = target.detach().double().cpu()
        residual[name] = float(((got.detach().double().cpu() - t) ** 2).sum())
        energy[name] = float((t**2).sum())
    return residual, energy


def captured_energy(learned: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> float:
    """Fraction of the teacher's update energy recovered: ``max(0, 1 - sum|dW - dW*|^2 / sum|dW*|^2)``.

    Why this and not e.g. subspace overlap: the squared error punishes wrong directions *and* wrong magnitudes
    (an update in the right subspace but twice too large scores as badly as none), and the clip puts it in
    [0, 1]: 1 = exact recovery, 0 = nothing learned or worse than nothing. Since every ``dW*_k`` has the same
    norm, the unclipped value is the mean of the unclipped per-matrix values.
    """
    residual, energy = _residual_and_energy(learned, teacher)
    return max(0.0, 1.0 - sum(residual.values()) / sum(energy.values()))


def per_matrix_energy(learned: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> dict[str, float]:
    """:func:`captured_energy` per matrix (same clip to [0, 1]), for plotting recovery against ``r*_k``."""
    residual, energy = _residual_and_energy(learned, teacher)
    return {name: max(0.0, 1.0 - residual[name] / energy[name]) for name in teacher}


def learned_updates(adapters: Mapping[str, nn.Module], names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """``{name: adapter.delta_weight()}``, stripping any wrapper prefix so keys match the teacher's names."""
    out: dict[str, Tensor] = {}
    for key, module in adapters.items():
        name = key
        if names is not None:
            hits = [n for n in names if key == n or key.endswith("." + n)]
            if len(hits) != 1:
                raise FlexLoRAError(f"adapter {key} matches {len(hits)} teacher matrices")
            name = hits[0]
        out[name] = module.delta_weight().detach()  # type: ignore[operator]
    return out
