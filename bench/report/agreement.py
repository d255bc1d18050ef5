"""Decision agreement: do two token-reduction methods make the same decisions on the same images?

Accuracy says how often each method is right; it does not say whether two methods keep the same
patches, merge them the same way or end with the same representation. The trace job
(bench/jobs/trace.py) stores each configuration's decisions per image; this part compares every two
configurations of one model, weights and keep ratio (the unreduced baseline included) by

- kept IoU: per block, |K_a ∩ K_b| / |K_a ∪ K_b| of the original patches whose own token is still
  kept there (patch_state KEPT: not idle, dropped, fused, nor merged into another token), per image,
  averaged over images and over the blocks from the first reduction of either method;
- merge V-measure: per block where both methods merge (both put two patches into one token somewhere),
  the V-measure of the two partitions of the patches into output tokens, from their contingency table;
- CLS CKA: linear CKA of the final CLS pre-logit features over the traced images;
- top-1 agreement on the traced images, and McNemar's test on the accuracy job's per-image
  correctness (stats.paired_test), beside each method's ΔTop-1 from the summary.

Definitions and caveats: docs/protocol.md#decision-agreement.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import methods

from ..records import records_dir
from . import stats
from .frame import BASELINE, variant_label

METRICS = {"kept_iou": "kept-patch IoU", "merge_vmeasure": "merge V-measure", "cls_cka": "CLS linear CKA",
           "pred_agreement": "top-1 agreement"}


class AgreementError(ValueError):
    """Traces that cannot be compared (other images, other model) or read."""


# ----------------------------------------------------------------------------------------------
# Measures

def kept_iou(kept_a, kept_b) -> np.ndarray:
    """Per row (image): |A ∩ B| / |A ∪ B| of two boolean masks (n, N0); 1 where both are empty."""
    a, b = np.asarray(kept_a, dtype=bool), np.asarray(kept_b, dtype=bool)
    inter, union = (a & b).sum(-1), (a | b).sum(-1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _entropies(keys: np.ndarray, per_row: int, rows: int, n: int) -> np.ndarray:
    """Per row: the entropy (nats) of the cluster sizes encoded as keys = row * per_row + cluster."""
    unique, counts = np.unique(keys, return_counts=True)
    p = counts / n
    return np.bincount(unique // per_row, -p * np.log(p), minlength=rows)


def v_measure(labels_a, labels_b) -> np.ndarray | float:
    """V-measure (Rosenberg and Hirschberg, 2007; β = 1) of two clusterings of the same items, per row
    of (rows, n) label arrays, or a float for 1-D labels. With H the entropy of cluster sizes,
    homogeneity h = 1 - H(A|B)/H(A), completeness c = 1 - H(B|A)/H(B) (1 where H(A), resp. H(B), is 0)
    and V = 2hc/(h + c), 0 where h + c = 0: the harmonic mean of the two normalised conditional
    entropies, symmetric in A and B, 1 for equal partitions whatever the label names."""
    a, b = np.asarray(labels_a, dtype=np.int64), np.asarray(labels_b, dtype=np.int64)
    if a.shape != b.shape or a.ndim not in (1, 2) or a.shape[-1] == 0:
        raise AgreementError(f"labels {a.shape} and {b.shape}: need equal, non-empty 1-D or 2-D shapes")
    a2, b2 = np.atleast_2d(a), np.atleast_2d(b)
    rows, n = a2.shape
    a2, b2 = a2 - a2.min(), b2 - b2.min()  # non-negative, so that row * K + label is a unique key
    k = int(max(a2.max(), b2.max())) + 1
    row = np.repeat(np.arange(rows, dtype=np.int64), n)
    h_a = _entropies(row * k + a2.ravel(), k, rows, n)
    h_b = _entropies(row * k + b2.ravel(), k, rows, n)
    h_ab = _entropies(row * k * k + a2.ravel() * k + b2.ravel(), k * k, rows, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        hom = np.where(h_a > 0, 1.0 - (h_ab - h_b) / h_a, 1.0)
        com = np.where(h_b > 0, 1.0 - (h_ab - h_a) / h_b, 1.0)
        hom, com = np.clip(hom, 0.0, 1.0), np.clip(com, 0.0, 1.0)  # rounding of equal entropies
        v = np.where(hom + com > 0, 2.0 * hom * com / (hom + com), 0.0)
    return float(v[0]) if a.ndim == 1 else v


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al., 2019) of two feature matrices (n, d) and (n, d') of the same
    n inputs: ||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F) after centring each feature. 1 for features that
    differ by a rotation, a uniform scale or a shift; NaN when either is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise AgreementError(f"features {x.shape} and {y.shape}: need (n, d) of the same n >= 2 inputs")
    x, y = x - x.mean(0), y - y.mean(0)
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.linalg.norm(y.T @ x) ** 2 / den) if den > 0 else math.nan


# ----------------------------------------------------------------------------------------------
# Traces

@dataclass
class Trace:
    """One trace file: decisions per block (latest record at or before a block holds there)."""

    labels: np.ndarray
    pred: np.ndarray
    features: np.ndarray
    depth: int
    num_patches: int
    states: dict[int, np.ndarray] = field(default_factory=dict)
    groups: dict[int, np.ndarray] = field(default_factory=dict)

    @staticmethod
    def _latest(records: dict, block: int):
        earlier = [b for b in records if b <= block]
        return records[max(earlier)] if earlier else None

    def kept_at(self, block: int) -> np.ndarray:
        """(n, N0) bool: patches whose own token is kept after `block` (all before any reduction)."""
        state = self._latest(self.states, block)
        return np.ones((len(self.labels), self.num_patches), bool) if state is None else state == methods.KEPT

    @property
    def merges(self) -> bool:
        """Whether some token ever held two or more patches. A method may record patch_group and only
        prune (Zero-TPrune; PPT or ToFu where they choose pruning): its partition is all singletons, and
        a V-measure against it would only say how coarse the other method's merges are."""
        for group in self.groups.values():
            ordered = np.sort(group, axis=-1)
            if ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any():
                return True
        return False

    def group_at(self, block: int) -> np.ndarray:
        """(n, N0): the token holding each patch after `block` (each its own before any merge)."""
        group = self._latest(self.groups, block)
        return np.broadcast_to(np.arange(self.num_patches), (len(self.labels), self.num_patches)) \
            if group is None else group


