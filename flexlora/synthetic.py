"""A rank-recovery benchmark with a known answer: does a method give rank to the matrices that need it?

No public benchmark tests FlexLoRA's allocation claim directly, so we plant one. A frozen random residual
network (:class:`SyntheticNet`) is the backbone; a teacher equals that network plus, on every adapted matrix
``k``, an update ``dW*_k`` of known rank ``r*_k`` (:func:`draw_teacher`). A student (the frozen network with
adapters) regresses the teacher's outputs from Gaussian inputs (:func:`make_regression_data`). Afterwards
:func:`rank_spearman` asks whether the final live ranks track ``r*_k`` and :func:`captured_energy` how much of
the teacher's update the learned adapters reproduce.

Design choices, each so that *rank* is the only thing that differs between matrices:

* Every base weight is a random orthogonal ``d x d`` matrix (all singular values 1), so each matrix is equally
  well conditioned and has the same Frobenius norm ``sqrt(d)``.
* Every teacher update has the same Frobenius norm ``update_scale * sqrt(d)``; a rank-1 update is one strong
  direction, a rank-16 one spreads the same energy over 16 directions.
* Target ranks sum exactly to the global budget ``n x r0`` that the adapters are given, so a perfect
  allocator can in principle match them.

Everything is float32 and drawn from explicit seeds (never the global RNG): the same seeds give bit-identical
networks, teachers and data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from flexlora.errors import FlexLoRAError

Spectrum = Literal["flat", "decaying"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}

# Measured by relative_output_change (dim 64, 6 blocks, 2 matrices per block, n = 12, r0 = 8, max_rank 16,
# 4096 Gaussian inputs, teacher seeds 0-19): update_scale 0.5 moves the output by ||teacher(x) - net(x)|| /
# ||net(x)|| = 0.73-0.81 (mean 0.77) for flat and decaying spectra alike; 0.25 gives ~0.38, 1.0 gives ~1.6.
# The change is clear, yet a student with the true ranks fits it to relative MSE ~0.02 in 200 Adam steps.
DEFAULT_UPDATE_SCALE = 0.5
# Geometric decay per direction of the "decaying" spectrum. 0.85 keeps the weakest direction at max_rank 32
# at 0.85^31 = 0.0065 of the strongest: far above float32's rank tolerance and still worth learning. A steeper
# 0.6 would push directions beyond ~20 below float32 resolution, making r*_k a fiction.
DEFAULT_DECAY = 0.85
# Spread of the log-normal rank weights: sigma 0.8 spans roughly a 20x ratio between the smallest and largest
# weight of 12 draws, i.e. ranks from 1 to the cap, without piling most matrices onto the cap.
DEFAULT_RANK_SIGMA = 0.8


def _derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for one independent stream, so adding a draw never shifts another one's numbers."""
    words = [int(seed)] + [k if isinstance(k, int) else int.from_bytes(k.encode(), "little") for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]) >> 1


