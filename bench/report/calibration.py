"""Calibration: expected calibration error (ECE), Brier score and reliability diagrams per configuration.

The inputs are three float32 arrays the accuracy job keeps per image in `<key>.preds.npz` beside
`labels` and `top5` (bench/jobs/accuracy.py): `confidence` (the max softmax probability), `p_true`
(the probability of the true class) and `brier` (sum_c (p_c - y_c)^2). Predictions files written
before these existed have none, and their configurations simply get no calibration (NaN).

Numbers only at import (numpy, scipy): `frame` imports this module for the summary's columns, and the
reliability figure loads matplotlib when it is drawn. Definitions: docs/protocol.md#calibration.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats as sps

BINS = 15  # equal-width confidence bins of ECE, as in Guo et al. (2017)
FIELDS = ("confidence", "p_true", "brier")
NAN_RESULT = dict(ece=math.nan, ece_ci_low=math.nan, ece_ci_high=math.nan,
                  brier=math.nan, brier_ci_low=math.nan, brier_ci_high=math.nan)


class CalibrationError(ValueError):
    """Per-image arrays that cannot be scored (shapes differ, values outside [0, 1])."""


def bin_index(confidence, bins: int = BINS) -> np.ndarray:
    """Bin of each confidence: bin i holds (i/bins, (i+1)/bins]; a confidence of 0 joins bin 0.
    Right-closed like Guo et al., so a confidence of exactly 1 is in the last bin, not past it."""
    conf = np.asarray(confidence, dtype=float)
    return np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)


def ece(confidence, correct, bins: int = BINS, axis: int = -1) -> np.ndarray | float:
    """Expected calibration error: sum over bins of (images in bin / images) * |accuracy - mean
    confidence| = sum over bins of |sum correct - sum confidence| / images. Vectorised over the leading
    axes (the bootstrap's resamples)."""
    conf = np.moveaxis(np.asarray(confidence, dtype=float), axis, -1)
    hit = np.moveaxis(np.asarray(correct, dtype=float), axis, -1)
    if conf.shape != hit.shape or conf.shape[-1] == 0:
        raise CalibrationError(f"confidence {conf.shape} and correctness {hit.shape}: need equal, non-empty shapes")
    return binned_ece(bin_index(conf, bins), hit - conf, bins)


def binned_ece(index, gap, bins: int = BINS, axis: int = -1) -> np.ndarray | float:
    """ECE from each image's bin and its gap (correct - confidence): one bincount over all rows. The
    bootstrap resamples these two instead of recomputing the bins, which makes 2000 resamples of 10k
    images three times faster."""
    index = np.moveaxis(np.asarray(index), axis, -1).astype(np.int64)
    gap = np.moveaxis(np.asarray(gap, dtype=float), axis, -1)
    rows, n = int(np.prod(gap.shape[:-1], dtype=np.int64)), gap.shape[-1]
    flat = (np.arange(rows)[:, None] * bins + index.reshape(rows, n)).ravel()
    out = np.abs(np.bincount(flat, gap.reshape(-1), rows * bins)).reshape(rows, bins).sum(-1) / n
    return float(out[0]) if gap.ndim == 1 else out.reshape(gap.shape[:-1])


def brier(terms, axis: int = -1):
    """Brier score: the mean over images of sum_c (p_c - y_c)^2 (0 perfect, 2 worst)."""
    return np.mean(np.asarray(terms, dtype=float), axis=axis)


def reliability(confidence, correct, bins: int = BINS) -> dict[str, np.ndarray]:
    """Per bin: images, mean confidence and accuracy (NaN in empty bins); what the diagram plots."""
    conf, hit = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    index = bin_index(conf, bins)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins: NaN, not drawn
        return dict(count=count, confidence=np.bincount(index, conf, bins) / count,
                    accuracy=np.bincount(index, hit, bins) / count, edges=np.linspace(0.0, 1.0, bins + 1))


def bootstrap(statistic, *samples, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0):
    """Percentile bootstrap CI of `statistic(*samples, axis=-1)`, resampling images jointly (paired), in
    the style of stats.bootstrap_ci: percentile, because BCa is undefined for constant inputs."""
    arrays = [np.asarray(s, dtype=float) for s in samples]
    n = arrays[0].size
    res = sps.bootstrap(arrays, statistic, paired=True, vectorized=True, confidence_level=confidence,
                        n_resamples=n_resamples, method="percentile", batch=max(1, min(n_resamples, 2_000_000 // n)),
                        rng=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return float(low), float(high)


def load(path) -> dict[str, np.ndarray] | None:
    """(labels, correct and the calibration arrays) of a predictions file; None when the file has no
    calibration arrays (written before they existed) or cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not set(FIELDS) <= set(npz.files):
                return None
            out = {name: np.asarray(npz[name], dtype=float) for name in FIELDS}
            labels, top5 = np.asarray(npz["labels"]), np.asarray(npz["top5"])
    except Exception:  # numpy, zipfile and zlib raise many types for a damaged file; the records report it
        return None
    if any(v.shape != labels.shape for v in out.values()) or top5.shape[:1] != labels.shape:
        return None
    out["correct"] = (top5[:, 0] == labels).astype(float)
    return out


def of_arrays(arrays: dict, n_resamples: int = 2000) -> dict[str, float]:
    """ECE and Brier score with their bootstrap 95% CIs, from `load`'s arrays."""
    conf, hit, terms = arrays["confidence"], arrays["correct"], arrays["brier"]
    if np.any((conf < 0) | (conf > 1)) or not np.all(np.isfinite(terms)):
        raise CalibrationError("confidences outside [0, 1] or non-finite Brier terms")
    low, high = bootstrap(binned_ece, bin_index(conf), hit - conf, n_resamples=n_resamples)
    b_low, b_high = bootstrap(brier, terms, n_resamples=n_resamples)
    return dict(ece=ece(conf, hit), ece_ci_low=low, ece_ci_high=high,
                brier=float(brier(terms)), brier_ci_low=b_low, brier_ci_high=b_high)


def of_file(path) -> dict[str, float]:
    """`of_arrays` of a predictions file; NaNs when there is no usable file or no calibration in it."""
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return dict(NAN_RESULT)
    arrays = load(path)
    if arrays is None:
        return dict(NAN_RESULT)
    try:
        return of_arrays(arrays)
    except CalibrationError:
        return dict(NAN_RESULT)


# ----------------------------------------------------------------------------------------------
# Reliability diagram

def reliability_figure(summary, model: str, regime: str):
    """One panel per keep ratio: accuracy against confidence per bin for every method (the baseline in
    black, the diagonal perfect calibration), and a last panel with ECE against keep ratio."""
    import matplotlib.pyplot as plt

    from .figure import BASELINE, interval_bars, method_style

    rows = summary[(summary["model"] == model) & (summary["regime"] == regime) & summary["ece"].notna()]
    base = summary[(summary["model"] == model) & (summary["method"] == BASELINE) & summary["ece"].notna()]
    ratios = sorted({r for r in rows.loc[rows["method"] != BASELINE, "keep_ratio"]}, reverse=True)
    fig, axes = plt.subplots(1, len(ratios) + 1, figsize=(3.6 * (len(ratios) + 1) + 1.5, 3.6), squeeze=False)
    axes = axes[0]
    for ax, ratio in zip(axes, ratios):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        for row in [*base.head(1).itertuples(), *rows[(rows["keep_ratio"] == ratio) & (rows["method"] != BASELINE)].itertuples()]:
            arrays = load(row.preds_path)
            if arrays is None:
                continue
            bins = reliability(arrays["confidence"], arrays["correct"])
            style = dict(color="black", marker="*") if row.method == BASELINE else method_style(row.method)
            ax.plot(bins["confidence"], bins["accuracy"], lw=1, ms=4, label=row.variant, **style)
        ax.set(title=f"keep {ratio:g}", xlabel="confidence (max softmax)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax = axes[-1]
    for variant, group in rows[rows["method"] != BASELINE].groupby("variant", sort=False):
        group = group.sort_values("keep_ratio")
        style = method_style(group["method"].iloc[0])
        ax.plot(group["keep_ratio"], group["ece"], lw=1, ms=4, label=variant, **style)
        interval_bars(ax, group["keep_ratio"], group["ece_ci_low"], group["ece_ci_high"], style["color"], alpha=0.8)
    if len(base):
        ax.axhline(base["ece"].iloc[0], color="black", lw=0.8, ls="--", label="baseline (none)")
    ax.set(title="ECE (15 bins) vs keep ratio", xlabel="keep ratio", ylabel="ECE")
    handles = {label: h for a in axes for h, label in zip(*a.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{model} ({regime}): reliability", fontsize=9)
    fig.tight_layout()
    return fig


def write_figures(summary, out_dir) -> dict[str, Path]:
    """A reliability figure per model and regime that has calibration; {name: png path}."""
    from .figure import file_stem, save_figure

    paths = {}
    if "ece" not in summary or not summary["ece"].notna().any():
        return paths
    for (model, regime), _ in summary[summary["ece"].notna()].groupby(["model", "regime"]):
        name = file_stem(f"reliability_{model}_{regime}")
        paths[f"reliability ({model}, {regime})"] = save_figure(reliability_figure(summary, model, regime),
                                                                Path(out_dir) / name)
    return paths


# ----------------------------------------------------------------------------------------------
# Report section

def ece_by_ratio(summary):
    """Variant x keep ratio table of ECE (percent points) per model and regime: does calibration get
    worse as tokens drop? Means over seeds where the summary was collapsed (frame.collapse_seeds)."""
    import pandas as pd

    if "ece" not in summary or not summary["ece"].notna().any():
        return pd.DataFrame()
    rows = summary[summary["ece"].notna()]
    table = rows.pivot_table(index=["model", "regime", "variant"], columns="keep_ratio", values="ece",
                             aggfunc="first", sort=False)
    table = table[sorted(table.columns, reverse=True)]
    return table.map(lambda v: "" if pd.isna(v) else f"{100 * v:.2f}")


def markdown(summary) -> list[str]:
    """The report's "Calibration" section; nothing when no predictions file has calibration arrays."""
    table = ece_by_ratio(summary)
    if table.empty:
        return []
    table.columns = [f"keep {c:g}" for c in table.columns]
    return ["## Calibration", "",
            f"Expected calibration error (ECE, {BINS} equal-width confidence bins, in points of percent) by keep "
            "ratio; the table above gives ECE and the Brier score with percentile-bootstrap 95% CIs "
            "(docs/protocol.md#calibration), the reliability figures below the bins.", "",
            table.reset_index().to_markdown(index=False, disable_numparse=True), ""]
