"""Reports: records of one or more runs -> summary.csv, table.md, table.tex, figures and report.md.

    python -m bench.report results/flops-laptop results/acc-cluster --out results/combined

Records are merged across runs (the latest record of a job key wins). `frame` turns them into one tidy
DataFrame and a summary; `tables`, `plots`, `viz` (token pictures) and `stats` each read that frame,
and none of them imports another.
"""
from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from .. import records

if TYPE_CHECKING:  # annotations only: pandas is imported lazily, see below
    import pandas as pd

ACC_CONDITIONS = ["data", "limit", "acc_dtype", "acc_device"]
# The parts load on first use (PEP 562), not with the package: pandas and the method registry take
# seconds to import, and `python -m bench.report` imports this package before its __main__ runs, which
# could then not answer a Ctrl-C during those seconds with one line.
_PARTS = ("frame", "published", "stats", "tables", "plots", "viz", "figure", "calibration", "agreement")
_NAMES = dict(BASELINE="frame", ReportError="frame", load_runs="frame", conditions_text="tables",
              paper_table="tables", to_latex="tables", tokens_per_stage="tables")


def __getattr__(name: str):
    if name in _PARTS:
        return importlib.import_module(f".{name}", __name__)
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def summarize(tidy: pd.DataFrame, published_csv=None) -> pd.DataFrame:
    """The summary of a tidy frame, with published figures beside ours where there are any."""
    from . import frame, published

    return published.add(frame.summarize(tidy), published_csv)


def console_table(run_dirs) -> str:
    from . import frame, tables

    return tables.console_table(summarize(frame.load_runs(run_dirs)))


def _csv_ready(df: pd.DataFrame) -> pd.DataFrame:
    """Lists, tuples and dicts as JSON text, so the CSV round-trips through json.loads."""
    out = df.copy()
    for col in out.columns:
        if out[col].map(lambda v: isinstance(v, (list, dict, tuple))).any():
            out[col] = out[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict, tuple)) else v)
    return out


def write_report(run_dirs, out_dir=None, figures: bool = True, pictures: bool = True,
                 published_csv=None) -> dict[str, Path]:
    """Write summary.csv, table.md, table.tex, pairwise.csv, figures and report.md; returns their paths."""
    from . import agreement, calibration, stats
    from .frame import BASELINE, collapse_seeds, load_runs
    from .tables import conditions_text, paper_table, to_latex

    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    out = Path(out_dir) if out_dir is not None else Path(run_dirs[0])
    tidy = load_runs(run_dirs)  # before mkdir: a mistyped run folder must not be created
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(tidy, published_csv)
    display = collapse_seeds(summary)  # one row per configuration, mean ± std where it ran with several seeds
    table = paper_table(display)
    caption = conditions_text(summary)
    paths = dict(summary=out / "summary.csv", table_md=out / "table.md", table_tex=out / "table.tex",
                 records=out / "records.csv")
    _csv_ready(summary).to_csv(paths["summary"], index=False)
    _csv_ready(tidy).to_csv(paths["records"], index=False)
    paths["table_md"].write_text(table.to_markdown(index=False, disable_numparse=True) + "\n")
    paths["table_tex"].write_text(to_latex(table, caption))
    # Paired tests within one training budget (off the shelf, or N epochs), whatever the recipe settings:
    # the labels name the settings, so two recipes are compared in the open (docs/protocol.md#regimes).
    budget = summary["finetune"].map(lambda settings: dict(settings).get("epochs", 0.0))
    pairs = stats.pairwise_tests(summary.assign(finetune_epochs=budget),
                                 group_by=["model", "keep_ratio", "finetune_epochs", *ACC_CONDITIONS],
                                 exclude_method=BASELINE)
    if len(pairs):
        paths["pairwise"] = out / "pairwise.csv"
        pairs.to_csv(paths["pairwise"], index=False)
    figure_paths, notes, sections = {}, [], []
    if figures and len(summary):
        from . import plots

        figure_paths = plots.write_figures(tidy, display, out / "figures")
        figure_paths.update(calibration.write_figures(summary, out / "figures"))
    sections += calibration.markdown(display)
    pairs_agreement = agreement.table(tidy, summary)
    if len(pairs_agreement):
        paths["agreement"] = out / "agreement.csv"
        agreement.csv_ready(pairs_agreement).to_csv(paths["agreement"], index=False)
        heatmaps = agreement.write_heatmaps(pairs_agreement, out / "figures") if figures else {}
        paths.update({f"figure:{k}": v for k, v in heatmaps.items()})
        sections += agreement.markdown(pairs_agreement, heatmaps, out)
    if pictures and len(summary):
        from . import viz

        pics, skipped = viz.write_pictures(display, out / "figures")
        figure_paths.update(pics)
        notes += [f"token pictures: {name} skipped ({why})" for name, why in skipped.items()]
    paths.update({f"figure:{k}": v for k, v in figure_paths.items()})
    paths["report"] = out / "report.md"
    paths["report"].write_text(
        _report_markdown(run_dirs, tidy, summary, table, caption, pairs, figure_paths, notes, out, sections)
        + _pending_markdown(run_dirs, tidy))
    return paths