def load_trace(path) -> Trace:
    try:
        with np.load(path, allow_pickle=False) as npz:
            t = Trace(np.asarray(npz["labels"]), np.asarray(npz["pred"]), np.asarray(npz["features"]),
                      int(npz["depth"]), int(npz["num_patches"]))
            t.states = {int(b): np.asarray(npz[f"state_{b}"]) for b in npz["state_blocks"]}
            t.groups = {int(b): np.asarray(npz[f"group_{b}"]) for b in npz["group_blocks"]}
    except Exception as exc:  # numpy, zipfile and zlib raise many types for a damaged file (BadZipFile, ...)
        raise AgreementError(f"{path}: not a trace file ({type(exc).__name__}: {exc})") from None
    return t


def compare(a: Trace, b: Trace) -> dict:
    """Every measure of the module docstring for two traces of one model on the same first images."""
    n = min(len(a.labels), len(b.labels))
    if n < 2 or not np.array_equal(a.labels[:n], b.labels[:n]) or (a.depth, a.num_patches) != (b.depth, b.num_patches):
        raise AgreementError("the traces are not of the same model on the same images")
    first = [min(t.states) for t in (a, b) if t.states]
    iou = [float(kept_iou(a.kept_at(k)[:n], b.kept_at(k)[:n]).mean()) for k in range(a.depth)]
    out = dict(n_images=n, kept_iou=float(np.mean(iou[min(first, default=0):])), kept_iou_final=iou[-1],
               kept_iou_per_block=iou, merge_vmeasure=math.nan, merge_vmeasure_final=math.nan,
               cls_cka=linear_cka(a.features[:n], b.features[:n]),
               pred_agreement=float(np.mean(a.pred[:n] == b.pred[:n])))
    if a.merges and b.merges:  # both really merge: compare from the first merge record of either
        start = min(min(a.groups), min(b.groups))
        vm = [float(np.mean(v_measure(a.group_at(k)[:n], b.group_at(k)[:n]))) for k in range(start, a.depth)]
        out.update(merge_vmeasure=float(np.mean(vm)), merge_vmeasure_final=vm[-1])
    return out


