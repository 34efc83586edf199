"""Official GLUE metrics, computed exactly as the GLUE scorer does (scikit-learn / scipy) on final predictions.

Why not the torchmetrics values logged during training: those are running estimates that differ from the official
definitions in degenerate cases (torchmetrics' ``BinaryMatthewsCorrCoef`` adds an epsilon and reports a small
positive MCC for constant predictions where scikit-learn reports 0.0). Numbers that go into tables come from here.

Degenerate cases, decided explicitly rather than left to library warnings:

* ``pearson`` / ``spearman``: NaN when the predictions or the labels are constant (the coefficient is undefined),
  also with fewer than two examples or a NaN / inf score; never 0 and never an epsilon artefact. Near-constant
  but not constant inputs keep scipy's value (scipy only warns there).
* ``mcc``: 0.0 when either side is constant, as scikit-learn's ``matthews_corrcoef`` returns.
* ``f1`` (binary, positive class 1, as GLUE MRPC / QQP): scikit-learn's ``f1_score`` with its default
  ``zero_division="warn"`` returns 0.0 when there are no true positives, including the case where class 1 is
  neither present in the labels nor ever predicted (F1 is 0/0 there); we keep that value and silence the warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
from scipy import stats
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from flexlora.errors import FlexLoRAError

CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS

_SCIPY_WARNINGS = (stats.ConstantInputWarning, stats.NearConstantInputWarning)


def _as_pair(labels, predictions) -> tuple[np.ndarray, np.ndarray]:
    """1-D numpy views of both inputs, checked to be non-empty and of equal length (sklearn's errors are vaguer)."""
    y, p = np.asarray(labels).reshape(-1), np.asarray(predictions).reshape(-1)
    if y.shape != p.shape:
        raise FlexLoRAError(f"labels and predictions differ in length: {y.size} vs {p.size}")
    if y.size == 0:
        raise FlexLoRAError("no examples to score: labels and predictions are empty")
    return y, p


def is_constant(values: np.ndarray) -> bool:
    """Exact constancy, the test scipy applies before declaring a correlation undefined."""
    return bool(values.size == 0 or np.all(values == values.flat[0]))


def official_metric(name: str, labels, predictions) -> float:
    """The official value of one GLUE metric on final predictions (class ids, or scores for regression)."""
    y, p = _as_pair(labels, predictions)
    if name == "accuracy":
        return float(accuracy_score(y, p))
    if name == "f1":
        with warnings.catch_warnings():
            # 0/0 F1 (no positives anywhere): sklearn's default returns 0.0 and warns; the value is what we keep
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            return float(f1_score(y, p))
    if name == "mcc":
        with warnings.catch_warnings():
            # a single class in labels and predictions: confusion_matrix warns about its 1x1 shape; MCC is 0.0
            warnings.filterwarnings("ignore", message=".*single label was found.*", category=UserWarning)
            return float(matthews_corrcoef(y, p))
    if name in REGRESSION_METRICS:
        y, p = y.astype(np.float64), p.astype(np.float64)
        # undefined: fewer than two points, a constant side, or a diverged run's NaN / inf scores
        if y.size < 2 or is_constant(y) or is_constant(p) or not (np.isfinite(y).all() and np.isfinite(p).all()):
            return float("nan")
        with warnings.catch_warnings():
            # near-constant inputs: scipy still computes the coefficient and only warns about its accuracy
            for category in _SCIPY_WARNINGS:
                warnings.simplefilter("ignore", category)
            result = stats.pearsonr(y, p) if name == "pearson" else stats.spearmanr(y, p)
        return float(result.statistic)
    raise FlexLoRAError(f"unknown metric {name!r}: expected one of {', '.join(METRICS)}")


def official_metrics(names: Iterable[str], labels, predictions) -> dict[str, float]:
    """Several official metrics on the same predictions, keyed by name in the order given."""
    return {name: official_metric(name, labels, predictions) for name in names}


NEAR_CONSTANT_RATIO = 1e-3  # regression: prediction std below this share of the labels' std is a collapse


def is_degenerate(predictions, regression: bool, labels=None) -> bool:
    """True when the predictions carry no signal, the usual sign of a collapsed run.

    Classes: every prediction the same (e.g. CoLA's majority class). Regression: constant up to a relative
    tolerance (range <= 1e-12 * max(1, |mean|): a collapsed regressor still jitters in the last bits), or, with
    ``labels``, near-constant: the predictions' std below ``NEAR_CONSTANT_RATIO`` of the labels' std (a collapsed
    STS-B run had std 0.00025 against the labels' 1.5 and still got a finite, meaningless Pearson).
    """
    return _degenerate_reason(predictions, regression, labels) != ""


def _degenerate_reason(predictions, regression: bool, labels=None) -> str:
    p = np.asarray(predictions).reshape(-1)
    if p.size == 0:
        raise FlexLoRAError("no predictions to check")
    if not regression:
        return "constant" if is_constant(p) else ""
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        return ""
    if p.max() - p.min() <= 1e-12 * max(1.0, abs(float(p.mean()))):
        return "constant"
    if labels is not None:
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        if y.size > 1 and np.isfinite(y).all() and float(p.std()) < NEAR_CONSTANT_RATIO * float(y.std()):
            return "near_constant"
    return ""


def _format_class(value) -> str:
    """Class ids as plain integers when they are integral (1 rather than 1.0 or np.int64(1))."""
    v = np.asarray(value).item()
    return str(int(v)) if isinstance(v, (int, float, np.integer, np.floating)) and float(v).is_integer() else str(v)


def describe_degenerate(predictions, regression: bool, labels=None) -> str:
    """A console line naming the collapse, or "" when the predictions vary (so callers can ``if line := ...``).

    With ``labels`` the line also says how often that class / value is right, which tells a majority-class
    collapse apart from a minority one, and (regression) whether near-constant predictions are a collapse.
    """
    reason = _degenerate_reason(predictions, regression, labels)
    if not reason:
        return ""
    p = np.asarray(predictions).reshape(-1)
    if regression:
        if reason == "near_constant":
            y = np.asarray(labels, dtype=np.float64).reshape(-1)
            p = p.astype(np.float64)
            return (f"near-constant predictions: std {p.std():.3g} is below {NEAR_CONSTANT_RATIO:g} of the labels' "
                    f"std {y.std():.3g} (mean prediction {p.mean():.6g}); the correlations measure noise")
        line = f"constant predictions: every example predicted {float(np.mean(p)):.6g}"
        if labels is not None:
            y = np.asarray(labels, dtype=np.float64).reshape(-1)
            line += f" (labels range {y.min():.6g} .. {y.max():.6g}); pearson and spearman are undefined (NaN)"
        return line
    value = p[0]
    line = f"constant predictions: every example predicted class {_format_class(value)}"
    if labels is not None:
        y = np.asarray(labels).reshape(-1)
        if y.size:
            share = float(np.mean(y == value))
            majority = share >= max(float(np.mean(y == c)) for c in np.unique(y))
            line += f" ({'the majority' if majority else 'a minority'} class, {100 * share:.1f} % of labels)"
    return line
