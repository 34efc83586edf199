"""Paired bootstrap comparisons of two methods evaluated on the same examples, per seed and across seeds.

Why paired: both methods see the same dev examples, so resampling them with the same indices cancels the
example-difficulty variance that an unpaired comparison would charge to the methods.

Why vectorised: every resample recomputes the metric, and 10,000 resamples of MNLI (n = 10k) or of STS-B Spearman
row by row through scikit-learn / scipy take minutes. Here a chunk of resamples is an (rows, n) index matrix and the
metric is computed for all rows at once, from the same definitions as :mod:`flexlora.metrics` (equal to
``official_metric`` applied to each resample, including its degenerate cases):

* accuracy: share of correct examples per row;
* f1 / mcc (binary, labels and predictions in {0, 1}): from per-row confusion counts; F1 is 0.0 when there are no
  true positives (scikit-learn's ``zero_division`` default), MCC is 0.0 when a margin is empty;
* pearson: from per-row sums of (globally centred) values, squares and cross products; rows where that one-pass
  formula would lose accuracy (near-constant draws) are recomputed with centred two-pass sums;
* spearman: Pearson of the average ranks of each row, ranks obtained by counting the tied groups drawn in the
  row (equal to ``scipy.stats.rankdata(rows, axis=1)``, without sorting each row);
* pearson / spearman rows whose labels or predictions are constant (or drew a NaN / inf score) are NaN: dropped
  from the interval and counted in ``nan_resamples``.

Results are bit-identical for any ``chunk``: rows are drawn in order from one generator and every per-row
reduction is independent of how many rows are computed together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np

from flexlora.errors import FlexLoRAError
from flexlora.metrics import METRICS, official_metric

#: index entries drawn per chunk when ``chunk`` is not given: 4 MB of int32 indices plus a few working copies,
#: small enough to stay cache-friendly (larger chunks measured slower) and to bound memory for MNLI-sized n
_CHUNK_ELEMENTS = 1 << 20

RowMetric = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BootstrapResult:
    """metric(a) - metric(b) on one evaluation set, with its paired-bootstrap 95 % interval."""

    metric: str
    diff: float  # metric(a) - metric(b) on the full data (official values)
    low: float  # 2.5th percentile of the resampled differences (NaN resamples dropped)
    high: float  # 97.5th percentile
    p_value: float  # approximate two-sided p-value, see paired_bootstrap
    n: int  # evaluation examples
    n_resamples: int
    nan_resamples: int  # resamples where the metric was undefined for a or b (constant labels / predictions)
    resamples: np.ndarray | None = field(default=None, repr=False, compare=False)  # differences, NaN kept

    def to_dict(self) -> dict[str, float | int | str]:
        """JSON-friendly fields, without the resample array."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "resamples"}


@dataclass(frozen=True)
class SeedsResult:
    """The mean over seeds of metric(a) - metric(b), with a hierarchical paired-bootstrap 95 % interval."""

    metric: str
    mean_diff: float  # mean over seeds of the full-data differences
    low: float
    high: float
    p_value: float  # same approximation as BootstrapResult.p_value, on the seed-averaged resamples
    agree: int  # seeds whose full-data difference has the sign of mean_diff
    n_seeds: int
    n_resamples: int
    nan_resamples: int  # resamples where any seed's difference was undefined
    per_seed: tuple[BootstrapResult, ...] = field(repr=False)
    resamples: np.ndarray | None = field(default=None, repr=False, compare=False)  # seed-averaged differences

    def to_dict(self) -> dict:
        """JSON-friendly fields: per-seed results as dicts, no resample arrays."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("resamples", "per_seed")}
        out["per_seed"] = [r.to_dict() for r in self.per_seed]
        return out


def _as_arrays(labels, *predictions) -> tuple[np.ndarray, list[np.ndarray]]:
    """1-D views of the labels and every prediction array, checked to be non-empty and aligned."""
    y = np.asarray(labels).reshape(-1)
    preds = [np.asarray(p).reshape(-1) for p in predictions]
    if y.size == 0:
        raise FlexLoRAError("no examples to resample: labels are empty")
    for p in preds:
        if p.shape != y.shape:
            raise FlexLoRAError(f"labels and predictions differ in length: {y.size} vs {p.size}")
    return y, preds


def _check_binary(metric: str, *arrays: np.ndarray) -> list[np.ndarray]:
    """F1 / MCC from counts assume GLUE's 0/1 classes; anything else would be silently mis-scored."""
    out = []
    for a in arrays:
        if not np.isin(a, (0, 1)).all():
            raise FlexLoRAError(f"{metric} bootstrap needs binary labels and predictions in {{0, 1}}, got "
                                f"values {np.unique(a)[:10].tolist()}")
        out.append(a.astype(bool))
    return out


