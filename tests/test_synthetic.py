"""The rank-recovery benchmark's pure-torch parts: known target ranks, planted updates, data and metrics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from flexlora.errors import FlexLoRAError
from flexlora.synthetic import (
    DEFAULT_DECAY,
    DEFAULT_UPDATE_SCALE,
    SyntheticConfig,
    SyntheticNet,
    TeacherSpec,
    build_frozen_net,
    captured_energy,
    draw_target_ranks,
    draw_teacher,
    learned_updates,
    make_regression_data,
    per_matrix_energy,
    rank_spearman,
    regression_metrics,
    relative_output_change,
)

CFG = SyntheticConfig()  # dim 64, 6 blocks x 2 matrices = 12 adapted matrices


@pytest.fixture(scope="module")
def net() -> SyntheticNet:
    return build_frozen_net(CFG)


# ---------------------------------------------------------------------------------------------- network
def test_net_names_shapes_and_frozen(net):
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    assert linears == CFG.matrix_names() == [f"blocks.{b}.w{j}" for b in range(6) for j in (1, 2)]
    assert CFG.target_modules == ["w1", "w2"] and CFG.n_matrices == 12
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Linear))
    assert not any(p.requires_grad for p in net.parameters())
    assert net(torch.zeros(5, 64)).shape == (5, 64)


def test_net_is_well_conditioned(net):
    """Orthogonal weights and pre-norm: the residual stream grows gently, every branch stays O(1)."""
    for name in CFG.matrix_names():
        s = torch.linalg.svdvals(net.get_submodule(name).weight)
        torch.testing.assert_close(s, torch.ones(64), atol=1e-5, rtol=0)
    h = torch.randn(2048, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for block in net.blocks:
            out = block(h)
            assert 0.2 < (out - h).var().item() < 0.8
            h = out
    assert 2.0 < h.var().item() < 6.0


def test_net_uses_only_its_generator():
    state = torch.get_rng_state()
    a, b = SyntheticNet(CFG), SyntheticNet(CFG)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = SyntheticNet(CFG, torch.Generator().manual_seed(123))
    assert not torch.equal(a.blocks[0].w1.weight, c.blocks[0].w1.weight)
    d = SyntheticNet(SyntheticConfig(base_seed=1))
    assert not torch.equal(a.blocks[0].w1.weight, d.blocks[0].w1.weight)


def test_config_validation():
    with pytest.raises(FlexLoRAError, match="activation"):
        SyntheticConfig(activation="swish2")
    with pytest.raises(FlexLoRAError, match="blocks"):
        SyntheticConfig(blocks=0)
    three = SyntheticConfig(blocks=2, matrices_per_block=3, activation="relu")
    assert three.matrix_names()[:3] == ["blocks.0.w1", "blocks.0.w2", "blocks.0.w3"]
    assert SyntheticNet(three)(torch.randn(3, 64)).shape == (3, 64)


# ---------------------------------------------------------------------------------------------- ranks
@pytest.mark.parametrize(
    ("n", "r0", "max_rank"), [(12, 8, 16), (12, 8, 32), (8, 2, 3), (3, 4, 8), (20, 1, 4), (9, 5, 5), (48, 4, 16)]
)
def test_target_ranks_sum_and_bounds(n, r0, max_rank):
    for seed in range(200):
        ranks = draw_target_ranks(n, r0, max_rank, seed)
        assert len(ranks) == n and sum(ranks) == n * r0
        assert all(1 <= r <= max_rank for r in ranks), ranks


@pytest.mark.parametrize("max_rank", [16, 32])
def test_target_ranks_are_heterogeneous(max_rank):
    for seed in range(200):
        ranks = draw_target_ranks(12, 8, max_rank, seed)
        assert sum(r <= 2 for r in ranks) >= 2, ranks
        assert sum(r >= 12 for r in ranks) >= 2, ranks
    assert len({tuple(draw_target_ranks(12, 8, max_rank, s)) for s in range(50)}) == 50


def test_target_ranks_reject_bad_budget():
    with pytest.raises(FlexLoRAError):
        draw_target_ranks(12, 9, 8, 0)
    with pytest.raises(FlexLoRAError):
        draw_target_ranks(12, 0, 8, 0)


# ---------------------------------------------------------------------------------------------- teacher
@pytest.mark.parametrize("spectrum", ["flat", "decaying"])
@pytest.mark.parametrize("max_rank", [16, 32])
def test_updates_have_target_rank_equal_norm_and_spectrum(net, spectrum, max_rank):
    teacher = draw_teacher(CFG, 12, 8, max_rank, spectrum, seed=3, base=net)
    assert list(teacher.updates) == CFG.matrix_names() == list(teacher.target_ranks)
    assert sum(teacher.target_ranks.values()) == 96
    expected_norm = DEFAULT_UPDATE_SCALE * math.sqrt(64)  # relative to the orthogonal base's ||W||_F = sqrt(d)
    for name, update in teacher.updates.items():
        rank = teacher.target_ranks[name]
        assert update.dtype == torch.float32 and update.shape == (64, 64)
        assert torch.linalg.matrix_rank(update).item() == rank
        assert torch.linalg.matrix_norm(update).item() == pytest.approx(expected_norm, rel=1e-5)
        s = torch.linalg.svdvals(update.double())[:rank]
        if spectrum == "flat":
            torch.testing.assert_close(s, s[0].expand(rank), rtol=1e-4, atol=0)
        else:
            ratios = s[1:] / s[:-1]
            torch.testing.assert_close(ratios, torch.full_like(ratios, DEFAULT_DECAY), rtol=1e-3, atol=0)


def test_teacher_moves_output_by_documented_amount(net):
    """DEFAULT_UPDATE_SCALE's comment promises a relative output change of 0.73-0.81 (0.77 on average)."""
    changes = []
    for seed in range(5):
        for spectrum in ("flat", "decaying"):
            teacher = draw_teacher(CFG, 12, 8, 16, spectrum, seed, base=net)
            changes.append(relative_output_change(teacher.apply_to(net), net, 64))
    assert all(0.68 < c < 0.85 for c in changes), changes
    assert sum(changes) / len(changes) == pytest.approx(0.77, abs=0.04)