def write_after_run(run_dir, prog: str) -> bool:
    """The report at the end of a run, and its console table. A report bug must not hide the run's
    outcome (the records are safe): it is printed and the run's exit code says so."""
    try:
        write_report(run_dir)
        print(console_table(run_dir))
        return True
    except OSError as exc:  # the disk (full, read-only), not a bug: one line; the records are safe
        print(f"{prog}: {storage_message(exc, run_dir)}; rebuild it with: python -m bench.report {run_dir}",
              file=sys.stderr)
        return False
    except Exception:  # any failure of the report itself: the traceback is the useful part here
        traceback.print_exc()
        print(f"{prog}: the report failed; rebuild it with: python -m bench.report {run_dir}", file=sys.stderr)
        return False


def storage_message(exc: OSError, out_dir) -> str:
    """One line for a report that cannot be written: the file (or folder) and the errno."""
    return f"cannot write the report in {exc.filename or out_dir}: {exc.strerror or exc} (errno {exc.errno})"


def pending_jobs(run_dirs, tidy: pd.DataFrame) -> list[tuple[str, str]]:
    """(key, run) of every job in a run's grid.json that has no record yet: queued, running or lost.
    A report built while jobs still run says so instead of passing the partial table off as whole."""
    recorded = set(tidy["key"]) if "key" in tidy else set()
    out = []
    for run_dir in run_dirs:
        try:
            specs = records.load_grid(run_dir)
        except records.GridError:  # a folder of records without a grid (merged or hand-made): nothing to compare
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


_PUBLISHED_COLUMNS = {
    "model": "Model", "variant": "Method", "keep_ratio": "Keep", "regime": "Our regime", "top1": "Top-1 (ours)",
    "published_regime": "Published regime", "published_top1": "Top-1 (published, same regime)",
    "gmacs_as_published": "GMACs (ours, counted as published)", "published_gmacs": "GMACs (published)",
    "published_gmacs_convention": "Counted", "published_gmacs_rounding": "Printed as",
    "gmacs_agrees": "Agrees within half a printed digit", "published_source": "Source",
}


def _report_markdown(run_dirs, tidy, summary, table, caption, pairs, figure_paths, notes, out: Path,
                     sections=()) -> str:
    from . import tables

    lines = ["# tokenbench report", "", "Runs: " + ", ".join(f"`{r}`" for r in run_dirs), "",
             "## Results", "", table.to_markdown(index=False, disable_numparse=True), "", f"*{caption}*", ""]
    floor = tables.noise_floor_text(summary)
    if floor:
        lines += [floor, ""]
    lines += ["Machine-readable: [summary.csv](summary.csv), [records.csv](records.csv); "
              "LaTeX: [table.tex](table.tex).", ""]
    pub = summary[summary["published_source"].notna()] if "published_source" in summary else summary.iloc[:0]
    if len(pub):
        shown = pub.reindex(columns=list(_PUBLISHED_COLUMNS)).rename(columns=_PUBLISHED_COLUMNS)
        lines += ["## Published figures beside ours", "",
                  "A published top-1 is shown only beside a row of the same regime; GMACs do not depend on "
                  "the weights and are compared in every regime, counted as the paper counted them.", "",
                  shown.to_markdown(index=False, floatfmt=".3g"), ""]
    if len(pairs):
        lines += ["## Paired tests between methods (McNemar mid-p, same images)", "",
                  pairs.rename(columns={"a_only": "only A right", "b_only": "only B right",
                                        "delta_top1": "ΔTop-1 (A−B)"}).to_markdown(index=False, floatfmt=".4g"), ""]
    lines += list(sections)  # calibration, decision agreement: each part's own section
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
