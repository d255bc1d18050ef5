"""Paper-style tables from a summary: display strings for Markdown, LaTeX and the terminal.

Values become text here and only here, for display; nothing reads these strings back.
"""
from __future__ import annotations

import pandas as pd

from ..jobs.flops import FVCORE_TOLERANCE
from .frame import ALPHA, BASELINE, collapse_seeds, noise_floor


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


def _seeded(row) -> bool:
    """A row that is the mean over several seeds (frame.collapse_seeds): shown as mean ± std."""
    n = row.get("n_seeds")
    return n is not None and not pd.isna(n) and n > 1


def _fmt_mean_std(row, metric: str, spec: str, suffix: str = "") -> str:
    text = _fmt(row.get(metric), spec, suffix)
    if text and _seeded(row) and pd.notna(row.get(f"{metric}_std")):
        text += f" ± {row[f'{metric}_std']:{spec.lstrip('+')}}"
    return text


def _fmt_top1(row) -> str:
    text = _fmt_mean_std(row, "top1", ".2f")
    if text and pd.notna(row.get("top1_ci_low")):
        text += f" [{row['top1_ci_low']:.2f}, {row['top1_ci_high']:.2f}]"
    return text


def _fmt_gmacs(value) -> str:
    """Two decimals, as papers print GMACs; small models (the embedded one is ~0.03) get 3 significant digits."""
    return _fmt(value, ".2f" if pd.isna(value) or abs(value) >= 0.1 else ".3g")


def _fmt_delta_top1(row) -> str:
    if row["method"] == BASELINE:
        return "—" if pd.notna(row.get("top1")) else ""
    text = _fmt_mean_std(row, "delta_top1", "+.2f")
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


def _fmt_calibration(row, metric: str, scale: float = 1.0, spec: str = ".3f") -> str:
    """ECE (scale 100: percent) or Brier score with its bootstrap 95% CI (one seed) or ± its std over seeds."""
    value = row.get(metric)
    if value is None or pd.isna(value):
        return ""
    text = f"{scale * value:{spec}}"
    if _seeded(row) and pd.notna(row.get(f"{metric}_std")):
        text += f" ± {scale * row[f'{metric}_std']:{spec}}"
    if pd.notna(row.get(f"{metric}_ci_low")):
        text += f" [{scale * row[f'{metric}_ci_low']:{spec}}, {scale * row[f'{metric}_ci_high']:{spec}}]"
    return text


def _fmt_speedup(row) -> str:
    text = _fmt(row.get("speedup"), ".2f", "×")
    if text and _seeded(row) and pd.notna(row.get("speedup_std")):
        text += f" ± {row['speedup_std']:.2f}"
    if text and pd.notna(row.get("speedup_ci_low")):
        text += f" [{row['speedup_ci_low']:.2f}, {row['speedup_ci_high']:.2f}]"
    return text


def notes(row) -> str:
    """What a reader must know about a row before trusting it."""
    out = []
    if row.get("random_weights") is True:
        out.append("random weights")
    if row.get("fvcore_agrees") is False:
        out.append(f"fvcore differs by {100 * row['fvcore_rel_diff']:+.2f} % (> {100 * FVCORE_TOLERANCE:g} %)")
    if row.get("unstable") is True:
        out.append(f"timing unstable (q75/q25 {row['spread']:.2f})")
    if isinstance(row.get("method_notes"), (list, tuple)):  # the method changed the request (ToMe's r)
        out += list(row["method_notes"])
    if _seeded(row):
        out.append(f"mean ± std over {int(row['n_seeds'])} seeds ({', '.join(map(str, row['seeds']))})")
    return "; ".join(out)


TABLE_COLUMNS = {
    "Model": lambda r: r["model"],
    "Method": lambda r: r["variant"],
    "Keep": lambda r: _fmt(r["keep_ratio"], "g"),
    "Tokens per stage": lambda r: tokens_per_stage(r.get("tokens_per_block")),
    "Regime": lambda r: r.get("regime") or "",
    "Top-1 [95% CI]": _fmt_top1,
    "ΔTop-1": _fmt_delta_top1,
    "GMACs": lambda r: _fmt_gmacs(r.get("gmacs")),
    "ΔGMACs %": lambda r: ("—" if r["method"] == BASELINE and pd.notna(r.get("gmacs"))
                           else _fmt(r.get("delta_gmacs_pct"), "+.1f")),
    "img/s": _fmt_img_s,
    "Speedup × [95% CI]": _fmt_speedup,
    "Peak memory": lambda r: _fmt(r.get("peak_mem_mb"), ",.0f", " MB"),
    "Notes": notes,
}


