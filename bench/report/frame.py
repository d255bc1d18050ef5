"""Records of one or more runs -> one tidy DataFrame, and the summary every report part reads.

The tidy frame has one row per record (finished or failed). Its method options are real data: a dict
in `options`, one `opt.<name>` column per option, and a hashable `options_key` (sorted pairs) to group
and merge on; nothing is written as text and parsed back. A summary row is one configuration
(model, method, options, layers, keep ratio) with one set of weights (checkpoint, regime) under one set
of measurement conditions; its accuracy, FLOPs and throughput come from separate jobs, merged on the
configuration (FLOPs and throughput do not depend on the weights), and any of them may be missing.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import pandas as pd

import methods

from .. import jobs
from ..records import preds_path, scan
from ..spec import OFF_THE_SHELF
from ..training.recipe import regime_label
from . import calibration, stats

BASELINE = "none"
ALPHA = stats.DEFAULT_ALPHA  # significance level of the paired tests the tables mark
ARCH = ["model", "method", "options_key", "layers", "keep_ratio"]  # what FLOPs and timings depend on
# What accuracy adds. The seed belongs here: a finetuned model's weights depend on it, and with --seeds
# one configuration has a record per seed, which must stay apart (docs/protocol.md#seeds).
WEIGHTS = ["checkpoint", "pretrained", "random_weights", "regime", "finetune", "seed"]
CONFIG = ARCH + WEIGHTS
# Spec fields that a metric dict may repeat with the value actually used (throughput's batch size).
_SPEC_COLLISIONS = ("batch_size", "dtype", "device")


class ReportError(ValueError):
    """A run folder or option the user gave cannot be reported."""


def _record_row(rec, run_dir: Path) -> dict:
    spec, env = rec.spec, rec.data.get("env") or {}
    options = spec.options()
    row = dict(
        run=str(run_dir), key=rec.key, status=rec.status, kind=spec.kind, model=spec.model, method=spec.method,
        keep_ratio=float(spec.keep_ratio), options=options, options_key=spec.method_options,
        layers=tuple(spec.layers or ()), regime=spec.regime, finetune=spec.finetune, dtype=spec.dtype,
        device=spec.device, batch_size=int(spec.batch_size), data=spec.data, limit=spec.limit,
        checkpoint=spec.checkpoint or "", pretrained=bool(spec.pretrained), random_weights=bool(spec.random_weights),
        seed=spec.seed, finished=rec.data.get("finished"), error=rec.data.get("error"),
        device_name=env.get("device_name"), torch=env.get("torch"), timm=env.get("timm"),
        git_commit=env.get("git_commit"), git_dirty=env.get("git_dirty"),
    )
    row.update({f"opt.{name}": value for name, value in options.items()})
    for name, value in rec.metrics.items():
        row[f"{name}_used" if name in _SPEC_COLLISIONS else name] = value
    row["regime"] = regime_label(spec.method, spec.finetune)  # names any setting off the method's defaults
    if rec.metrics.get("preds_file"):
        row["preds_path"] = str(preds_path(run_dir, rec.key).with_name(rec.metrics["preds_file"]))
    return row


def load_runs(run_dirs) -> pd.DataFrame:
    """Tidy frame, one row per record (finished or failed) of all runs; the latest record of a key wins."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    rows, problems = [], []
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise ReportError(f"run folder {str(run_dir)!r} does not exist")
        done, failed, bad = scan(run_dir)
        problems += bad
        rows += [_record_row(rec, run_dir) for rec in (*done.values(), *failed.values())]
    df = pd.DataFrame(rows, columns=None if rows else ["run", "key", "status", "kind", *CONFIG])
    if len(df):
        # A finished record beats a failed one, then the newest wins (runs merged from several machines).
        df = df.sort_values(["status", "finished"], ascending=[False, True], na_position="first")
        df = df.drop_duplicates("key", keep="last").reset_index(drop=True)
    df.attrs["problems"] = problems
    return df


# ----------------------------------------------------------------------------------------------
# Summary

