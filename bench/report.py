"""Reports: records of one or more runs -> summary.csv, table.md, table.tex, figures and report.md.

    python -m bench.report results/flops-laptop results/acc-cluster --out results/combined

Records are merged across runs (the latest record of a job key wins). A row of the summary is one
configuration (model, method, options, layers, keep ratio, finetune epochs) under one set of
measurement conditions; its accuracy, FLOPs and throughput come from separate jobs, and any of them
may be missing. Deltas are taken against the unpatched (`none`) row measured under the same
conditions as the metric in question: same data/limit/dtype/device for top-1, same
device/dtype/batch size for throughput.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import methods

from . import stats
from .records import preds_path, scan
from .spec import GridError, load_grid

BASELINE = "none"
CONFIG = ["model", "checkpoint", "pretrained", "method", "options", "layers", "keep_ratio", "finetune_epochs"]
ACC_CONDITIONS = ["data", "limit", "acc_dtype", "acc_device"]
TP_CONDITIONS = ["tp_device", "tp_dtype", "tp_batch_size"]
PUBLISHED_CSV = Path(__file__).resolve().parent / "assets" / "published.csv"
# Spec fields that a metric dict may repeat with the value actually used (throughput's batch size).
_SPEC_COLLISIONS = ("batch_size", "dtype", "device")


class ReportError(ValueError):
    """A run folder or option the user gave cannot be reported."""


# ----------------------------------------------------------------------------------------------
# Loading

def options_text(options: dict) -> str:
    """Canonical text of method options as the user gave them: 'fuse=False,sigma=0.5'."""
    return ",".join(f"{k}={v}" for k, v in sorted(options.items()))


def parse_options_text(text) -> dict[str, str]:
    """The inverse of `options_text` ('fuse=False,r=[8, 8, 4]' -> {'fuse': 'False', 'r': '8,8,4'}):
    commas inside a list value belong to it, and a list comes back in the comma spelling the
    methods' option parsers take. ';' also separates (published.csv)."""
    parts, depth, current = [], 0, ""
    for char in str(text or ""):
        depth += (char in "[(") - (char in "])")
        if char in ",;" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    out = {}
    for part in parts:
        name, found, value = part.strip().partition("=")
        if found:
            value = value.strip()
            if value[:1] in "[(" and value[-1:] in "])":
                value = ",".join(v.strip() for v in value[1:-1].split(",") if v.strip())
            out[name.strip()] = value
    return out


def _record_row(rec, run_dir: Path) -> dict:
    spec = rec.spec
    row = dict(
        run=str(run_dir), key=rec.key, status=rec.status, metric=spec.metric, model=spec.model,
        method=spec.method, keep_ratio=float(spec.keep_ratio), options=options_text(spec.options()),
        layers=",".join(map(str, spec.layers)) if spec.layers is not None else "",
        finetune_epochs=int(spec.finetune_epochs), dtype=spec.dtype, device=spec.device,
        batch_size=int(spec.batch_size), data=spec.data, limit=spec.limit, checkpoint=spec.checkpoint or "",
        pretrained=bool(spec.pretrained), seed=spec.seed, finished=rec.data.get("finished"),
        error=rec.data.get("error"),
    )
    row.update({f"opt.{k}": v for k, v in spec.options().items()})
    env = rec.data.get("env") or {}
    row.update(device_name=env.get("device_name"), torch=env.get("torch"), timm=env.get("timm"))
    for name, value in rec.metrics.items():
        row[f"{name}_used" if name in _SPEC_COLLISIONS else name] = value
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
    df = pd.DataFrame(rows, columns=None if rows else ["run", "key", "status", "metric", *CONFIG])
    if len(df):
        # A finished record beats a failed one, then the newest wins (runs merged from several machines).
        df = df.sort_values(["status", "finished"], ascending=[False, True], na_position="first")
        df = df.drop_duplicates("key", keep="last").reset_index(drop=True)
    df.attrs["problems"] = problems
    return df


# ----------------------------------------------------------------------------------------------
# Summary: one row per configuration and measurement conditions