def test_apply_to_copies_and_adds(net):
    before = {n: p.clone() for n, p in net.named_parameters()}
    teacher = draw_teacher(CFG, 12, 8, 16, "flat", 0, base=net)
    moved = teacher.apply_to(net)
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    for name, update in teacher.updates.items():
        torch.testing.assert_close(moved.get_submodule(name).weight, before[f"{name}.weight"] + update)
    assert not any(p.requires_grad for p in moved.parameters()) and not moved.training


def test_teacher_determinism_and_spec(net):
    a = draw_teacher(CFG, 12, 8, 16, "decaying", 7, base=net)
    b = TeacherSpec(n_matrices=12, r0=8, max_rank=16, spectrum="decaying", seed=7).draw(CFG)
    assert a.target_ranks == b.target_ranks and a.spec == b.spec
    assert all(torch.equal(a.updates[n], b.updates[n]) for n in a.updates)
    c = draw_teacher(CFG, 12, 8, 16, "decaying", 8, base=net)
    assert not torch.equal(a.updates["blocks.0.w1"], c.updates["blocks.0.w1"])


def test_teacher_validation():
    with pytest.raises(FlexLoRAError, match="n_matrices"):
        draw_teacher(CFG, 10, 8, 16)
    with pytest.raises(FlexLoRAError, match="spectrum"):
        draw_teacher(CFG, 12, 8, 16, "steep")  # type: ignore[arg-type]
    with pytest.raises(FlexLoRAError, match="max_rank"):
        draw_teacher(CFG, 12, 8, 65)


# ---------------------------------------------------------------------------------------------- data
def test_regression_data(net):
    teacher_net = draw_teacher(CFG, 12, 8, 16, "flat", 0, base=net).apply_to(net)
    data = make_regression_data(teacher_net, 512, 256, 64, seed=1, base_net=net)
    again = make_regression_data(teacher_net, 512, 256, 64, seed=1, base_net=net)
    other = make_regression_data(teacher_net, 512, 256, 64, seed=2, base_net=net)
    x, y = data["train"].tensors
    assert x.shape == (512, 64) and y.shape == (512, 64) and x.dtype == y.dtype == torch.float32
    assert data["val"].tensors[0].shape == (256, 64) and not y.requires_grad
    for split in ("train", "val"):
        assert all(torch.equal(a, b) for a, b in zip(data[split].tensors, again[split].tensors, strict=True))
        assert not torch.equal(data[split].tensors[0], other[split].tensors[0])
    assert not torch.equal(data["train"].tensors[0][:256], data["val"].tensors[0])
    with torch.no_grad():
        torch.testing.assert_close(y, teacher_net(x))
        untrained = regression_metrics(net(x), y, data["train"].initial_mse)
    assert untrained["relative_mse"].item() == pytest.approx(1.0, rel=1e-5)
    assert untrained["mse"].item() == pytest.approx(data["train"].initial_mse, rel=1e-5)
    assert math.isnan(make_regression_data(teacher_net, 8, 8, 64, seed=1)["val"].initial_mse)