def _part(tidy: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The latest finished record of each configuration and conditions of one kind."""
    part_of = jobs.get(kind).report
    if "kind" not in tidy or not (tidy["kind"] == kind).any():
        return pd.DataFrame()
    keys = (CONFIG if kind == "acc" else ARCH) + list(part_of.conditions)
    part = tidy[(tidy["kind"] == kind) & (tidy["status"] == "ok")].rename(columns=part_of.renames)
    part = part.sort_values("finished").drop_duplicates(keys, keep="last")
    values = list(part_of.values)
    if kind == "throughput":  # the table shows the largest batch; the sweep is in its own figure
        part = part.sort_values("tp_batch_size").drop_duplicates(keys[:-1], keep="last")
    if kind == "acc":
        cis = [stats.ci_of_file(p) for p in part.get("preds_path", pd.Series([None] * len(part), index=part.index))]
        part["top1_ci_low"], part["top1_ci_high"] = [c[0] for c in cis], [c[1] for c in cis]
        values += ["top1_ci_low", "top1_ci_high"]
        scores = [calibration.of_file(p) for p in part.get("preds_path", pd.Series([None] * len(part), index=part.index))]
        for name in calibration.NAN_RESULT:  # ECE, Brier and their CIs; NaN for old predictions files
            part[name] = [score[name] for score in scores]
        values += list(calibration.NAN_RESULT)
    return part[[c for c in keys + values if c in part]]


def summarize(tidy: pd.DataFrame) -> pd.DataFrame:
    """Machine-readable summary (every column of summary.csv), sorted for reading."""
    # Kinds without summary values (trace) are read by their own report parts, not merged here.
    parts = [(kind, p) for kind in jobs.measuring()
             if jobs.get(kind).report.values and not (p := _part(tidy, kind)).empty]
    if not parts:
        return pd.DataFrame(columns=CONFIG + ["options", "variant"])
    summary = functools.reduce(
        lambda a, b: a.merge(b, on=[c for c in (CONFIG if "checkpoint" in b else ARCH) if c in a], how="outer"),
        [p for _, p in parts])
    for column, fill in (("checkpoint", ""), ("pretrained", False), ("random_weights", False),
                         ("regime", "off-the-shelf"), ("finetune", ()), ("seed", None)):
        summary[column] = summary[column].map(lambda v, f=fill: f if _missing(v) else v) if column in summary else [fill] * len(summary)
    summary["options"] = summary["options_key"].map(dict)
    summary["variant"] = summary.apply(variant_label, axis=1)
    summary = _add_deltas(summary)
    order = methods.available()  # registry order: the order of --help and of every table
    summary["_order"] = summary["method"].map(lambda m: order.index(m) if m in order else len(order))
    summary["_options"] = summary["options_key"].map(str)
    summary = summary.sort_values(["model", "_order", "method", "_options", "layers", "regime", "keep_ratio", "seed"],
                                  ascending=[True] * 6 + [False, True], kind="stable")
    return summary.drop(columns=["_order", "_options"]).reset_index(drop=True)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def variant_label(row) -> str:
    """Method plus what distinguishes its curves: options, explicit layers, regime."""
    label = str(row["method"])
    extra = [f"{k}={_show(v)}" for k, v in sorted(dict(row.get("options_key") or ()).items())]
    if row.get("layers"):
        extra.append("layers=" + ",".join(map(str, row["layers"])))
    if extra:
        label += f" ({', '.join(extra)})"
    if row.get("regime") not in (None, "off-the-shelf") and not _missing(row.get("regime")):
        label += f" [{row['regime']}]"
    return label


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _baseline_index(summary: pd.DataFrame, row, match: list[str], value: str, off_the_shelf: bool = False):
    """Index of the `none` row matching `row` on `match` that has `value` measured. An accuracy
    baseline (`off_the_shelf`) is the released model, off the shelf, whatever regime the row is in."""
    base = summary[(summary["method"] == BASELINE) & summary[value].notna()]
    if off_the_shelf:
        base = base[base["regime"] == OFF_THE_SHELF]
    for col in match:
        base = base[base[col].isna()] if _missing(row[col]) else base[base[col] == row[col]]
    return None if base.empty else base.index[0]


_ACC_MATCH = ["model", "checkpoint", "pretrained", "random_weights", "data", "limit", "acc_dtype", "acc_device"]


def _add_deltas(summary: pd.DataFrame) -> pd.DataFrame:
    summary = summary.assign(delta_top1=math.nan, delta_top1_p=math.nan, delta_gmacs_pct=math.nan,
                             delta_top1_significant=pd.Series([None] * len(summary), dtype=object, index=summary.index))
    for i, row in summary.iterrows():
        if "top1" in summary and pd.notna(row["top1"]):
            b = _baseline_index(summary, row, [c for c in _ACC_MATCH if c in summary], "top1", off_the_shelf=True)
            if b is not None:
                summary.at[i, "delta_top1"] = row["top1"] - summary.at[b, "top1"]
                p = stats.paired_p_of_files(row.get("preds_path"), summary.at[b, "preds_path"]) \
                    if "preds_path" in summary else math.nan
                summary.at[i, "delta_top1_p"] = p
                summary.at[i, "delta_top1_significant"] = None if math.isnan(p) else bool(p < stats.DEFAULT_ALPHA)
        if "gmacs" in summary and pd.notna(row["gmacs"]):
            b = _baseline_index(summary, row, ["model"], "gmacs")
            if b is not None:
                summary.at[i, "delta_gmacs_pct"] = 100.0 * (row["gmacs"] / summary.at[b, "gmacs"] - 1.0)
    return summary


def noise_floor(summary: pd.DataFrame) -> pd.DataFrame:
    """The null comparison of every timed condition: the unpatched model timed against a copy of
    itself, whose speedup and CI bound what a difference between methods can mean there."""
    cols = ["model", "tp_device", "tp_dtype", "tp_batch_size", "device_name", "speedup", "speedup_ci_low",
            "speedup_ci_high", "repeats"]
    if "speedup" not in summary:
        return pd.DataFrame(columns=cols)
    rows = summary[(summary["method"] == BASELINE) & summary["speedup"].notna()]
    return rows.reindex(columns=cols).drop_duplicates(cols[:4]).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# Seeds: one display row per configuration run with several seeds

SEED_OPTION = "seed"  # a method's own randomness (random keep-K); --seeds sets it with the spec's seed
SEED_METRICS = ("top1", "top5", "delta_top1", "ece", "brier", "gmacs", "delta_gmacs_pct", "img_s", "speedup",
                "peak_mem_mb")
_SEED_GROUP = ["model", "method", "_unseeded", "layers", "keep_ratio", "checkpoint", "pretrained", "random_weights",
               "regime", "finetune", "data", "limit", "acc_dtype", "acc_device", "tp_device", "tp_dtype",
               "tp_batch_size"]
# Per-seed uncertainty that a mean over seeds does not have: cleared rather than shown for one seed.
_PER_SEED = ("top1_ci_low", "top1_ci_high", "ece_ci_low", "ece_ci_high", "brier_ci_low", "brier_ci_high",
             "speedup_ci_low", "speedup_ci_high", "delta_top1_p", "preds_path")


def collapse_seeds(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with every group of rows that differ only in their seed (the spec's seed and a seed
    option) as one row: each metric of SEED_METRICS the mean over seeds, `<metric>_std` the sample
    standard deviation (ddof 1), `seeds` the seeds and `n_seeds` their count. Other rows pass with
    n_seeds 1. For display (tables, figures); summary.csv keeps one row per seed."""
    out = summary.assign(n_seeds=1, seeds=[[s] if not _missing(s) else [] for s in summary.get("seed", [None] * len(summary))])
    if summary.empty or "options_key" not in summary:
        return out
    out["_unseeded"] = out["options_key"].map(lambda o: tuple((k, v) for k, v in o if k != SEED_OPTION))
    seed_of = out.apply(_seed_of, axis=1)
    rows = []
    for _, group in out.groupby([c for c in _SEED_GROUP if c in out], dropna=False, sort=False):
        seeds = seed_of[group.index]
        if len(group) == 1 or seeds.isna().any() or seeds.nunique() < len(group):  # not only seeds differ
            rows += [r for _, r in group.iterrows()]
            continue
        row = group.iloc[0].copy()
        for metric in (m for m in SEED_METRICS if m in group):
            values = pd.to_numeric(group[metric], errors="coerce").dropna()
            row[metric] = values.mean() if len(values) else math.nan
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        for name in (n for n in _PER_SEED if n in row):
            row[name] = None if name == "preds_path" else math.nan
        row["delta_top1_significant"] = None
        row["options_key"], row["seed"] = row["_unseeded"], None
        row["options"] = dict(row["options_key"])
        row["seeds"], row["n_seeds"] = sorted(int(s) for s in seeds), len(group)
        row["variant"] = variant_label(row)
        rows.append(row)
    collapsed = pd.DataFrame(rows).drop(columns="_unseeded").infer_objects()  # rows came as object Series
    return collapsed.reset_index(drop=True)


def _seed_of(row):
    """A row's seed: its seed option (the default one where the option was left out), else the spec's."""
    options = dict(row["options_key"])
    if SEED_OPTION in options:
        return int(options[SEED_OPTION])
    method = methods.get_method(row["method"]) if row["method"] in methods.available() else None
    if method is not None and SEED_OPTION in method.options:
        return int(method.options[SEED_OPTION].default)
    return None if _missing(row.get("seed")) else int(row["seed"])
