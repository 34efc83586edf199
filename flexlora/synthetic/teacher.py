"""The planted teacher: per-matrix updates of known, heterogeneous rank and equal norm."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from flexlora.errors import FlexLoRAError
from flexlora.synthetic.net import (
    DEFAULT_DECAY,
    DEFAULT_RANK_SIGMA,
    DEFAULT_UPDATE_SCALE,
    Spectrum,
    SyntheticConfig,
    _generator,
    build_frozen_net,
    random_orthonormal,
)


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