def _generator(seed: int, *keys: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(_derive_seed(seed, *keys))


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """A Haar-random ``rows x cols`` matrix with orthonormal columns (QR of a Gaussian with the sign fix)."""
    if cols > rows:
        raise FlexLoRAError(f"cannot draw {cols} orthonormal columns in dimension {rows}")
    gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


# ---------------------------------------------------------------------------------------------- network
@dataclass
class SyntheticConfig:
    """The frozen backbone: ``blocks`` pre-norm residual MLP blocks of ``matrices_per_block`` d x d linears."""

    dim: int = 64
    blocks: int = 6
    matrices_per_block: int = 2
    activation: str = "gelu"
    base_seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1 or self.blocks < 1 or self.matrices_per_block < 1:
            raise FlexLoRAError(
                f"synthetic backbone needs dim, blocks, matrices_per_block >= 1, got {self.dim}, {self.blocks}, "
                f"{self.matrices_per_block}"
            )
        if self.activation not in ACTIVATIONS:
            raise FlexLoRAError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")

    @property
    def n_matrices(self) -> int:
        return self.blocks * self.matrices_per_block

    @property
    def target_modules(self) -> list[str]:
        """The suffixes that select every linear layer, e.g. ``["w1", "w2"]``."""
        return [f"w{j + 1}" for j in range(self.matrices_per_block)]

    def matrix_names(self) -> list[str]:
        """Module names of all adapted matrices in forward order, e.g. ``blocks.0.w1``."""
        return [f"blocks.{b}.{t}" for b in range(self.blocks) for t in self.target_modules]


class SyntheticBlock(nn.Module):
    """``h + W_m act(... act(W_1 norm(h)))``: pre-norm keeps each block's input at unit scale whatever the depth."""

    def __init__(self, config: SyntheticConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.act = ACTIVATIONS[config.activation]
        for name in config.target_modules:
            # skip_init: nn.Linear's own Kaiming init would consume the global RNG
            linear = torch.nn.utils.skip_init(nn.Linear, config.dim, config.dim, bias=False)
            with torch.no_grad():
                linear.weight.copy_(random_orthonormal(config.dim, config.dim, generator).to(torch.float32))
            self.add_module(name, linear)
        self._names = config.target_modules

    def forward(self, h: Tensor) -> Tensor:
        z = F.layer_norm(h, h.shape[-1:])
        for i, name in enumerate(self._names):
            if i:
                z = self.act(z)
            z = getattr(self, name)(z)
        return h + z


class SyntheticNet(nn.Module):
    """The frozen random network ``(batch, dim) -> (batch, dim)``; every ``nn.Linear`` is an adapted matrix.

    Orthogonal weights keep every singular value at 1: with the pre-norm, each block's pre-activations are
    ~N(0, 1) per coordinate and its residual branch adds variance ~0.4 (gelu), so the residual stream grows
    gently (about 1 -> 3.7 in variance over 6 blocks) and neither explodes nor vanishes. The identity path
    keeps every block's update visible at the output, and there is no bias or affine norm to adapt besides.
    """

    def __init__(self, config: SyntheticConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        if generator is None:
            generator = _generator(config.base_seed, "synthetic-net")
        self.blocks = nn.ModuleList(SyntheticBlock(config, generator) for _ in range(config.blocks))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build_frozen_net(config: SyntheticConfig) -> SyntheticNet:
    """The backbone from ``config.base_seed`` with every parameter frozen and in eval mode."""
    net = SyntheticNet(config)
    net.requires_grad_(False)
    return net.eval()


# ---------------------------------------------------------------------------------------------- teacher
def draw_target_ranks(n: int, r0: int, max_rank: int, seed: int, sigma: float = DEFAULT_RANK_SIGMA) -> list[int]:
    """Heterogeneous target ranks in ``[1, max_rank]`` summing to exactly ``n * r0``.

    Distribution: weights ``w_k = exp(sigma z_k)``, ``z_k ~ N(0, 1)``; ranks proportional to ``w_k``, clipped to
    their bounds with the excess redistributed proportionally (one scale ``lam`` found by bisection so that
    ``sum clip(lam w_k) = n r0``), then rounded by the largest-remainder rule. When ``n >= 8``, ``r0 >= 2`` and
    ``max_rank >= ceil(1.5 r0)``, the ``max(2, n // 6)`` matrices with the smallest weights are capped at rank 2
    and as many with the largest weights are floored at ``ceil(1.5 r0)``: every draw then has several matrices
    that need 1-2 directions and several that need far more than the uniform ``r0`` (the bounds are always
    feasible under those conditions). Outside them the plain clipped draw is used.
    """
    if n < 1 or not 1 <= r0 <= max_rank:
        raise FlexLoRAError(f"target ranks need n >= 1 and 1 <= r0 <= max_rank, got {n=}, {r0=}, {max_rank=}")
    budget = n * r0
    z = torch.randn(n, generator=_generator(seed, "target-ranks"), dtype=torch.float64).numpy()
    weights = np.exp(sigma * z)
    lo = np.ones(n)
    hi = np.full(n, float(max_rank))
    high_floor = math.ceil(1.5 * r0)
    if n >= 8 and r0 >= 2 and max_rank >= high_floor:
        several = max(2, n // 6)
        order = np.argsort(weights, kind="stable")
        hi[order[:several]] = 2.0
        lo[order[-several:]] = float(high_floor)
    if not lo.sum() <= budget <= hi.sum():  # unreachable by the argument above; kept as a guard
        raise FlexLoRAError(f"no rank allocation in the bounds sums to {budget}")

    def total(lam: float) -> float:
        return float(np.clip(lam * weights, lo, hi).sum())

    lam_lo, lam_hi = 0.0, float(hi.max() / weights.min())
    for _ in range(200):
        mid = 0.5 * (lam_lo + lam_hi)
        lam_lo, lam_hi = (mid, lam_hi) if total(mid) < budget else (lam_lo, mid)
    ideal = np.clip(lam_hi * weights, lo, hi)
    ranks = np.floor(ideal + 1e-9).astype(int)
    remainder = ideal - ranks
    can_grow = ranks + 1 <= hi
    order = sorted(range(n), key=lambda k: (-remainder[k] if can_grow[k] else math.inf, k))
    for k in order[: budget - int(ranks.sum())]:
        ranks[k] += 1
    assert ranks.sum() == budget and (ranks >= lo).all() and (ranks <= hi).all(), ranks
    return [int(r) for r in ranks]


def singular_values(rank: int, spectrum: Spectrum, decay: float = DEFAULT_DECAY) -> Tensor:
    """Unnormalised spectrum of one update: all ones (flat) or ``decay ** i`` (decaying), float64."""
    if spectrum == "flat":
        return torch.ones(rank, dtype=torch.float64)
    if spectrum == "decaying":
        return decay ** torch.arange(rank, dtype=torch.float64)
    raise FlexLoRAError(f"spectrum must be 'flat' or 'decaying', got {spectrum!r}")


@dataclass
class TeacherSpec:
    """The arguments of :func:`draw_teacher`, as one object a Hydra config can hold."""

    n_matrices: int
    r0: int
    max_rank: int
    spectrum: Spectrum = "flat"
    seed: int = 0
    update_scale: float = DEFAULT_UPDATE_SCALE
    decay: float = DEFAULT_DECAY
    rank_sigma: float = DEFAULT_RANK_SIGMA

    def draw(self, config: SyntheticConfig, base: nn.Module | None = None) -> Teacher:
        return draw_teacher(config, base=base, **asdict(self))


@dataclass
class Teacher:
    """Target ranks and planted updates ``dW*_k`` (nn.Linear layout, float32) by matrix name."""

    spec: TeacherSpec
    target_ranks: dict[str, int]
    updates: dict[str, Tensor] = field(repr=False)

    @property
    def matrix_names(self) -> list[str]:
        return list(self.updates)

    def apply_to(self, net: nn.Module) -> nn.Module:
        """A frozen deep copy of ``net`` with ``W_k + dW*_k`` on every planted matrix (``net`` is untouched)."""
        teacher = copy.deepcopy(net)
        for name, update in self.updates.items():
            try:
                module = teacher.get_submodule(name)
            except AttributeError as exc:
                raise FlexLoRAError(f"the network has no module {name}; apply the teacher to the backbone") from exc
            if type(module) is not nn.Linear:
                raise FlexLoRAError(
                    f"{name} is a {type(module).__name__}, not nn.Linear: apply the teacher to the un-adapted backbone"
                )
            with torch.no_grad():
                module.weight.add_(update.to(module.weight))
        teacher.requires_grad_(False)
        return teacher.eval()


def draw_teacher(
    config: SyntheticConfig,
    n_matrices: int,
    r0: int,
    max_rank: int,
    spectrum: Spectrum = "flat",
    seed: int = 0,
    update_scale: float = DEFAULT_UPDATE_SCALE,
    *,
    decay: float = DEFAULT_DECAY,
    rank_sigma: float = DEFAULT_RANK_SIGMA,
    base: nn.Module | None = None,
) -> Teacher:
    """Plant a rank-``r*_k`` update ``dW*_k = U diag(s) V^T`` on each of the network's matrices.

    ``n_matrices`` must equal ``config.n_matrices``: it is passed explicitly so the experiment config states the
    budget ``n x r0`` it was designed for, and a backbone change that breaks it fails loudly. ``U``, ``V`` are
    Haar-random orthonormal ``d x r*_k`` factors drawn per matrix from ``seed``. Every update is scaled to the
    same Frobenius norm ``update_scale x`` (mean Frobenius norm of the base weights; ``sqrt(dim)`` for the
    orthogonal backbone), so rank, not scale, is what differs between matrices. ``base`` defaults to the net
    built from ``config``; it only supplies the reference norm.
    """
    if n_matrices != config.n_matrices:
        raise FlexLoRAError(
            f"teacher n_matrices={n_matrices} but the synthetic backbone has {config.n_matrices} "
            f"({config.blocks} blocks x {config.matrices_per_block}); make them agree"
        )
    if max_rank > config.dim:
        raise FlexLoRAError(f"max_rank {max_rank} exceeds the matrix size {config.dim}")
    if update_scale <= 0:
        raise FlexLoRAError(f"update_scale must be > 0, got {update_scale}")
    if spectrum == "decaying" and not 0 < decay <= 1:
        raise FlexLoRAError(f"decay must lie in (0, 1], got {decay}")
    names = config.matrix_names()
    base = base if base is not None else build_frozen_net(config)
    ref_norm = float(np.mean([torch.linalg.matrix_norm(base.get_submodule(n).weight.double()).item() for n in names]))
    target_norm = update_scale * ref_norm

    ranks = draw_target_ranks(n_matrices, r0, max_rank, seed, rank_sigma)
    updates: dict[str, Tensor] = {}
    for k, (name, rank) in enumerate(zip(names, ranks, strict=True)):
        gen = _generator(seed, "teacher-factors", k)
        u = random_orthonormal(config.dim, rank, gen)
        v = random_orthonormal(config.dim, rank, gen)
        s = singular_values(rank, spectrum, decay)
        s = s * (target_norm / torch.linalg.vector_norm(s))
        updates[name] = ((u * s) @ v.T).to(torch.float32)
    spec = TeacherSpec(n_matrices, r0, max_rank, spectrum, seed, update_scale, decay, rank_sigma)
    return Teacher(spec=spec, target_ranks=dict(zip(names, ranks, strict=True)), updates=updates)


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