# Shown after ΔTop-1 when some row has them (predictions files from before calibration have none).
CALIBRATION_COLUMNS = {
    "ECE % [95% CI]": lambda r: _fmt_calibration(r, "ece", 100.0, ".2f"),
    "Brier [95% CI]": lambda r: _fmt_calibration(r, "brier"),
}


def paper_table(summary: pd.DataFrame, columns: dict | None = None) -> pd.DataFrame:
    """Display strings, one row per summary row, in the order of `columns` (name -> formatter; default
    TABLE_COLUMNS, with CALIBRATION_COLUMNS where the summary has calibration)."""
    if columns is None:
        columns = dict(TABLE_COLUMNS)
        if "ece" in summary and summary["ece"].notna().any():
            names = list(columns)
            at = names.index("ΔTop-1") + 1
            columns = {**{n: columns[n] for n in names[:at]}, **CALIBRATION_COLUMNS,
                       **{n: columns[n] for n in names[at:]}}
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
                     f"mid-p test against the baseline on the same images gives p ≥ {ALPHA}")
    if "ece" in summary and summary["ece"].notna().any():
        parts.append("ECE (15 equal-width confidence bins, percent) and Brier score with percentile-bootstrap "
                     "95% CIs over images")
    if "gmacs" in summary:
        parts.append("GMACs analytic per image, the method's own overhead included, cross-checked with fvcore")
    if values("tp_device"):
        parts.append(f"throughput median over repeats on {', '.join(values('device_name') or values('tp_device'))}, "
                     f"{', '.join(values('tp_dtype'))}, largest batch measured; speedup is the median of "
                     "per-repeat ratios to the baseline timed interleaved (ABBA) in the same process, with a "
                     "95% CI from order statistics")
    return "; ".join(parts) + "." if parts else "No measurements."


def noise_floor_text(summary: pd.DataFrame) -> str:
    """One line per timed condition: the baseline against itself, the smallest difference worth reading."""
    lines = []
    for r in noise_floor(summary).itertuples():
        lines.append(f"Noise floor ({r.model}, bs {int(r.tp_batch_size)}, {r.tp_dtype}, {r.device_name or r.tp_device}): "
                     f"the unpatched model timed against a copy of itself reads {r.speedup:.3f}× "
                     f"[{r.speedup_ci_low:.3f}, {r.speedup_ci_high:.3f}] over {int(r.repeats)} repeats.")
    return "\n".join(lines)


# Symbols the display tables use, in math mode so that pdflatex needs no Unicode setup.
_LATEX_SYMBOLS = {"Δ": r"$\Delta$", "×": r"$\times$", "→": r"$\to$", "≥": r"$\geq$", "—": "---", "…": r"\ldots{}"}


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
    "model": lambda r: r["model"], "method": lambda r: r["variant"], "keep": lambda r: _fmt(r["keep_ratio"], "g"),
    "top-1": lambda r: _fmt_mean_std(r, "top1", ".2f"), "GMACs": lambda r: _fmt_gmacs(r.get("gmacs")),
    "img/s": lambda r: _fmt_rate(r.get("img_s")), "speedup": lambda r: _fmt(r.get("speedup"), ".2f", "×"),
    "notes": notes,
}


def console_table(summary: pd.DataFrame) -> str:
    """Short text table for the terminal: model | method | keep | top-1 | GMACs | img/s | speedup | notes."""
    if summary.empty:
        return "(no finished records)"
    table = paper_table(collapse_seeds(summary), CONSOLE_COLUMNS)
    if not table["notes"].any():
        table = table.drop(columns="notes")
    text = table.to_markdown(index=False, tablefmt="simple", disable_numparse=True)
    floor = noise_floor_text(summary)
    return text + (f"\n{floor}" if floor else "")
