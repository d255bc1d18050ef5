"""Figures of a report (seaborn on the non-interactive Agg backend), each saved as PNG and PDF.

Every figure colours and marks a method the same way (`method_style`), keyed by the method's place
in the registry, so that EViT is the same colour in every figure of every report. Variants of one
method (other options, explicit layers, finetuning) share its colour and marker and differ by dashes.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

import methods

from .figure import BASELINE, interval_bars, method_style, save_figure
from .frame import variant_label

_DASHES = ("", (4, 2), (1, 1), (6, 2, 1, 2), (3, 3))
_LINESTYLES = ("-", "--", ":", "-.")
BASELINE_STYLE = dict(color="black", marker="*", s=220, zorder=5, label="baseline (none)")


def _variant_styles(frame: pd.DataFrame) -> tuple[dict, dict, dict]:
    """palette, markers, dashes for seaborn, keyed by variant label."""
    palette, markers, dashes, seen = {}, {}, {}, {}
    pairs = frame[["variant", "method"]].drop_duplicates()
    order = methods.available()
    pairs = sorted(pairs.itertuples(index=False), key=lambda p: (order.index(p.method) if p.method in order
                                                                else len(order), p.method, p.variant))
    for variant, method in pairs:
        style = method_style(method)
        palette[variant], markers[variant] = style["color"], style["marker"]
        dashes[variant] = _DASHES[seen.get(method, 0) % len(_DASHES)]
        seen[method] = seen.get(method, 0) + 1
    return palette, markers, dashes


def _legend_outside(fig, axes) -> None:
    """One legend right of the panels (inside, it hides the points of dense figures)."""
    handles, labels = {}, []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if labels:
        axes[-1].legend([handles[k] for k in labels], labels, fontsize=8, loc="upper left",
                        bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _lines(ax, data: pd.DataFrame, x: str, y: str) -> None:
    """One line per variant through its points, sorted along x."""
    if data.empty:
        return
    palette, markers, dashes = _variant_styles(data)
    sns.lineplot(data=data, x=x, y=y, hue="variant", style="variant", hue_order=list(palette),
                 style_order=list(palette), palette=palette, markers=markers, dashes=dashes, sort=True,
                 estimator=None, markersize=7, ax=ax)


# ----------------------------------------------------------------------------------------------
# Figures

def tradeoff(summary: pd.DataFrame, x: str, xlabel: str, model: str):
    """Top-1 against a cost (GMACs or img/s): one line per method variant, the baseline as a star."""
    rows = summary[(summary["model"] == model) & summary["top1"].notna() & summary[x].notna()]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    reduced = rows[rows["method"] != BASELINE]
    _lines(ax, reduced, x, "top1")
    palette = _variant_styles(reduced)[0] if len(reduced) else {}
    for r in reduced.itertuples():  # keep ratio beside each point, and its 95% bootstrap CI
        ax.annotate(f"{r.keep_ratio:g}", (getattr(r, x), r.top1), xytext=(4, 3), textcoords="offset points",
                    fontsize=7, color=palette[r.variant])
        if pd.notna(getattr(r, "top1_ci_low", np.nan)):
            interval_bars(ax, getattr(r, x), r.top1_ci_low, r.top1_ci_high, palette[r.variant])
    base = rows[rows["method"] == BASELINE]
    if len(base):
        ax.scatter(base[x], base["top1"], **BASELINE_STYLE)
    ax.set(xlabel=xlabel, ylabel="Top-1 accuracy (%)", title=model)
    ax.grid(alpha=0.3)
    _legend_outside(fig, [ax])
    return fig


def throughput_vs_batch(tidy: pd.DataFrame, model: str):
    """img/s against batch size, one panel per keep ratio, interquartile band over repeats."""
    tp = tidy[(tidy["kind"] == "throughput") & (tidy["status"] == "ok") & (tidy["model"] == model)].copy()
    tp["batch"] = tp["batch_size_used"].fillna(tp["batch_size"]) if "batch_size_used" in tp else tp["batch_size"]
    tp["condition"] = tp["dtype"] + ", " + tp.get("device_name", tp["device"]).fillna(tp["device"]).astype(str)
    tp["variant"] = tp.apply(variant_label, axis=1)
    ratios = sorted(tp.loc[tp["method"] != BASELINE, "keep_ratio"].unique(), reverse=True) or [1.0]
    fig, axes = plt.subplots(1, len(ratios), figsize=(4.2 * len(ratios), 3.8), squeeze=False, sharey=True)
    base = tp[tp["method"] == BASELINE].sort_values("batch")
    for ax, ratio in zip(axes[0], ratios):
        rows = tp[(tp["keep_ratio"] == ratio) & (tp["method"] != BASELINE)]
        _lines(ax, rows, "batch", "img_s")
        palette = _variant_styles(rows)[0] if len(rows) else {}
        for variant, group in rows.sort_values("batch").groupby("variant"):
            ax.fill_between(group["batch"], group["img_s_q25"], group["img_s_q75"], color=palette[variant], alpha=0.15)
        if len(base):
            ax.plot(base["batch"], base["img_s"], color="black", ls="--", marker="*", ms=10, label="baseline (none)")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch size", ylabel="images / s", title=f"{model}, keep {ratio:g}")
        ax.grid(alpha=0.3, which="both")
    batches = sorted(tp["batch"].unique())
    for ax in axes[0]:
        ax.set_xticks(batches, [str(int(b)) for b in batches])  # the batch sizes measured, not powers of 2
        ax.minorticks_off()
    _legend_outside(fig, list(axes[0]))
    conditions = ", ".join(sorted(tp["condition"].unique()))
    fig.suptitle(f"Throughput ({conditions}); band: interquartile range over repeats", fontsize=9)
    return fig


def _swept(tidy: pd.DataFrame, model: str) -> pd.DataFrame:
    """Throughput records of `model` with a batch sweep (throughput knob batch_sweep)."""
    if "batch_sweep" not in tidy:
        return tidy.iloc[0:0]
    rows = tidy[(tidy["kind"] == "throughput") & (tidy["status"] == "ok") & (tidy["model"] == model)]
    return rows[rows["batch_sweep"].map(lambda v: isinstance(v, list) and len(v) > 0)]


def speedup_vs_batch(tidy: pd.DataFrame, model: str):
    """Speedup over the unpatched model against batch size from batch-sweep records, one panel per keep
    ratio, the speedup's interval as a band; a ring marks each method's break-even batch (the smallest
    whose interval lies above 1)."""
    rows = _swept(tidy, model).copy()
    rows["variant"] = rows.apply(variant_label, axis=1)
    ratios = sorted(rows.loc[rows["method"] != BASELINE, "keep_ratio"].unique(), reverse=True) or [1.0]
    fig, axes = plt.subplots(1, len(ratios), figsize=(4.2 * len(ratios), 3.8), squeeze=False, sharey=True)
    palette = _variant_styles(rows)[0] if len(rows) else {}
    for ax, ratio in zip(axes[0], ratios):
        for _, row in rows[(rows["keep_ratio"] == ratio) & (rows["method"] != BASELINE)].iterrows():
            points = pd.DataFrame(row["batch_sweep"]).sort_values("batch_size")
            color = palette[row["variant"]]
            ax.plot(points["batch_size"], points["speedup"], marker="o", color=color, label=row["variant"])
            ax.fill_between(points["batch_size"], points["speedup_ci_low"], points["speedup_ci_high"],
                            color=color, alpha=0.15)
            even = row.get("break_even_batch")
            if even is not None and not pd.isna(even):
                at = points[points["batch_size"] == even]
                ax.scatter(at["batch_size"], at["speedup"], s=160, facecolors="none", edgecolors=color,
                           linewidths=2, zorder=5)
        ax.axhline(1.0, color="black", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch size", ylabel="speedup over unpatched", title=f"{model}, keep {ratio:g}")
        ax.grid(alpha=0.3, which="both")
    _legend_outside(fig, list(axes[0]))
    fig.suptitle("Speedup against batch size; band: the speedup's interval; ring: break-even batch", fontsize=9)
    return fig


def _idle_tokens(blocks) -> list | None:
    """(active, idle) per block from the FLOPs record's schedule: idle tokens are carried through a block
    untouched by attention and MLP (IdleViT). None without a schedule (no FLOPs job in the run)."""
    if not isinstance(blocks, list) or not blocks:
        return None
    return [(b["n_attn"], max(b["n_out"] - max(b["n_attn"], b["n_mlp"]), 0)) for b in blocks]


def tokens_per_layer(summary: pd.DataFrame, model: str):
    """Tokens each block attends over, per method; hatched: tokens carried idle (IdleViT)."""
    rows = summary[(summary["model"] == model) & summary["tokens_per_block"].map(lambda t: isinstance(t, list))]
    rows = rows.drop_duplicates(["variant", "keep_ratio"])
    ratios = sorted(rows.loc[rows["method"] != BASELINE, "keep_ratio"].unique(), reverse=True) or [1.0]
    fig, axes = plt.subplots(1, len(ratios), figsize=(4.2 * len(ratios), 3.8), squeeze=False, sharey=True)
    base = rows[rows["method"] == BASELINE]
    for ax, ratio in zip(axes[0], ratios):
        panel = rows[(rows["keep_ratio"] == ratio) & (rows["method"] != BASELINE)]
        palette, markers, dashes = _variant_styles(panel) if len(panel) else ({}, {}, {})
        for r in panel.set_index("variant", drop=False).loc[list(palette)].itertuples():  # legend in method order
            blocks = np.arange(len(r.tokens_per_block))
            ax.plot(blocks, r.tokens_per_block, color=palette[r.variant], marker=markers[r.variant],
                    dashes=dashes[r.variant] or (None, None), label=r.variant, ms=5)
            sched = _idle_tokens(getattr(r, "blocks", None))
            if sched and any(idle for _, idle in sched):
                active, idle = np.array(sched).T
                ax.fill_between(np.arange(len(active)), active, active + idle, color=palette[r.variant], alpha=0.15,
                                hatch="//",
                                label=f"{r.variant}: idle")
        for r in base.itertuples():
            ax.plot(np.arange(len(r.tokens_per_block)), r.tokens_per_block, color="black", ls="--",
                    label="baseline (none)")
        ax.set(xlabel="block", ylabel="tokens in attention (incl. prefix)", title=f"{model}, keep {ratio:g}")
        if _hierarchical(rows):  # Swin: 3136 tokens in stage 1, 49 in stage 4
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend_outside(fig, list(axes[0]))
    return fig


def _hierarchical(rows: pd.DataFrame) -> bool:
    """Whether the rows' FLOPs records have per-stage counts (a Swin): token counts span orders of magnitude."""
    return "stage_gmacs" in rows and rows["stage_gmacs"].map(lambda v: isinstance(v, list)).any()


