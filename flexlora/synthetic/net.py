"""The frozen random residual network of the rank-recovery benchmark, and the seeding it shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