# ----------------------------------------------------------------------------------------------
# The table: every pair of one model, weights and keep ratio

_DATA = ["model", "checkpoint", "pretrained", "random_weights", "data"]  # what makes traces comparable


def _traces(tidy: pd.DataFrame) -> pd.DataFrame:
    if "kind" not in tidy or "trace_file" not in tidy:
        return pd.DataFrame()
    rows = tidy[(tidy["kind"] == "trace") & (tidy["status"] == "ok")].copy()
    if rows.empty:
        return rows
    rows["trace_path"] = [str(records_dir(r.run) / r.trace_file) for r in rows.itertuples()]
    rows["variant"] = rows.apply(variant_label, axis=1)
    order = methods.available()
    rows["_order"] = rows["method"].map(lambda m: order.index(m) if m in order else len(order))
    return rows.sort_values(["_order", "variant", "seed"], kind="stable")


def _accuracy_of(summary: pd.DataFrame, row) -> dict:
    """ΔTop-1, top-1 and predictions file of the summary row of `row`'s configuration and seed."""
    if summary is None or summary.empty or "top1" not in summary:
        return {}
    match = summary[(summary["model"] == row.model) & (summary["method"] == row.method)
                    & (summary["keep_ratio"] == row.keep_ratio) & (summary["regime"] == row.regime)]
    # element by element: `Series == tuple` would compare the tuple's items with the rows
    same = match["options_key"].map(lambda v: v == row.options_key) & match["layers"].map(lambda v: v == row.layers)
    match = match[same & (match["checkpoint"] == row.checkpoint) & match["top1"].notna()]
    if "seed" in match:
        match = match[match["seed"] == row.seed]
    if match.empty:
        return {}
    best = match[match["data"] == row.data] if "data" in match and (match["data"] == row.data).any() else match
    first = best.iloc[0]
    return dict(top1=first["top1"], delta_top1=first.get("delta_top1"), preds_path=first.get("preds_path"))


