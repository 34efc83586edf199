"""official_metric must equal scikit-learn / scipy (the GLUE scorer) on the same predictions, degenerate cases too."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from flexlora.errors import FlexLoRAError
from flexlora.metrics import describe_degenerate, is_degenerate, official_metric, official_metrics


def _sklearn(name: str, y: np.ndarray, p: np.ndarray) -> float:
    """The reference value, with the library's own warnings silenced (the value is what we compare)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "accuracy":
            return float(accuracy_score(y, p))
        if name == "f1":
            return float(f1_score(y, p))
        if name == "mcc":
            return float(matthews_corrcoef(y, p))
        if name == "pearson":
            return float(stats.pearsonr(y, p).statistic)
        return float(stats.spearmanr(y, p).statistic)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    """Every test here also checks that no warning leaks out of flexlora.metrics."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("seed", range(5))
def test_random_predictions_equal_the_libraries(seed):
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    for name in ("accuracy", "f1", "mcc"):
        assert official_metric(name, y, p) == _sklearn(name, y, p)
    three = rng.integers(0, 3, 300), rng.integers(0, 3, 300)  # MNLI-style accuracy and multiclass MCC
    assert official_metric("accuracy", *three) == _sklearn("accuracy", *three)
    assert official_metric("mcc", *three) == _sklearn("mcc", *three)
    ys, ps = rng.uniform(0, 5, 200), rng.normal(2.5, 1.0, 200)
    for name in ("pearson", "spearman"):
        assert official_metric(name, ys, ps) == _sklearn(name, ys, ps)


def test_constant_predictions_give_mcc_zero_unlike_torchmetrics():
    """The CoLA report: a majority-class run must score MCC 0.0 (sklearn), not torchmetrics' epsilon artefact."""
    labels = np.r_[np.zeros(30, dtype=np.int64), np.ones(70, dtype=np.int64)]
    ones = np.ones(100, dtype=np.int64)
    assert official_metric("mcc", labels, ones) == _sklearn("mcc", labels, ones) == 0.0
    assert official_metric("mcc", labels, 1 - ones) == 0.0
    assert official_metric("accuracy", labels, ones) == 0.7
    assert official_metric("f1", labels, ones) == _sklearn("f1", labels, ones)
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.classification")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(tm.BinaryMatthewsCorrCoef()(torch.from_numpy(ones), torch.from_numpy(labels)))
    assert value > 0.01, f"torchmetrics now reports {value} for constant predictions; update the module docstring"


@pytest.mark.parametrize("cls", [0, 1])
def test_a_single_class_in_the_labels(cls):
    rng = np.random.default_rng(cls)
    y = np.full(50, cls)
    for p in (rng.integers(0, 2, 50), np.full(50, cls), np.full(50, 1 - cls)):
        for name in ("accuracy", "f1", "mcc"):
            assert official_metric(name, y, p) == _sklearn(name, y, p), (name, p)
        assert official_metric("mcc", y, p) == 0.0


def test_f1_without_any_positive_is_sklearn_default_zero():
    """No class 1 in labels nor predictions: F1 is 0/0; sklearn's default zero_division returns 0.0 (and warns)."""
    y = p = np.zeros(20, dtype=np.int64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference = f1_score(y, p)
    assert reference == 0.0 and caught, "sklearn changed its default for 0/0 F1: revisit flexlora.metrics"
    assert official_metric("f1", y, p) == 0.0


def test_ties_in_regression_values():
    rng = np.random.default_rng(3)
    y = np.round(rng.uniform(0, 5, 400) * 5) / 5  # STS-B labels come in steps of 0.2
    p = np.round(y + rng.normal(0, 0.8, 400), 1)
    assert len(np.unique(p)) < 200
    for name in ("pearson", "spearman"):
        assert official_metric(name, y, p) == _sklearn(name, y, p)


def test_constant_regression_inputs_are_nan():
    y = np.linspace(0, 5, 30)
    constant = np.full(30, 2.5)
    for name in ("pearson", "spearman"):
        assert math.isnan(official_metric(name, y, constant))
        assert math.isnan(official_metric(name, constant, y))
        assert math.isnan(official_metric(name, constant, constant))
        assert _same(official_metric(name, y, constant), _sklearn(name, y, constant))  # scipy agrees (and warns)
        assert math.isnan(official_metric(name, y[:1], y[:1]))
        assert math.isnan(official_metric(name, y, np.r_[y[:-1], np.nan]))


def test_near_constant_predictions_keep_scipys_value_silently():
    y = np.linspace(0, 5, 30)
    p = 1e9 + np.r_[np.zeros(29), 1e-6]  # scipy warns NearConstantInput but still computes a coefficient
    assert official_metric("pearson", y, p) == _sklearn("pearson", y, p)


def test_official_metrics_and_errors():
    y, p = np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])
    out = official_metrics(["mcc", "accuracy", "f1"], y, p)
    assert list(out) == ["mcc", "accuracy", "f1"]
    assert out["accuracy"] == 0.75 and all(isinstance(v, float) for v in out.values())
    with pytest.raises(FlexLoRAError, match="unknown metric"):
        official_metric("auc", y, p)
    with pytest.raises(FlexLoRAError, match="length"):
        official_metric("accuracy", y, p[:3])
    with pytest.raises(FlexLoRAError, match="empty"):
        official_metric("accuracy", [], [])


def test_degenerate_predictions_are_detected_and_described():
    labels = np.r_[np.zeros(3, dtype=np.int64), np.ones(7, dtype=np.int64)]
    assert is_degenerate(np.ones(10, dtype=np.int64), regression=False)
    assert not is_degenerate(labels, regression=False)
    assert describe_degenerate(labels, regression=False) == ""
    line = describe_degenerate(np.ones(10, dtype=np.int64), regression=False)
    assert line == "constant predictions: every example predicted class 1"
    with_labels = describe_degenerate(np.zeros(10), regression=False, labels=labels)
    assert "class 0" in with_labels and "minority" in with_labels and "30.0 %" in with_labels
    jitter = 3.2 + np.r_[0.0, 4e-16, -4e-16]
    assert is_degenerate(jitter, regression=True)
    assert is_degenerate(np.full(5, 1e6) + np.r_[0, 1e-7, 0, 0, 0], regression=True)  # relative to |mean|
    assert not is_degenerate(np.array([0.0, 1e-9]), regression=True)
    assert not is_degenerate(np.array([1.0, np.nan]), regression=True)
    assert describe_degenerate(jitter, regression=True).startswith("constant predictions: every example predicted 3.2")
    with pytest.raises(FlexLoRAError):
        is_degenerate([], regression=False)


def test_no_warning_leaks_in_any_degenerate_case():
    cases = [(np.zeros(9, dtype=np.int64), np.zeros(9, dtype=np.int64)), (np.ones(9), np.zeros(9)),
             (np.r_[0, 1, 1], np.ones(3)), (np.full(9, 2.0), np.arange(9.0)), (np.arange(9.0), np.full(9, 2.0))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for y, p in cases:
            regression = y.dtype.kind == "f" and not np.isin(y, (0, 1)).all()
            names = ("pearson", "spearman") if regression else ("accuracy", "f1", "mcc", "pearson", "spearman")
            official_metrics(names, y, p)
            describe_degenerate(p, regression=regression, labels=y)