def _pack_bits(flags: Sequence[np.ndarray]) -> np.ndarray:
    """Per-example boolean flags packed into one small unsigned code, bit b = flags[b]."""
    code = np.zeros(flags[0].shape, np.min_scalar_type((1 << len(flags)) - 1))
    for bit, flag in enumerate(flags):
        code |= flag.astype(code.dtype) << bit
    return code


def _bit_counts(code: np.ndarray, idx: np.ndarray, n_bits: int) -> np.ndarray:
    """(n_bits, c): per resample row, how many drawn examples have each bit of their code set.

    One gather of the packed code instead of one gather per flag: the gathers dominate the cost.
    """
    drawn = code[idx]
    scratch = np.empty_like(drawn)
    return np.stack([np.count_nonzero(np.bitwise_and(drawn, code.dtype.type(1 << bit), out=scratch), axis=-1)
                     for bit in range(n_bits)])


def _multiplicity(idx: np.ndarray, n: int) -> np.ndarray:
    """(c, n): how often each example is drawn in each row, so that per-row sums become one matrix product."""
    rows = idx.shape[0]
    flat = (idx + (np.arange(rows, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _pearson_rows(y: np.ndarray, p: np.ndarray, undefined: np.ndarray) -> np.ndarray:
    """Two-pass Pearson per row of y (c, n) against each p (k, c, n); NaN where ``undefined`` (k, c)."""
    yc = y - y.mean(axis=-1, keepdims=True)
    pc = p - p.mean(axis=-1, keepdims=True)
    syy = np.einsum("cn,cn->c", yc, yc)
    spp = np.einsum("kcn,kcn->kc", pc, pc)
    syp = np.einsum("cn,kcn->kc", yc, pc)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.clip(syp / np.sqrt(syy * spp), -1.0, 1.0)
    r[undefined] = np.nan
    return r


def _rank_rows(groups: np.ndarray, n_groups: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Twice the average ranks of each row of values[idx], from each example's tied-group id (ids sorted by value).

    A group drawn ``m`` times after ``below`` smaller draws holds ranks below+1 .. below+m, average
    below + (m + 1) / 2, so counting draws per group replaces sorting every row; doubling keeps every rank an
    integer, so the sums built from them are exact. Returns the doubled ranks (c, n), their per-row sum of squares
    and whether the row is constant (one group drawn n times).
    """
    rows, n = idx.shape
    flat = (groups[idx] + (np.arange(rows, dtype=np.int64) * n_groups)[:, None]).ravel()
    counts = np.bincount(flat, minlength=rows * n_groups)
    # every row draws n examples, so the running count restarts at row * n
    up_to = (np.cumsum(counts).reshape(rows, n_groups) - (np.arange(rows, dtype=np.int64) * n)[:, None]).ravel()
    doubled = (2 * up_to - counts + 1).astype(np.float64)  # 2 * (below + (m + 1) / 2)
    sum_sq = np.einsum("cg,cg->c", (counts * doubled).reshape(rows, n_groups), doubled.reshape(rows, n_groups))
    return np.take(doubled, flat).reshape(rows, n), sum_sq, counts.reshape(rows, n_groups).max(axis=1) == n


def _row_metric(metric: str, labels: np.ndarray, preds: Sequence[np.ndarray]) -> RowMetric:
    """A function idx (c, n) -> (k, c): the metric of each prediction array on every resample row.

    Per-example work (correctness flags, centring, tied groups) is done once here, not once per chunk.
    """
    n, k = labels.size, len(preds)
    if metric == "accuracy":
        code = _pack_bits([p == labels for p in preds])
        return lambda idx: _bit_counts(code, idx, k) / n
    if metric in ("f1", "mcc"):
        y, *ps = _check_binary(metric, labels, *preds)
        code = _pack_bits([y, *ps, *(y & p for p in ps)])  # bits: label, predictions, true positives

        def counts(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            c = _bit_counts(code, idx, 1 + 2 * k)
            return c[1 + k:], c[0], c[1:1 + k]  # tp (k, c), n_true (c,), n_pred (k, c)

        if metric == "f1":
            def f1(idx: np.ndarray) -> np.ndarray:
                tp, n_true, n_pred = counts(idx)
                denom = n_true + n_pred  # = 2 tp + fp + fn; 0 only when no positives at all -> 0.0 like sklearn
                return np.divide(2.0 * tp, denom, out=np.zeros(tp.shape), where=denom > 0)
            return f1

        def mcc(idx: np.ndarray) -> np.ndarray:
            tp, n_true, n_pred = counts(idx)
            tn = n - n_true - n_pred + tp
            fp, fn = n_pred - tp, n_true - tp
            numerator = (tp * tn - fp * fn).astype(np.float64)
            denom = (n_true * (n - n_true)).astype(np.float64) * (n_pred * (n - n_pred)).astype(np.float64)
            return np.divide(numerator, np.sqrt(denom), out=np.zeros(tp.shape), where=denom > 0)  # empty margin: 0
        return mcc

    y = labels.astype(np.float64)
    pf = np.stack([p.astype(np.float64) for p in preds])
    finite = np.isfinite(y) & np.isfinite(pf).all(axis=0)
    all_finite = bool(finite.all())

    def nonfinite(idx: np.ndarray) -> np.ndarray | bool:
        """Rows that drew a NaN / inf score: undefined, as in official_metric."""
        return False if all_finite else np.count_nonzero(~finite[idx], axis=-1) > 0

    def exact_pearson(idx: np.ndarray) -> np.ndarray:
        yr, pr = y[idx], pf[:, idx]
        undefined = (np.ptp(yr, axis=-1) == 0) | (np.ptp(pr, axis=-1) == 0) | nonfinite(idx)
        return _pearson_rows(yr, pr, undefined)

    if metric == "pearson":
        # per-row sums of globally centred values, their squares and cross products: one product with the
        # multiplicity matrix. Rows whose one-pass variance lost accuracy (near-constant draws) are redone exactly.
        # (non-finite examples contribute zeros and are flagged in the last column instead: 0 * inf would be NaN)
        some = finite.any()
        yg = np.where(finite, y - (y[finite].mean() if some else 0.0), 0.0)
        pg = np.where(finite, pf - (pf[:, finite].mean(axis=1, keepdims=True) if some else 0.0), 0.0)
        features = np.stack([yg, yg * yg, *pg, *(pg * pg), *(yg * pg), (~finite).astype(np.float64)])

        def pearson(idx: np.ndarray) -> np.ndarray:
            # einsum, not BLAS: a BLAS product rounds a row differently depending on how many rows it holds,
            # which would make the result depend on the chunk size
            s = np.einsum("cn,fn->cf", _multiplicity(idx, n), features)
            sy, syy = s[:, 0], s[:, 1]
            sp, spp, syp = s[:, 2:2 + k].T, s[:, 2 + k:2 + 2 * k].T, s[:, 2 + 2 * k:2 + 3 * k].T
            var_y, var_p, cov = syy - sy * sy / n, spp - sp * sp / n, syp - sy * sp / n
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.clip(cov / np.sqrt(var_y * var_p), -1.0, 1.0)
            shaky = (var_y <= 1e-4 * syy) | (var_p <= 1e-4 * spp).any(axis=0)
            redo = np.flatnonzero(shaky & (s[:, -1] == 0))
            if redo.size:
                r[:, redo] = exact_pearson(idx[redo])
            r[:, s[:, -1] > 0] = np.nan
            return r
        return pearson
    if metric == "spearman":
        grouped = [np.unique(v, return_inverse=True) for v in (y, *pf)]
        groups = [(inverse.reshape(-1).astype(np.int32), len(values)) for values, inverse in grouped]
        centre = n * (n + 1.0) ** 2  # the mean doubled rank is always n + 1

        def spearman(idx: np.ndarray) -> np.ndarray:
            # doubled ranks are integers <= 2n, so these sums are exact for n up to ~10^5 and need no centring pass
            ry, sq_y, const_y = _rank_rows(*groups[0], idx)
            ranked = [_rank_rows(*g, idx) for g in groups[1:]]
            rp = np.stack([r for r, _, _ in ranked])
            sq_p = np.stack([q for _, q, _ in ranked])
            cov = np.einsum("cn,kcn->kc", ry, rp) - centre
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.clip(cov / np.sqrt((sq_y - centre) * (sq_p - centre)), -1.0, 1.0)
            r[const_y | np.stack([c for _, _, c in ranked]) | nonfinite(idx)] = np.nan
            return r
        return spearman
    raise FlexLoRAError(f"unknown metric {metric!r}: expected one of {', '.join(METRICS)}")


def resampled_metric(metric: str, labels, predictions, idx) -> np.ndarray:
    """The metric of (labels[idx[r]], predictions[idx[r]]) for every row r of an index matrix, all at once."""
    y, (p,) = _as_arrays(labels, predictions)
    idx = np.atleast_2d(np.asarray(idx))
    if idx.size and (idx.min() < 0 or idx.max() >= y.size):
        raise FlexLoRAError(f"resample indices must lie in [0, {y.size})")
    return _row_metric(metric, y, [p])(idx)[0]


def _draw_differences(row_metric: RowMetric, n: int, n_resamples: int, rng: np.random.Generator,
                      chunk: int | None) -> np.ndarray:
    """metric(a) - metric(b) on n_resamples paired resamples, drawn chunk by chunk from one stream.

    Rows are drawn in order from the same generator, so the result does not depend on the chunk size.
    """
    if n_resamples < 1:
        raise FlexLoRAError(f"n_resamples must be at least 1, got {n_resamples}")
    if chunk is None:
        chunk = max(1, _CHUNK_ELEMENTS // n)
    elif chunk < 1:
        raise FlexLoRAError(f"chunk must be at least 1 resample, got {chunk}")
    dtype = np.int32 if n < 2**31 else np.int64
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        values = row_metric(rng.integers(0, n, size=(rows, n), dtype=dtype))
        out[start:start + rows] = values[0] - values[-1]
    return out


def _summarise(diff: float, resamples: np.ndarray) -> tuple[float, float, float, int]:
    """Percentile interval, approximate p-value and NaN count of the resampled differences."""
    valid = resamples[~np.isnan(resamples)]
    nan_count = int(resamples.size - valid.size)
    if valid.size == 0:
        return float("nan"), float("nan"), float("nan"), nan_count
    low, high = np.percentile(valid, [2.5, 97.5])
    if np.isnan(diff):
        p_value = float("nan")
    elif diff == 0:
        p_value = 1.0
    else:
        against = np.count_nonzero(valid <= 0 if diff > 0 else valid >= 0)
        p_value = min(1.0, 2.0 * float(against) / valid.size)
    return float(low), float(high), p_value, nan_count


def _paired(metric: str, labels, pred_a, pred_b, n_resamples: int, rng: np.random.Generator,
            chunk: int | None, keep_resamples: bool) -> BootstrapResult:
    y, (a, b) = _as_arrays(labels, pred_a, pred_b)
    # identical methods are scored once, so their resampled differences are exactly 0, not rounding noise
    row_metric = _row_metric(metric, y, [a] if np.array_equal(a, b) else [a, b])  # also validates metric, classes
    diff = official_metric(metric, y, a) - official_metric(metric, y, b)
    resamples = _draw_differences(row_metric, y.size, n_resamples, rng, chunk)
    low, high, p_value, nan_count = _summarise(diff, resamples)
    return BootstrapResult(metric=metric, diff=float(diff), low=low, high=high, p_value=p_value, n=int(y.size),
                           n_resamples=n_resamples, nan_resamples=nan_count,
                           resamples=resamples if keep_resamples else None)


def paired_bootstrap(metric: str, labels, pred_a, pred_b, n_resamples: int = 10_000, seed: int = 0,
                     chunk: int | None = None, keep_resamples: bool = True) -> BootstrapResult:
    """Paired bootstrap of metric(a) - metric(b): both methods are rescored on the same resampled examples.

    ``diff`` is the official full-data difference; ``low`` / ``high`` the 2.5 / 97.5 percentiles of the resampled
    differences, NaN resamples (constant labels or predictions for pearson / spearman) dropped and counted.
    ``p_value`` is an approximation (the bootstrap distribution stands in for the null distribution shifted to 0):
    twice the share of resamples whose difference does not have the sign of ``diff`` (opposite sign or exactly 0,
    so ties count against the claimed direction), capped at 1; 1.0 when ``diff`` is 0. Its resolution is
    2 / n_resamples, so 0.0 means "below that".

    ``chunk`` is how many resamples are drawn at once (default: about 1M indices), which bounds memory without
    changing the result. The same arguments always give the same result (numpy ``default_rng(seed)``).
    """
    return _paired(metric, labels, pred_a, pred_b, n_resamples, np.random.default_rng(seed), chunk,
                   keep_resamples)


def combine_seeds(per_seed: Sequence[tuple], metric: str, n_resamples: int = 10_000, seed: int = 0,
                  chunk: int | None = None, keep_resamples: bool = True) -> SeedsResult:
    """Hierarchical paired bootstrap over training seeds: is a over b consistent beyond one lucky seed?

    ``per_seed`` holds one (labels, pred_a, pred_b) per seed (evaluation sets may differ in size). Resample r
    resamples every seed's examples independently (paired within the seed), takes each seed's difference and
    averages them over seeds; the interval and p-value are read from those averages as in ``paired_bootstrap``.
    Seeds themselves are not resampled: with a handful of seeds that would mostly add noise, so ``agree`` reports
    the seed-level consistency instead. Each seed draws from its own stream spawned from ``seed``.
    """
    if not per_seed:
        raise FlexLoRAError("combine_seeds needs at least one seed's (labels, pred_a, pred_b)")
    streams = np.random.SeedSequence(seed).spawn(len(per_seed))
    results = [_paired(metric, labels, a, b, n_resamples, np.random.default_rng(stream), chunk, True)
               for (labels, a, b), stream in zip(per_seed, streams, strict=True)]
    averaged = np.mean(np.stack([r.resamples for r in results]), axis=0)  # a NaN seed makes the row NaN
    diffs = np.array([r.diff for r in results])
    mean_diff = float(diffs.mean())
    low, high, p_value, nan_count = _summarise(mean_diff, averaged)
    agree = int(np.count_nonzero(np.sign(diffs) == np.sign(mean_diff)))
    if not keep_resamples:
        results = [replace(r, resamples=None) for r in results]
    return SeedsResult(metric=metric, mean_diff=mean_diff, low=low, high=high, p_value=p_value, agree=agree,
                       n_seeds=len(results), n_resamples=n_resamples, nan_resamples=nan_count,
                       per_seed=tuple(results), resamples=averaged if keep_resamples else None)