def stage_gmacs(summary: pd.DataFrame, model: str):
    """GMACs of every stage (its PatchMerging included), per method variant: a panel per keep ratio, the
    unpatched model as a black outline. Only for hierarchical models (the FLOPs job's `stage_gmacs`)."""
    rows = summary[(summary["model"] == model) & summary["stage_gmacs"].map(lambda v: isinstance(v, list))]
    rows = rows.drop_duplicates(["variant", "keep_ratio"])
    base = rows[rows["method"] == BASELINE]
    ratios = sorted(rows.loc[rows["method"] != BASELINE, "keep_ratio"].unique(), reverse=True) or [1.0]
    fig, axes = plt.subplots(1, len(ratios), figsize=(4.2 * len(ratios), 3.8), squeeze=False, sharey=True)
    for ax, ratio in zip(axes[0], ratios):
        panel = rows[(rows["keep_ratio"] == ratio) & (rows["method"] != BASELINE)]
        palette = _variant_styles(panel)[0] if len(panel) else {}
        width = 0.8 / max(len(palette), 1)
        for k, r in enumerate(panel.set_index("variant", drop=False).loc[list(palette)].itertuples()):
            stages = np.arange(len(r.stage_gmacs))
            ax.bar(stages - 0.4 + (k + 0.5) * width, r.stage_gmacs, width, color=palette[r.variant], label=r.variant)
        for r in base.itertuples():
            ax.bar(np.arange(len(r.stage_gmacs)), r.stage_gmacs, 0.9, fill=False, edgecolor="black",
                   label="baseline (none)")
        ax.set(xlabel="stage", ylabel="GMACs per image", title=f"{model}, keep {ratio:g}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, axis="y")
    _legend_outside(fig, list(axes[0]))
    return fig


def varied_options(summary: pd.DataFrame) -> list[str]:
    """Option names (and 'layers') that take more than one value for some model and method."""
    varied = set()
    for _, group in summary.groupby(["model", "method"]):
        names = {k for d in group["options"] for k in d}
        varied |= {k for k in names if len({d.get(k) for d in group["options"]}) > 1}
        if group["layers"].nunique() > 1:
            varied.add("layers")
    return sorted(varied)


def ablation(summary: pd.DataFrame, option: str, y: str = "top1", ylabel: str = "Top-1 accuracy (%)"):
    """A metric against the value of one varied option; one line per method and keep ratio."""
    rows = summary[(summary["method"] != BASELINE) & summary[y].notna()].copy()
    if option == "layers":
        rows["value"] = [",".join(map(str, layers)) or "default" for layers in rows["layers"]]
    else:  # display text of each value, for the category axis
        rows["value"] = [_value_text(options[option]) if option in options else _default(m, option)
                         for options, m in zip(rows["options"], rows["method"])]
    varied = rows.groupby(["model", "method"])["value"].transform("nunique") > 1
    rows = rows[varied]  # only the methods this ablation is about
    prefix = rows["model"] + ": " if rows["model"].nunique() > 1 else ""
    rows["series"] = prefix + rows["method"] + ", keep " + rows["keep_ratio"].map("{:g}".format)
    order = sorted(rows["value"].unique(), key=_numeric_first)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    series = rows[["series", "method", "keep_ratio"]].drop_duplicates().sort_values(["method", "keep_ratio"])
    ratios = sorted(rows["keep_ratio"].unique(), reverse=True)
    palette = {s.series: method_style(s.method)["color"] for s in series.itertuples()}
    # colour and marker say the method, the line style the keep ratio
    sns.pointplot(data=rows, x="value", y=y, hue="series", order=order, hue_order=list(palette), palette=palette,
                  markers=[method_style(s.method)["marker"] for s in series.itertuples()],
                  linestyles=[_LINESTYLES[ratios.index(s.keep_ratio) % len(_LINESTYLES)] for s in series.itertuples()],
                  errorbar=None, ax=ax)
    ax.set(xlabel=option, ylabel=ylabel, title=f"Ablation: {option}")
    ax.grid(alpha=0.3)
    _legend_outside(fig, [ax])
    return fig


def _value_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _default(method: str, option: str) -> str:
    """How an option left at its default is shown: 'True (default)'."""
    try:
        return f"{methods.get_method(method).options[option].default} (default)"
    except (methods.MethodError, KeyError):
        return "default"


def _numeric_first(value: str):
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, str(value))


