"""Per-image statistics of top-1 accuracy: bootstrap confidence intervals and paired tests.

Two models evaluated on the same images are compared image by image (McNemar's test on the
discordant pairs), not by their aggregate accuracies: that is far more sensitive, because the
images both models get right or both get wrong carry no information about the difference.

The inputs are the accuracy job's `<key>.preds.npz` files: `labels` (N,) and `top5` (N, 5) ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sps

DEFAULT_ALPHA = 0.05


class StatsError(ValueError):
    """Predictions that cannot be compared (different images, bad arrays)."""


@dataclass(frozen=True)
class Predictions:
    labels: np.ndarray  # (N,) int64
    top5: np.ndarray  # (N, k) int64, best first

    @property
    def correct(self) -> np.ndarray:
        """(N,) bool: top-1 prediction equals the label."""
        return self.top5[:, 0] == self.labels


def load_predictions(path: str | Path) -> Predictions:
    try:
        with np.load(path, allow_pickle=False) as npz:
            labels, top5 = np.asarray(npz["labels"]), np.asarray(npz["top5"])
    except Exception as exc:  # numpy, zipfile and zlib raise many types for a damaged file (BadZipFile, ...)
        raise StatsError(f"{path}: not a predictions file with arrays labels and top5 "
                         f"({type(exc).__name__}: {exc})") from None
    if labels.ndim != 1 or top5.ndim != 2 or top5.shape[0] != labels.shape[0]:
        raise StatsError(f"{path}: labels {labels.shape} and top5 {top5.shape} do not describe the same images")
    return Predictions(labels, top5)


def bootstrap_ci(correct, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of top-1 accuracy in percent, resampling images.

    Percentile rather than BCa: BCa is undefined for a constant vector (all right or all wrong),
    where the honest interval is the single point.
    """
    x = np.asarray(correct, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise StatsError(f"need a non-empty 1-D vector of per-image correctness; got shape {x.shape}")
    res = sps.bootstrap(
        (x,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
        vectorized=True, batch=max(1, min(n_resamples, 2_000_000 // x.size)), rng=np.random.default_rng(seed),
    )
    low, high = res.confidence_interval
    return 100.0 * float(low), 100.0 * float(high)


@dataclass(frozen=True)
class PairedResult:
    """Method A vs method B on the same images."""

    n: int  # images
    a_only: int  # b in McNemar's notation: A right, B wrong
    b_only: int  # c: A wrong, B right
    delta_top1: float  # top-1(A) - top-1(B), percentage points
    p_value: float
    test: str  # "mcnemar-midp" or "mcnemar-exact"

    def significant(self, alpha: float = DEFAULT_ALPHA) -> bool:
        return self.p_value < alpha


def mcnemar(correct_a, correct_b, mid_p: bool = True) -> PairedResult:
    """McNemar's test on paired per-image correctness, exact binomial or mid-p (two-sided).

    Under H0 the discordant pairs split 50/50, so the p-value is a binomial test of a_only out of
    a_only + b_only. The mid-p version subtracts the probability of the observed split itself,
    which keeps the exact test's validity without most of its conservatism (Fagerland et al., 2013).
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise StatsError(f"paired vectors must have the same 1-D shape; got {a.shape} and {b.shape}")
    a_only = int(np.sum(a & ~b))
    b_only = int(np.sum(~a & b))
    discordant = a_only + b_only
    if discordant == 0:
        p = 1.0
    else:  # two-sided: twice the smaller tail (the null is symmetric), minus the observed point for mid-p
        k = min(a_only, b_only)
        p = 2.0 * sps.binom.cdf(k, discordant, 0.5) - (sps.binom.pmf(k, discordant, 0.5) if mid_p else 0.0)
    delta = 100.0 * (a_only - b_only) / a.size if a.size else float("nan")
    return PairedResult(int(a.size), a_only, b_only, float(delta), float(min(1.0, p)),
                        "mcnemar-midp" if mid_p else "mcnemar-exact")


def paired_test(preds_a: Predictions, preds_b: Predictions, mid_p: bool = True) -> PairedResult:
    """McNemar on two prediction sets; refuses sets that are not of the same images."""
    if preds_a.labels.shape != preds_b.labels.shape or not np.array_equal(preds_a.labels, preds_b.labels):
        raise StatsError(
            f"predictions are not of the same images ({preds_a.labels.size} vs {preds_b.labels.size} labels, "
            "or labels differ); compare runs with the same data and limit"
        )
    return mcnemar(preds_a.correct, preds_b.correct, mid_p=mid_p)


def paired_bootstrap_ci(correct_a, correct_b, confidence: float = 0.95, n_resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of top-1(A) - top-1(B) in points, resampling images jointly."""
    a = np.asarray(correct_a, dtype=float)
    b = np.asarray(correct_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise StatsError(f"paired vectors must have the same non-empty 1-D shape; got {a.shape} and {b.shape}")
    res = sps.bootstrap(
        (a - b,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
        vectorized=True, batch=max(1, min(n_resamples, 2_000_000 // a.size)), rng=np.random.default_rng(seed),
    )
    low, high = res.confidence_interval
    return 100.0 * float(low), 100.0 * float(high)


def ci_of_file(path) -> tuple[float, float]:
    """Bootstrap CI of a predictions file's top-1; (nan, nan) when there is no usable file."""
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return float("nan"), float("nan")
    try:
        return bootstrap_ci(load_predictions(path).correct)
    except StatsError:
        return float("nan"), float("nan")


def paired_p_of_files(path_a, path_b, mid_p: bool = True) -> float:
    """McNemar p-value of two predictions files; nan when either is missing or they are of other images."""
    if not all(isinstance(p, (str, Path)) and Path(p).is_file() for p in (path_a, path_b)):
        return float("nan")
    try:
        return paired_test(load_predictions(path_a), load_predictions(path_b), mid_p=mid_p).p_value
    except StatsError:
        return float("nan")


def pairwise_tests(summary, group_by: list[str], exclude_method: str | None = None, mid_p: bool = True):
    """McNemar between every two rows of `summary` that share `group_by` (e.g. model, keep ratio and
    accuracy conditions) and have a `preds_path`. Returns a DataFrame, one row per pair."""
    import pandas as pd

    rows = []
    if "preds_path" not in summary:
        return pd.DataFrame(rows)
    measured = summary[summary["preds_path"].notna()]
    if exclude_method is not None:
        measured = measured[measured["method"] != exclude_method]
    for _, group in measured.groupby([c for c in group_by if c in measured], dropna=False):
        members = list(group.itertuples())
        loaded = {}  # each file once, not once per pair
        for row in members:
            try:
                loaded[row.preds_path] = load_predictions(row.preds_path)
            except StatsError:
                pass
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                if a.preds_path not in loaded or b.preds_path not in loaded:
                    continue  # an unreadable file: nothing to compare
                try:
                    res = paired_test(loaded[a.preds_path], loaded[b.preds_path], mid_p=mid_p)
                except StatsError:
                    continue  # different images: not comparable pairwise
                rows.append(dict(model=a.model, keep_ratio=a.keep_ratio, a=getattr(a, "variant", a.method),
                                 b=getattr(b, "variant", b.method), n_images=res.n, a_only=res.a_only,
                                 b_only=res.b_only, delta_top1=res.delta_top1, p_value=res.p_value, test=res.test))
    return pd.DataFrame(rows)