# Per metric: spec fields renamed to say which measurement they condition, the conditions that
# keep two records of one configuration apart, and the metric values the summary keeps.
_PARTS = {
    "acc": (dict(dtype="acc_dtype", device="acc_device"), ACC_CONDITIONS,
            ["top1", "top5", "n_images", "preds_path", "tokens_per_block"]),
    "flops": ({}, [], ["gmacs", "gmacs_no_overhead", "gmacs_fvcore", "params_m", "tokens_per_block"]),
    "throughput": (dict(device="tp_device", dtype="tp_dtype", batch_size="tp_batch_size"), TP_CONDITIONS,
                   ["batch_size_used", "device_name", "img_s", "img_s_q25", "img_s_q75", "baseline_img_s",
                    "speedup", "latency_ms", "peak_mem_mb", "repeats"]),
}


def _part(tidy: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The latest finished record of each configuration and conditions of one metric."""
    renames, conditions, values = _PARTS[metric]
    if "metric" not in tidy or not (tidy["metric"] == metric).any():
        return pd.DataFrame()
    part = tidy[(tidy["metric"] == metric) & (tidy["status"] == "ok")].rename(columns=renames)
    part = part.sort_values("finished").drop_duplicates(CONFIG + conditions, keep="last")
    if metric == "throughput":  # the table shows the largest batch; the sweep is in its own figure
        part = part.sort_values("tp_batch_size").drop_duplicates(CONFIG + conditions[:2], keep="last")
    if metric == "acc":
        cis = [stats.ci_of_file(p) for p in part.get("preds_path", pd.Series([None] * len(part), index=part.index))]
        part["top1_ci_low"], part["top1_ci_high"] = [c[0] for c in cis], [c[1] for c in cis]
        part = part.rename(columns={"tokens_per_block": "acc_tokens"})
        values = values[:-1] + ["top1_ci_low", "top1_ci_high", "acc_tokens"]
    return part[[c for c in CONFIG + conditions + values if c in part]]


def summarize(tidy: pd.DataFrame) -> pd.DataFrame:
    """Machine-readable summary (every column of summary.csv), sorted for reading."""
    parts = [p for p in (_part(tidy, m) for m in _PARTS) if not p.empty]
    if not parts:
        return pd.DataFrame(columns=CONFIG)
    summary = functools.reduce(lambda a, b: a.merge(b, on=CONFIG, how="outer"), parts)
    tokens = [c for c in ("tokens_per_block", "acc_tokens") if c in summary]
    summary["tokens_per_block"] = summary[tokens].apply(
        lambda r: next((v for v in r if isinstance(v, list)), None), axis=1)
    summary = summary.drop(columns=["acc_tokens"], errors="ignore")
    summary = _add_deltas(summary)
    summary = _add_published(summary)
    summary["variant"] = summary.apply(variant_label, axis=1)
    order = methods.available()  # registry order: the order of --help and of every table
    summary["_order"] = summary["method"].map(lambda m: order.index(m) if m in order else len(order))
    summary = summary.sort_values(["model", "_order", "method", "options", "layers", "finetune_epochs", "keep_ratio"],
                                  ascending=[True] * 6 + [False], kind="stable")
    return summary.drop(columns="_order").reset_index(drop=True)


def variant_label(row) -> str:
    """Method plus what distinguishes its curves: options, explicit layers, finetuning."""
    label = str(row["method"])
    extra = [x for x in (row.get("options") or "", f"layers={row['layers']}" if row.get("layers") else "") if x]
    if extra:
        label += f" ({', '.join(extra)})"
    if row.get("finetune_epochs"):
        label += f" ft{int(row['finetune_epochs'])}"
    return label


def _baseline_index(summary: pd.DataFrame, row, conditions: list[str], value: str):
    """Index of the `none` row matching `row` on model and `conditions` that has `value` measured;
    prefer the same finetune epochs, then off-the-shelf."""
    base = summary[(summary["method"] == BASELINE) & summary[value].notna()]
    for col in ["model", *conditions]:
        base = base[base[col].isna()] if pd.isna(row[col]) else base[base[col] == row[col]]
    if base.empty:
        return None
    same_ft = base[base["finetune_epochs"] == row["finetune_epochs"]]
    return (same_ft if len(same_ft) else base.sort_values("finetune_epochs")).index[0]


def _add_deltas(summary: pd.DataFrame) -> pd.DataFrame:
    summary = summary.assign(delta_top1=math.nan, delta_top1_p=math.nan, delta_gmacs_pct=math.nan,
                             delta_top1_significant=pd.Series([None] * len(summary), dtype=object, index=summary.index))
    for i, row in summary.iterrows():
        if "top1" in summary and pd.notna(row["top1"]):
            b = _baseline_index(summary, row, ["checkpoint", "pretrained", *ACC_CONDITIONS], "top1")
            if b is not None:
                summary.at[i, "delta_top1"] = row["top1"] - summary.at[b, "top1"]
                p = stats.paired_p_of_files(row.get("preds_path"), summary.at[b, "preds_path"]) \
                    if "preds_path" in summary else math.nan
                summary.at[i, "delta_top1_p"] = p
                summary.at[i, "delta_top1_significant"] = None if math.isnan(p) else bool(p < stats.DEFAULT_ALPHA)
        if "gmacs" in summary and pd.notna(row["gmacs"]):
            b = _baseline_index(summary, row, [], "gmacs")
            if b is not None:
                summary.at[i, "delta_gmacs_pct"] = 100.0 * (row["gmacs"] / summary.at[b, "gmacs"] - 1.0)
    return summary


def load_published(path=None) -> pd.DataFrame:
    """Published figures (bench/assets/published.csv); empty when the file is absent."""
    path = Path(path or PUBLISHED_CSV)
    return pd.read_csv(path, dtype={"method_options": str}) if path.is_file() else pd.DataFrame()


def _full_options(method: str, text) -> str:
    """Options with the method's defaults filled in and values in one spelling ('fuse=true'), so that
    a run with default options matches a published row that states them, and True matches 'true'."""
    given = parse_options_text(text)
    try:
        declared = methods.get_method(method).options
        given = {k: opt.coerce(k, given.get(k, opt.default)) for k, opt in declared.items()}
    except methods.MethodError:  # not registered here: compare as written
        pass
    return options_text({k: str(v).strip().lower() for k, v in given.items()})


_PUBLISHED = {"top1": "published_top1", "gmacs": "published_gmacs", "gmacs_convention": "published_gmacs_convention",
              "source": "published_source"}


def _add_published(summary: pd.DataFrame) -> pd.DataFrame:
    """Published figures for the same model, method, options and keep ratio, beside ours."""
    pub, summary = load_published(), summary.assign(**{c: None for c in _PUBLISHED.values()})
    if pub.empty or not {"model", "method", "keep_ratio"} <= set(pub):
        return summary
    aliases = {a: m for m in methods.available() for a in (m, *methods.get_method(m).aliases)}
    pub["method"] = pub["method"].map(lambda m: aliases.get(str(m).lower(), m))  # "baseline" is none
    pub["options"] = [_full_options(m, o) for m, o in zip(pub["method"], pub.get("method_options", [""] * len(pub)))]
    pub["keep_ratio"] = pd.to_numeric(pub["keep_ratio"], errors="coerce")
    for i, row in summary.iterrows():
        hit = pub[(pub["model"] == row["model"]) & (pub["method"] == row["method"])
                  & np.isclose(pub["keep_ratio"], row["keep_ratio"])
                  & (pub["options"] == _full_options(row["method"], row["options"]))]
        if len(hit):
            summary.loc[i, list(_PUBLISHED.values())] = [hit.iloc[0].get(c) for c in _PUBLISHED]
    # Ours counted as the paper counted: with or without the method's own overhead (predictors, matching).
    without = summary["published_gmacs_convention"].astype(str).str.contains("without|no_overhead")
    summary["gmacs_as_published"] = np.where(without, summary.get("gmacs_no_overhead", np.nan),
                                             summary.get("gmacs", np.nan))
    return summary


# ----------------------------------------------------------------------------------------------
# Paper-style tables

def tokens_per_stage(tokens) -> str:
    """Block token counts collapsed to stages: [50,50,35,35] -> '50→35'."""
    if not isinstance(tokens, (list, tuple)) or not tokens:
        return ""
    stages = [str(int(tokens[0]))] + [str(int(t)) for prev, t in zip(tokens, tokens[1:]) if t != prev]
    if len(stages) > 5:  # ToMe changes the count at every block: ends and the number of stages
        return f"{'→'.join(stages[:2])}→…→{stages[-1]} ({len(stages)} stages)"
    return "→".join(stages)


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None or pd.isna(value) else f"{value:{spec}}{suffix}"


def _fmt_top1(row) -> str:
    text = _fmt(row.get("top1"), ".2f")
    if text and pd.notna(row.get("top1_ci_low")):
        text += f" [{row['top1_ci_low']:.2f}, {row['top1_ci_high']:.2f}]"
    return text


def _fmt_gmacs(value) -> str:
    """Two decimals, as papers print GMACs; small models (the embedded one is ~0.03) get 3 significant digits."""
    return _fmt(value, ".2f" if pd.isna(value) or abs(value) >= 0.1 else ".3g")


def _fmt_delta_top1(row) -> str:
    if row["method"] == BASELINE:
        return "—" if pd.notna(row.get("top1")) else ""
    text = _fmt(row.get("delta_top1"), "+.2f")
    if text and row.get("delta_top1_significant") is False:
        text += " (n.s.)"
    return text


def _fmt_rate(value) -> str:
    """Whole images per second, but 3 significant digits below 100 (a slow CPU at batch 1)."""
    return _fmt(value, ",.0f" if pd.isna(value) or abs(value) >= 100 else ".3g")


def _fmt_img_s(row) -> str:
    text = _fmt_rate(row.get("img_s"))
    if text:  # the batch actually run (after any OOM back-off), dtype and the device's name
        bs = row.get("batch_size_used") if pd.notna(row.get("batch_size_used")) else row.get("tp_batch_size")
        text += f" (bs {int(bs)}, {row.get('tp_dtype')}, {row.get('device_name') or row.get('tp_device')})"
    return text


TABLE_COLUMNS = {
    "Model": lambda r: r["model"],
    "Method": variant_label,
    "Keep": lambda r: _fmt(r["keep_ratio"], "g"),
    "Tokens per stage": lambda r: tokens_per_stage(r.get("tokens_per_block")),
    "Finetune epochs": lambda r: str(int(r["finetune_epochs"])),
    "Top-1 [95% CI]": _fmt_top1,
    "ΔTop-1": _fmt_delta_top1,
    "GMACs": lambda r: _fmt_gmacs(r.get("gmacs")),
    "ΔGMACs %": lambda r: ("—" if r["method"] == BASELINE and pd.notna(r.get("gmacs"))
                           else _fmt(r.get("delta_gmacs_pct"), "+.1f")),
    "img/s": _fmt_img_s,
    "Speedup ×": lambda r: _fmt(r.get("speedup"), ".2f", "×"),
    "Peak memory": lambda r: _fmt(r.get("peak_mem_mb"), ",.0f", " MB"),
}


def paper_table(summary: pd.DataFrame, columns: dict = TABLE_COLUMNS) -> pd.DataFrame:
    """Display strings, one row per summary row, in the order of `columns` (name -> formatter)."""
    rows = [{name: fn(row) for name, fn in columns.items()} for _, row in summary.iterrows()]
    return pd.DataFrame(rows, columns=list(columns))


def conditions_text(summary: pd.DataFrame) -> str:
    """The measurement conditions, for captions."""
    def values(col):
        return sorted({str(v) for v in summary[col].dropna()}) if col in summary else []

    parts = []
    if values("data"):
        limits = sorted({str(int(v)) for v in summary["limit"].dropna()}) if "limit" in summary else []
        first = f" (first {', '.join(limits)} images)" if limits else ""
        parts.append(f"top-1 on {', '.join(values('data'))}{first}"
                     + " with a percentile-bootstrap 95% CI over images; ΔTop-1 marked n.s. when McNemar's "
                     f"mid-p test against the baseline on the same images gives p ≥ {stats.DEFAULT_ALPHA}")
    if "gmacs" in summary:
        parts.append("GMACs analytic per image, the method's own overhead included")
    if values("tp_device"):
        parts.append(f"throughput median over repeats on {', '.join(values('device_name') or values('tp_device'))}, "
                     f"{', '.join(values('tp_dtype'))}, largest batch measured; speedup is the median of "
                     "per-repeat ratios to the baseline measured interleaved in the same process")
    return "; ".join(parts) + "." if parts else "No measurements."


# Symbols the display tables use, in math mode so that pdflatex needs no Unicode setup.
_LATEX_SYMBOLS = {"Δ": r"$\Delta$", "×": r"$\times$", "→": r"$\to$", "≥": r"$\geq$", "—": "---"}


def _latex_escape(text: str) -> str:
    """pandas escapes cells but not the caption; '%' there would comment out the rest of the line."""
    for char in "&%$#_":
        text = text.replace(char, "\\" + char)
    return text


def to_latex(table: pd.DataFrame, caption: str, label: str = "tab:tokenbench") -> str:
    """A booktabs table fragment with caption (no preamble: \\input{} it)."""
    text = table.to_latex(index=False, caption=_latex_escape(caption), label=label, escape=True, position="t")
    for symbol, tex in _LATEX_SYMBOLS.items():
        text = text.replace(symbol, tex)
    return text


CONSOLE_COLUMNS = {
    "model": lambda r: r["model"], "method": variant_label, "keep": lambda r: _fmt(r["keep_ratio"], "g"),
    "top-1": lambda r: _fmt(r.get("top1"), ".2f"), "GMACs": lambda r: _fmt_gmacs(r.get("gmacs")),
    "img/s": lambda r: _fmt_rate(r.get("img_s")), "speedup": lambda r: _fmt(r.get("speedup"), ".2f", "×"),
}


def console_table(run_dir) -> str:
    """Short text table for the terminal: model | method | keep | top-1 | GMACs | img/s | speedup."""
    summary = summarize(load_runs(run_dir))
    if summary.empty:
        return "(no finished records)"
    return paper_table(summary, CONSOLE_COLUMNS).to_markdown(index=False, tablefmt="simple", disable_numparse=True)


# ----------------------------------------------------------------------------------------------
# Writing

def _csv_ready(df: pd.DataFrame) -> pd.DataFrame:
    """Lists and dicts as JSON text, so the CSV round-trips through json.loads."""
    out = df.copy()
    for col in out.columns:
        if out[col].map(lambda v: isinstance(v, (list, dict, tuple))).any():
            out[col] = out[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict, tuple)) else v)
    return out


def write_report(run_dirs, out_dir=None, figures: bool = True, pictures: bool = True) -> dict[str, Path]:
    """Write summary.csv, table.md, table.tex, pairwise.csv, figures and report.md; returns their paths."""
    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    out = Path(out_dir) if out_dir is not None else Path(run_dirs[0])
    tidy = load_runs(run_dirs)  # before mkdir: a mistyped run folder must not be created
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(tidy)
    table = paper_table(summary)
    caption = conditions_text(summary)
    paths = dict(summary=out / "summary.csv", table_md=out / "table.md", table_tex=out / "table.tex",
                 records=out / "records.csv")
    _csv_ready(summary).to_csv(paths["summary"], index=False)
    _csv_ready(tidy).to_csv(paths["records"], index=False)
    paths["table_md"].write_text(table.to_markdown(index=False, disable_numparse=True) + "\n")
    paths["table_tex"].write_text(to_latex(table, caption))
    pairs = stats.pairwise_tests(summary, group_by=["model", "keep_ratio", "finetune_epochs", *ACC_CONDITIONS],
                                 exclude_method=BASELINE)
    if len(pairs):
        paths["pairwise"] = out / "pairwise.csv"
        pairs.to_csv(paths["pairwise"], index=False)
    figure_paths, notes = {}, []
    if figures and len(summary):
        from . import plots

        figure_paths = plots.write_figures(tidy, summary, out / "figures")
    if pictures and len(summary):
        from . import viz

        pics, skipped = viz.write_pictures(summary, out / "figures")
        figure_paths.update(pics)
        notes += [f"token pictures: {name} skipped ({why})" for name, why in skipped.items()]
    paths.update({f"figure:{k}": v for k, v in figure_paths.items()})
    paths["report"] = out / "report.md"
    paths["report"].write_text(
        _report_markdown(run_dirs, tidy, summary, table, caption, pairs, figure_paths, notes, out)
        + _pending_markdown(run_dirs, tidy))
    return paths


def pending_jobs(run_dirs, tidy: pd.DataFrame) -> list[tuple[str, str]]:
    """(key, run) of every job in a run's grid.json that has no record yet: queued, running or lost.
    A report built while jobs still run says so instead of passing the partial table off as whole."""
    recorded = set(tidy["key"]) if "key" in tidy else set()
    out = []
    for run_dir in run_dirs:
        try:
            specs = load_grid(run_dir)
        except GridError:  # a folder of records without a grid (merged or hand-made): nothing to compare
            continue
        out += [(spec.key, str(run_dir)) for spec in specs if spec.key not in recorded]
    return out


def _pending_markdown(run_dirs, tidy: pd.DataFrame) -> str:
    pending = pending_jobs(run_dirs, tidy)
    if not pending:
        return ""
    lines = ["## Pending jobs", "", f"{len(pending)} job(s) of the grid have no record yet "
             "(queued, running, or lost: `python run_all.py --collect RUN` says which):", ""]
    lines += [f"- `{key}` ({run})" for key, run in pending]
    return "\n".join(lines) + "\n"


def _report_markdown(run_dirs, tidy, summary, table, caption, pairs, figure_paths, notes, out: Path) -> str:
    lines = ["# tokenbench report", "", "Runs: " + ", ".join(f"`{r}`" for r in run_dirs), "",
             "## Results", "", table.to_markdown(index=False, disable_numparse=True), "", f"*{caption}*", "",
             "Machine-readable: [summary.csv](summary.csv), [records.csv](records.csv); "
             "LaTeX: [table.tex](table.tex).", ""]
    published = summary[summary["published_source"].notna()] if "published_source" in summary else summary.iloc[:0]
    if len(published):
        cols = {"model": "Model", "variant": "Method", "keep_ratio": "Keep", "top1": "Top-1 (ours)",
                "published_top1": "Top-1 (published)", "gmacs_as_published": "GMACs (ours)",
                "published_gmacs": "GMACs (published)", "published_gmacs_convention": "GMACs counted",
                "published_source": "Source"}
        pub = published.reindex(columns=list(cols)).rename(columns=cols)
        lines += ["## Published figures beside ours", "", pub.to_markdown(index=False, floatfmt=".2f"), ""]
    if len(pairs):
        lines += ["## Paired tests between methods (McNemar mid-p, same images)", "",
                  pairs.rename(columns={"a_only": "only A right", "b_only": "only B right",
                                        "delta_top1": "ΔTop-1 (A−B)"}).to_markdown(index=False, floatfmt=".4g"), ""]
    if figure_paths:
        lines += ["## Figures", ""]
        for name, path in figure_paths.items():
            rel = Path(path).relative_to(out) if Path(path).is_relative_to(out) else Path(path)
            if rel.suffix == ".png":
                pdf = rel.with_suffix(".pdf").as_posix()
                lines += [f"### {name}", "", f"![{name}]({rel.as_posix()}) ([PDF]({pdf}))", ""]
    failed = tidy[tidy["status"] == "error"] if "status" in tidy else tidy.iloc[:0]
    problems = tidy.attrs.get("problems", [])
    if len(failed) or problems or notes:
        lines += ["## Failed jobs and problems", ""]
        lines += [f"- `{r.key}` ({r.run}): {r.error}" for r in failed.itertuples()]
        lines += [f"- {p}" for p in problems + notes]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (results/<run>) to merge")
    parser.add_argument("--out", help="output folder (default: the first run folder)")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument("--no-pictures", action="store_true", help="skip the token-selection pictures")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.runs, args.out, figures=not args.no_figures, pictures=not args.no_pictures)
        print(console_table(args.runs))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