def _throughput_conditions(summary: pd.DataFrame, model: str) -> str:
    """' (batch 64, fp32, NVIDIA H100)' for an axis label; empty when nothing was timed."""
    cols = [c for c in ("tp_batch_size", "tp_dtype", "device_name") if c in summary]
    rows = summary.loc[(summary["model"] == model) & summary.get("img_s", pd.Series(dtype=float)).notna(), cols]
    if rows.empty or len(cols) < 3:
        return ""
    parts = [", ".join(sorted({f"{v:g}" if isinstance(v, float) else str(v) for v in rows[c].dropna()})) for c in cols]
    return f" (batch {parts[0]}, {parts[1]}, {parts[2]})"


def write_figures(tidy: pd.DataFrame, summary: pd.DataFrame, out_dir) -> dict[str, Path]:
    """All figures the records support; returns {name: png path} (a PDF lies beside each PNG)."""
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    for model in sorted(summary["model"].unique()):
        slug = model.replace("/", "_")
        for x, xlabel, name in (("gmacs", "GMACs per image", "top1_vs_gmacs"),
                                ("img_s", f"images / s{_throughput_conditions(summary, model)}", "top1_vs_throughput")):
            if {"top1", x} <= set(summary) and (summary["top1"].notna() & summary[x].notna()).any():
                paths[f"{name} ({model})"] = save_figure(tradeoff(summary, x, xlabel, model), out_dir / f"{name}_{slug}")
        if (tidy.get("kind") == "throughput").any():
            paths[f"throughput_vs_batch ({model})"] = save_figure(throughput_vs_batch(tidy, model),
                                                            out_dir / f"throughput_vs_batch_{slug}")
        if len(_swept(tidy, model)):
            paths[f"speedup_vs_batch ({model})"] = save_figure(speedup_vs_batch(tidy, model),
                                                          out_dir / f"speedup_vs_batch_{slug}")
        if "tokens_per_block" in summary and summary["tokens_per_block"].map(lambda t: isinstance(t, list)).any():
            paths[f"tokens_per_layer ({model})"] = save_figure(tokens_per_layer(summary, model),
                                                         out_dir / f"tokens_per_layer_{slug}")
        if _hierarchical(summary[summary["model"] == model]):
            paths[f"stage_gmacs ({model})"] = save_figure(stage_gmacs(summary, model), out_dir / f"stage_gmacs_{slug}")
    for option in varied_options(summary):
        for y, ylabel in (("top1", "Top-1 accuracy (%)"), ("gmacs", "GMACs per image")):
            if y in summary and summary[y].notna().any():
                safe = option.replace("/", "_")
                paths[f"ablation {option} ({y})"] = save_figure(ablation(summary, option, y, ylabel),
                                                         out_dir / f"ablation_{safe}_{y}")
    return paths