# ---------------------------------------------------------------------------------------------- metrics
def test_rank_spearman():
    target = {"a": 1, "b": 5, "c": 3, "d": 12, "e": 2}
    final = {"a": 2, "b": 4, "c": 4, "d": 16, "e": 1, "extra": 9}
    expected = stats.spearmanr([2, 4, 4, 16, 1], [1, 5, 3, 12, 2]).statistic
    assert rank_spearman(final, target) == pytest.approx(expected)
    assert rank_spearman({k: v for k, v in target.items()}, target) == pytest.approx(1.0)
    assert rank_spearman(dict.fromkeys(target, 8), target) == 0.0  # static LoRA: no ordering information
    assert rank_spearman(final, dict.fromkeys(target, 8)) == 0.0
    with pytest.raises(FlexLoRAError, match="lacks"):
        rank_spearman({"a": 1}, target)


def test_captured_energy_cases():
    teacher = {"a": torch.tensor([[3.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([[0.0, 4.0], [0.0, 0.0]])}
    assert captured_energy(teacher, teacher) == 1.0
    assert captured_energy({k: torch.zeros_like(v) for k, v in teacher.items()}, teacher) == 0.0
    assert captured_energy({k: -v for k, v in teacher.items()}, teacher) == 0.0  # worse than nothing clips to 0
    # a exact (residual 0), b = 1 instead of 4 (residual 9); total energy 9 + 16 = 25
    learned = {"a": teacher["a"].clone(), "b": torch.tensor([[0.0, 1.0], [0.0, 0.0]])}
    assert captured_energy(learned, teacher) == pytest.approx(1 - 9 / 25)
    assert per_matrix_energy(learned, teacher) == pytest.approx({"a": 1.0, "b": 1 - 9 / 16})
    with pytest.raises(FlexLoRAError, match="different matrices"):
        captured_energy({"a": teacher["a"]}, teacher)
    with pytest.raises(FlexLoRAError, match="shape"):
        captured_energy({"a": teacher["a"], "b": torch.zeros(3, 2)}, teacher)


# ---------------------------------------------------------------------------------------------- learnability
class _LowRank(nn.Module):
    """A plain trainable ``B A`` update on a frozen linear (B = 0 at start, so the student starts at the net)."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / base.in_features**0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T) @ self.B.T

    def delta_weight(self) -> torch.Tensor:
        return self.B @ self.A


def test_student_with_true_ranks_fits_teacher(net):
    torch.set_num_threads(1)
    teacher = draw_teacher(CFG, 12, 8, 16, "flat", seed=0, base=net)
    data = make_regression_data(teacher.apply_to(net), 4096, 1024, 64, seed=0, base_net=net)
    student, gen = copy.deepcopy(net), torch.Generator().manual_seed(0)
    adapters = {}
    for name, rank in teacher.target_ranks.items():
        parent, attr = name.rsplit(".", 1)
        adapters[name] = _LowRank(student.get_submodule(name), rank, gen)
        setattr(student.get_submodule(parent), attr, adapters[name])
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    x, y = data["train"].tensors
    for _ in range(200):
        idx = torch.randint(0, len(x), (256,), generator=gen)
        loss = F.mse_loss(student(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xv, yv = data["val"].tensors
    with torch.no_grad():
        metrics = regression_metrics(student(xv), yv, data["val"].initial_mse)
    assert metrics["relative_mse"].item() < 0.1  # measured ~0.02
    wrapped = {f"model.{k}": v for k, v in adapters.items()}  # prefixes are stripped against the teacher names
    assert captured_energy(learned_updates(wrapped, teacher.matrix_names), teacher.updates) > 0.6  # measured ~0.8
