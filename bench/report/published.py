"""Published figures beside ours (bench/assets/published.csv), honestly compared.

- Accuracy is compared only within one regime: a paper's finetuned top-1 never stands beside our
  off-the-shelf row as if they measured the same thing (`published_top1` stays empty then; the figure
  is still listed, labelled with its regime, in the report's published table).
- GMACs do not depend on weights, so they are compared whatever the regime, counted the paper's way
  (with or without the method's own overhead), against ONE rule for every row: a published figure
  printed with d decimals agrees when ours is within half a unit of its last digit. How the paper
  rounded (round or truncate) is shown beside it, never used to make a row pass.
"""
from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd

import methods

from ..spec import pairs

PUBLISHED_CSV = Path(__file__).resolve().parent.parent / "assets" / "published.csv"
COLUMNS = ["published_top1", "published_regime", "published_gmacs", "published_gmacs_convention",
           "published_gmacs_rounding", "published_source", "gmacs_as_published", "gmacs_agrees"]


def load(path=None) -> pd.DataFrame:
    """Published figures, methods and options canonical like our specs; empty when the file is absent."""
    path = Path(path or PUBLISHED_CSV)
    if not path.is_file():
        return pd.DataFrame()
    pub = pd.read_csv(path, dtype={"method_options": str, "gmacs": str})
    pub["method"] = [_canonical_name(m) for m in pub["method"]]
    pub["options_key"] = [_canonical_options(m, o) for m, o in zip(pub["method"], pub["method_options"])]
    pub["keep_ratio"] = pd.to_numeric(pub["keep_ratio"], errors="coerce")
    pub["gmacs_text"] = pub["gmacs"].fillna("")
    pub["gmacs"] = pd.to_numeric(pub["gmacs"], errors="coerce")
    return pub


def _canonical_name(name) -> str:
    try:
        return methods.canonical_name(str(name))
    except methods.MethodError:
        return str(name)


def _canonical_options(method: str, text) -> tuple:
    """'fuse=true;r=8' (the CSV's spelling) -> the sorted non-default pairs our specs hold."""
    given = {}
    for part in str(text if isinstance(text, str) else "").split(";"):
        name, found, value = part.partition("=")
        if found:
            given[name.strip()] = value.strip()
    try:
        cls = methods.get_method(method)
    except methods.MethodError:
        return pairs(given)
    coerced = {k: cls.options[k].coerce(k, v) for k, v in given.items() if k in cls.options}
    return pairs({k: v for k, v in coerced.items() if v != cls.options[k].default})


def half_unit(text: str) -> float:
    """Half a unit of the last printed digit: '2.9' -> 0.05, '11.4' -> 0.05, '4' -> 0.5."""
    exponent = Decimal(text.strip()).as_tuple().exponent
    return 0.5 * 10.0 ** int(exponent)


def add(summary: pd.DataFrame, path=None) -> pd.DataFrame:
    """Published columns for rows of the same model, method, options and keep ratio."""
    pub, summary = load(path), summary.assign(**{c: None for c in COLUMNS})
    if pub.empty:
        return summary
    for i, row in summary.iterrows():
        hit = pub[(pub["model"] == row["model"]) & (pub["method"] == row["method"])
                  & np.isclose(pub["keep_ratio"], row["keep_ratio"]) & (pub["options_key"] == row["options_key"])]
        if hit.empty:
            continue
        same = hit[hit["regime"] == row.get("regime")] if "regime" in hit else hit.iloc[:0]
        first = (same if len(same) else hit).iloc[0]  # a paper may give both regimes: ours first
        same_regime = first.get("regime") == row.get("regime")
        summary.at[i, "published_top1"] = first.get("top1") if same_regime else None
        summary.at[i, "published_regime"] = first.get("regime")
        summary.at[i, "published_source"] = first.get("source")
        if pd.notna(first.get("gmacs")):
            convention = first.get("gmacs_convention")
            ours = row.get("gmacs_no_overhead") if convention == "no_overhead" else row.get("gmacs")
            summary.at[i, "published_gmacs"] = first["gmacs"]
            summary.at[i, "published_gmacs_convention"] = convention
            summary.at[i, "published_gmacs_rounding"] = first.get("gmacs_rounding")
            summary.at[i, "gmacs_as_published"] = ours
            if ours is not None and pd.notna(ours):
                summary.at[i, "gmacs_agrees"] = bool(abs(ours - first["gmacs"]) <= half_unit(first["gmacs_text"]) + 1e-9)
    return summary


