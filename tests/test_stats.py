"""The vectorised bootstrap must score every resample exactly as official_metric would, and be reproducible."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import rankdata

from flexlora.errors import FlexLoRAError
from flexlora.metrics import METRICS, official_metric
from flexlora.stats import _rank_rows, combine_seeds, paired_bootstrap, resampled_metric

REGRESSION = ("pearson", "spearman")


def _data(metric: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two methods' predictions; regression values carry ties, as STS-B does."""
    rng = np.random.default_rng(seed)
    if metric in REGRESSION:
        y = np.round(rng.uniform(0, 5, n) * 5) / 5
        return y, np.round(y + rng.normal(0, 0.7, n), 1), np.round(y + rng.normal(0, 1.0, n), 1)
    y = (rng.random(n) < 0.35).astype(np.int64)
    return y, np.where(rng.random(n) < 0.8, y, 1 - y), np.where(rng.random(n) < 0.7, y, 1 - y)


def _row_by_row(metric: str, y: np.ndarray, p: np.ndarray, idx: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # official_metric must stay silent on degenerate rows too
        return np.array([official_metric(metric, y[row], p[row]) for row in idx])


def _constructed_rows(metric: str, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Rows that hit the degenerate branches: empty confusion cells, constant labels / predictions."""
    n = y.size
    rows = [np.zeros(n, dtype=np.int64), np.full(n, n - 1)]  # one example drawn n times: everything constant
    if metric in REGRESSION:
        # constant labels with varying predictions, and the reverse
        same_y = np.flatnonzero(y == y[0])
        rows.append(np.resize(np.r_[same_y, same_y], n))
        same_p = np.flatnonzero(p == p[0])
        rows.append(np.resize(same_p, n))
        rows.append(np.resize([0, 1], n))  # two examples only
    else:
        for cell_y in (0, 1):
            for cell_p in (0, 1):
                cell = np.flatnonzero((y == cell_y) & (p == cell_p))
                if cell.size:
                    rows.append(np.resize(cell, n))  # a single confusion cell: three counts are zero
        rows.append(np.resize(np.flatnonzero(y == 0), n))  # no positive label, some predicted
        rows.append(np.resize(np.flatnonzero(p == 0), n))  # never predicts 1
    return np.stack(rows)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n", [7, 120])
def test_rows_equal_official_metric(metric, n):
    y, p, _ = _data(metric, n, seed=n)
    idx = np.random.default_rng(1).integers(0, n, size=(200, n))
    idx = np.concatenate([idx, _constructed_rows(metric, y, p)])
    got = resampled_metric(metric, y, p, idx)
    expected = _row_by_row(metric, y, p, idx)
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-12)
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    if metric in REGRESSION:
        assert np.isnan(got[200:202]).all()  # the constant rows


def test_pearson_rows_with_near_constant_draws_and_large_offsets():
    """One-pass sums lose accuracy on near-constant rows: those are recomputed, so they still match scipy."""
    rng = np.random.default_rng(5)
    n = 40
    y = 1e6 + np.round(rng.uniform(0, 5, n), 1)
    p = np.r_[rng.normal(0, 1e-6, 20), np.full(20, 1000.0)]  # rows drawn from the first half: spread 1e-6 at -500
    idx = np.concatenate([rng.integers(0, n, size=(100, n)), rng.integers(0, 20, size=(50, n))])
    got = resampled_metric("pearson", y, p, idx)
    np.testing.assert_allclose(got, _row_by_row("pearson", y, p, idx), rtol=1e-9, atol=1e-12)


def test_non_finite_scores_make_only_their_rows_nan():
    y, p, _ = _data("pearson", 30)
    p = p.copy()
    p[4] = np.inf
    idx = np.random.default_rng(0).integers(0, 30, size=(60, 30))
    for metric in REGRESSION:
        got = resampled_metric(metric, y, p, idx)
        drew = (idx == 4).any(axis=1)
        assert np.isnan(got[drew]).all()
        np.testing.assert_allclose(got[~drew], _row_by_row(metric, y, p, idx[~drew]), rtol=1e-11)


def test_counted_ranks_equal_rankdata():
    rng = np.random.default_rng(2)
    values = np.round(rng.normal(size=50), 1)
    _, groups = np.unique(values, return_inverse=True)
    idx = rng.integers(0, 50, size=(30, 50))
    doubled, sum_sq, constant = _rank_rows(groups.astype(np.int32), int(groups.max()) + 1, idx)
    reference = rankdata(values[idx], axis=1)
    np.testing.assert_array_equal(doubled / 2, reference)
    np.testing.assert_array_equal(sum_sq, (doubled**2).sum(axis=1))
    assert not constant.any()


@pytest.mark.parametrize("metric", METRICS)
def test_identical_methods_give_zero(metric):
    y, p, _ = _data(metric, 80)
    result = paired_bootstrap(metric, y, p, p.copy(), n_resamples=500)
    assert result.diff == 0.0 and result.low == 0.0 and result.high == 0.0 and result.p_value == 1.0
    assert result.n == 80 and result.n_resamples == 500 and result.nan_resamples == 0
    assert np.all(result.resamples == 0.0)


@pytest.mark.parametrize("metric", METRICS)
def test_a_clearly_better_method_has_an_interval_above_zero(metric):
    y, _, worse = _data(metric, 300)
    # classification: right on every example, in particular wherever the other is wrong
    better = y + np.random.default_rng(9).normal(0, 0.1, y.size) if metric in REGRESSION else y.copy()
    result = paired_bootstrap(metric, y, better, worse, n_resamples=2000, seed=3)
    assert result.diff > 0 and 0 < result.low < result.diff < result.high
    assert result.p_value < 0.01
    reverse = paired_bootstrap(metric, y, worse, better, n_resamples=2000, seed=3)
    assert reverse.diff == -result.diff and reverse.high < 0
    np.testing.assert_allclose(reverse.resamples, -result.resamples, atol=1e-12)


@pytest.mark.parametrize("metric", METRICS)
def test_same_seed_same_result_and_chunking_does_not_matter(metric):
    y, a, b = _data(metric, 90)
    first = paired_bootstrap(metric, y, a, b, n_resamples=300, seed=11)
    again = paired_bootstrap(metric, y, a, b, n_resamples=300, seed=11)
    assert first == again and np.array_equal(first.resamples, again.resamples)
    for chunk in (1, 7, 64, 300, 10_000):
        chunked = paired_bootstrap(metric, y, a, b, n_resamples=300, seed=11, chunk=chunk)
        assert np.array_equal(chunked.resamples, first.resamples, equal_nan=True), chunk
        assert chunked == first
    other = paired_bootstrap(metric, y, a, b, n_resamples=300, seed=12)
    assert not np.array_equal(other.resamples, first.resamples)


def test_interval_and_p_value_follow_their_definitions():
    y, a, b = _data("accuracy", 60)
    result = paired_bootstrap("accuracy", y, a, b, n_resamples=1000, seed=4)
    assert result.diff == official_metric("accuracy", y, a) - official_metric("accuracy", y, b)
    low, high = np.percentile(result.resamples, [2.5, 97.5])
    assert (result.low, result.high) == (low, high)
    against = np.mean(result.resamples <= 0) if result.diff > 0 else np.mean(result.resamples >= 0)
    assert result.p_value == min(1.0, 2 * against)
    assert "resamples" not in result.to_dict() and result.to_dict()["n"] == 60


def test_nan_resamples_are_dropped_and_counted():
    y = np.array([1.0, 1.0, 1.0, 2.0, 3.0])  # small and tied: many resamples have constant labels
    a, b = np.array([1.1, 0.9, 1.3, 2.2, 2.7]), np.array([1.4, 1.0, 0.7, 2.9, 2.1])
    for metric in REGRESSION:
        result = paired_bootstrap(metric, y, a, b, n_resamples=2000, seed=0)
        nan = np.isnan(result.resamples)
        assert result.nan_resamples == nan.sum() > 0
        assert (result.low, result.high) == tuple(np.percentile(result.resamples[~nan], [2.5, 97.5]))


def test_keep_resamples_false_and_bad_input():
    y, a, b = _data("mcc", 40)
    assert paired_bootstrap("mcc", y, a, b, n_resamples=50, keep_resamples=False).resamples is None
    with pytest.raises(FlexLoRAError, match="binary"):
        paired_bootstrap("f1", np.r_[y, 2], np.r_[a, 1], np.r_[b, 0], n_resamples=10)
    with pytest.raises(FlexLoRAError, match="length"):
        paired_bootstrap("accuracy", y, a[:-1], b, n_resamples=10)
    with pytest.raises(FlexLoRAError, match="unknown metric"):
        paired_bootstrap("auc", y, a, b, n_resamples=10)
    with pytest.raises(FlexLoRAError):
        paired_bootstrap("accuracy", y, a, b, n_resamples=0)


def test_combine_seeds_agree_count_with_one_disagreeing_seed():
    rng = np.random.default_rng(8)
    per_seed = []
    for s, accuracy_b in enumerate((0.70, 0.72, 0.90)):  # a is 80 % accurate; seed 2's b beats it
        y = rng.integers(0, 2, 400 + 50 * s)  # evaluation sets may differ in size
        a = np.where(rng.random(y.size) < 0.8, y, 1 - y)
        b = np.where(rng.random(y.size) < accuracy_b, y, 1 - y)
        per_seed.append((y, a, b))
    result = combine_seeds(per_seed, "accuracy", n_resamples=1000, seed=1)
    diffs = [official_metric("accuracy", y, a) - official_metric("accuracy", y, b) for y, a, b in per_seed]
    assert diffs[0] > 0 and diffs[1] > 0 and diffs[2] < 0
    assert result.n_seeds == 3 and result.agree == (2 if np.mean(diffs) > 0 else 1)
    assert result.mean_diff == pytest.approx(np.mean(diffs), abs=1e-15)
    assert [r.diff for r in result.per_seed] == pytest.approx(diffs, abs=1e-15)
    np.testing.assert_allclose(result.resamples, np.mean([r.resamples for r in result.per_seed], axis=0))
    assert (result.low, result.high) == tuple(np.percentile(result.resamples, [2.5, 97.5]))
    assert result.low < result.mean_diff < result.high
    again = combine_seeds(per_seed, "accuracy", n_resamples=1000, seed=1)
    assert again == result and np.array_equal(again.resamples, result.resamples)
    slim = combine_seeds(per_seed, "accuracy", n_resamples=1000, seed=1, keep_resamples=False)
    assert slim.resamples is None and all(r.resamples is None for r in slim.per_seed) and slim.low == result.low
    assert len(slim.to_dict()["per_seed"]) == 3
    with pytest.raises(FlexLoRAError):
        combine_seeds([], "accuracy")