def table(tidy: pd.DataFrame, summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per pair of traced configurations of one model, weights, regime and keep ratio (the
    baseline joins every ratio), with every measure and both sides' ΔTop-1 and McNemar's test."""
    traces = _traces(tidy)
    out, loaded, preds = [], {}, {}
    for _, group in traces.groupby(_DATA, dropna=False, sort=False) if len(traces) else ():
        base = group[group["method"] == BASELINE]
        base = base.sort_values("n_images").tail(1)  # the longest baseline trace covers any other
        reduced = group[group["method"] != BASELINE]
        for (regime, ratio), members in reduced.groupby(["regime", "keep_ratio"], sort=False):
            members = pd.concat([base, members])
            labels = _labels(members)
            for i, a in enumerate(members.itertuples()):
                for b in list(members.itertuples())[i + 1:]:
                    row = _pair(a, b, labels, loaded, preds, summary)
                    if row is not None:
                        out.append(dict(model=a.model, regime=regime, keep_ratio=ratio, **row))
    return pd.DataFrame(out)


def _labels(members: pd.DataFrame) -> dict:
    """Variant labels, with the seed where one variant was traced with several (finetuned seeds)."""
    counts = members["variant"].value_counts()
    return {r.Index: r.variant + (f" seed {r.seed}" if counts[r.variant] > 1 else "") for r in members.itertuples()}


def _pair(a, b, labels, loaded, preds, summary) -> dict | None:
    try:
        for r in (a, b):
            if r.trace_path not in loaded:
                loaded[r.trace_path] = load_trace(r.trace_path)
        measures = compare(loaded[a.trace_path], loaded[b.trace_path])
    except AgreementError:
        return None  # a damaged or foreign trace: no comparison rather than a wrong one
    acc_a, acc_b = _accuracy_of(summary, a), _accuracy_of(summary, b)
    row = dict(a=labels[a.Index], b=labels[b.Index], method_a=a.method, method_b=b.method, **measures,
               delta_top1_a=acc_a.get("delta_top1", math.nan), delta_top1_b=acc_b.get("delta_top1", math.nan),
               delta_top1_ab=math.nan, mcnemar_p=math.nan, acc_images=math.nan)
    paths = (acc_a.get("preds_path"), acc_b.get("preds_path"))
    if all(isinstance(p, str) and Path(p).is_file() for p in paths):
        try:
            for p in paths:
                if p not in preds:
                    preds[p] = stats.load_predictions(p)
            test = stats.paired_test(preds[paths[0]], preds[paths[1]])
            row.update(delta_top1_ab=test.delta_top1, mcnemar_p=test.p_value, acc_images=test.n)
        except stats.StatsError:
            pass  # other images or a damaged file: the agreement stands without the test
    return row


def matrix(pairs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Symmetric variant x variant matrix of one group's pairs (1 on the diagonal; NaN where undefined)."""
    names = list(dict.fromkeys([*pairs["a"], *pairs["b"]]))
    m = pd.DataFrame(np.nan, index=names, columns=names)
    for r in pairs.itertuples():
        m.at[r.a, r.b] = m.at[r.b, r.a] = getattr(r, metric)
    merging = set(pairs.loc[pairs["merge_vmeasure"].notna(), "a"]) | set(pairs.loc[pairs["merge_vmeasure"].notna(), "b"])
    for name in names:
        m.at[name, name] = 1.0 if metric != "merge_vmeasure" or name in merging else np.nan
    return m


def write_heatmaps(pairs: pd.DataFrame, out_dir) -> dict[str, Path]:
    """A 2 x 2 heatmap figure per model, regime and keep ratio; {name: png path}."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .figure import method_style, save_figure

    paths = {}
    for (model, regime, ratio), group in pairs.groupby(["model", "regime", "keep_ratio"], sort=False):
        methods_of = dict(zip(group["a"], group["method_a"])) | dict(zip(group["b"], group["method_b"]))
        size = 2.0 + 0.42 * len(methods_of)
        fig, axes = plt.subplots(2, 2, figsize=(2 * size + 1, 2 * size))
        for ax, (metric, title) in zip(axes.flat, METRICS.items()):
            m = matrix(group, metric)
            sns.heatmap(m, ax=ax, vmin=0, vmax=1, cmap="viridis", annot=len(m) <= 16, fmt=".2f",
                        annot_kws=dict(fontsize=6), square=True, cbar_kws=dict(shrink=0.7), mask=m.isna())
            ax.set_title(title, fontsize=9)
            for tick in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
                method = methods_of.get(tick.get_text())
                tick.set_color("black" if method in (None, BASELINE) else method_style(method)["color"])
                tick.set_fontsize(7)
        fig.suptitle(f"{model} ({regime}), keep {ratio:g}: decision agreement on {int(group['n_images'].max())} "
                     "images", fontsize=10)
        fig.tight_layout()
        # no dot in the stem: save_figure sets the suffix, which would eat ".5" of "keep0.5"
        stem = f"agreement_{model}_{regime}_keep{ratio:g}".replace("/", "_").replace(" ", "_").replace(".", "p")
        paths[f"agreement ({model}, {regime}, keep {ratio:g})"] = save_figure(fig, Path(out_dir) / stem)
    return paths


def csv_ready(pairs: pd.DataFrame) -> pd.DataFrame:
    return pairs.assign(kept_iou_per_block=pairs["kept_iou_per_block"].map(json.dumps))


# ----------------------------------------------------------------------------------------------
# Report section

def _fmt(value, spec: str) -> str:
    return "" if value is None or pd.isna(value) else f"{value:{spec}}"


def _per_variant(group: pd.DataFrame) -> pd.DataFrame:
    """Per reduced variant: its ΔTop-1 beside its agreement with the baseline and with the others."""
    rows = []
    names = [n for n in dict.fromkeys([*group["a"], *group["b"]])]
    base = {n for n, m in zip([*group["a"], *group["b"]], [*group["method_a"], *group["method_b"]]) if m == BASELINE}
    for name in names:
        if name in base:
            continue
        mine = group[(group["a"] == name) | (group["b"] == name)]
        other = mine.apply(lambda r: r["b"] if r["a"] == name else r["a"], axis=1)
        vs_base = mine[other.isin(base)]
        peers = mine[~other.isin(base)].assign(other=other[~other.isin(base)])
        delta = mine.apply(lambda r: r["delta_top1_a"] if r["a"] == name else r["delta_top1_b"], axis=1)
        best = peers.loc[peers["kept_iou"].idxmax()] if len(peers) else None
        worst = peers.loc[peers["kept_iou"].idxmin()] if len(peers) else None
        rows.append({
            "Method": name, "ΔTop-1": _fmt(delta.dropna().iloc[0] if delta.notna().any() else None, "+.2f"),
            "Kept IoU with baseline (= share kept)": _fmt(vs_base["kept_iou"].mean() if len(vs_base) else None, ".3f"),
            "CLS CKA with baseline": _fmt(vs_base["cls_cka"].mean() if len(vs_base) else None, ".3f"),
            "Top-1 agreement with baseline": _fmt(vs_base["pred_agreement"].mean() if len(vs_base) else None, ".3f"),
            "Mean kept IoU with the others": _fmt(peers["kept_iou"].mean() if len(peers) else None, ".3f"),
            "Most similar (kept IoU)": "" if best is None else f"{best['other']} ({best['kept_iou']:.3f})",
            "Least similar (kept IoU)": "" if worst is None else f"{worst['other']} ({worst['kept_iou']:.3f})",
        })
    return pd.DataFrame(rows)


def _extremes(group: pd.DataFrame, n: int = 3) -> pd.DataFrame:
    """The n most and n least similar pairs of reduced variants by kept IoU, beside their accuracy."""
    peers = group[(group["method_a"] != BASELINE) & (group["method_b"] != BASELINE)].sort_values("kept_iou")
    picked = pd.concat([peers.tail(n).iloc[::-1].assign(which="most similar"),
                        peers.head(n).assign(which="least similar")]).drop_duplicates(["a", "b"])
    return pd.DataFrame({
        "": picked["which"], "A": picked["a"], "B": picked["b"],
        "Kept IoU": picked["kept_iou"].map(lambda v: _fmt(v, ".3f")),
        "Merge V": picked["merge_vmeasure"].map(lambda v: _fmt(v, ".3f")),
        "CLS CKA": picked["cls_cka"].map(lambda v: _fmt(v, ".3f")),
        "Top-1 agr.": picked["pred_agreement"].map(lambda v: _fmt(v, ".3f")),
        "ΔTop-1 A": picked["delta_top1_a"].map(lambda v: _fmt(v, "+.2f")),
        "ΔTop-1 B": picked["delta_top1_b"].map(lambda v: _fmt(v, "+.2f")),
        "McNemar p (A vs B)": picked["mcnemar_p"].map(lambda v: "< 1e-300" if v == 0 else _fmt(v, ".3g")),
    })


def markdown(pairs: pd.DataFrame, figures: dict, out: Path) -> list[str]:
    """The report's "Decision agreement" section: per model, regime and keep ratio the heatmap, each
    variant's ΔTop-1 beside its agreement, and the most and least similar pairs."""
    if pairs.empty:
        return []
    lines = ["## Decision agreement", "",
             "Whether two methods decide alike on the same traced images (docs/protocol.md#decision-agreement): "
             "kept IoU of the patches whose own token is kept, per block from the first reduction, averaged; "
             "V-measure of the merge partitions where both methods merge; linear CKA of the final CLS "
             "features; top-1 agreement; McNemar's mid-p test on the accuracy job's per-image correctness. "
             "All pairs: [agreement.csv](agreement.csv).", ""]
    for (model, regime, ratio), group in pairs.groupby(["model", "regime", "keep_ratio"], sort=False):
        lines += [f"### {model}, {regime}, keep {ratio:g} ({int(group['n_images'].max())} images)", ""]
        png = figures.get(f"agreement ({model}, {regime}, keep {ratio:g})")
        if png is not None:
            rel = Path(png).relative_to(out) if Path(png).is_relative_to(out) else Path(png)
            lines += [f"![agreement]({rel.as_posix()}) ([PDF]({rel.with_suffix('.pdf').as_posix()}))", ""]
        per_variant, extremes = _per_variant(group), _extremes(group)
        if len(per_variant):
            lines += [per_variant.to_markdown(index=False, disable_numparse=True), ""]
        if len(extremes):
            lines += [extremes.to_markdown(index=False, disable_numparse=True), ""]
    return lines
