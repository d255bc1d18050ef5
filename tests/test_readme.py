"""Every figure the README states is asserted here, so the README cannot drift from what the code does.

Tables the README checks are preceded by an HTML comment `<!-- checked: NAME -->` (invisible when
rendered); the prose claims are found by the sentence that states them. Figures come from three places:
- computed now (the DeiT-S GMACs table, the demo's GMACs, and the demo's top-1 by rerunning its
  accuracy jobs);
- the committed example reports (results/example, results/finetuned), which the harness wrote;
- the tolerances the equivalence tests use (tests/random_vits.py, tests/test_idle.py, ...).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import methods
from methods import Geometry

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
EMBEDDED = "tokenbench_vit_fmnist"


def checked_table(name: str) -> list[dict[str, str]]:
    """The rows of the Markdown table that follows `<!-- checked: name -->`, as {header: cell}."""
    marker = f"<!-- checked: {name} -->"
    assert marker in README, f"README has no table marked {marker}"
    lines = README.split(marker, 1)[1].lstrip("\n").splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:]  # rows[1] is the |---| rule
    return [dict(zip(header, cells)) for cell_row in [body] for cells in cell_row]


def claim(pattern: str) -> re.Match:
    """The README sentence matching `pattern` (whitespace-insensitive), which must be there."""
    found = re.search(pattern.replace(" ", r"\s+"), README)
    assert found, f"README no longer states: {pattern}"
    return found


def summary(run: str) -> pd.DataFrame:
    return pd.read_csv(ROOT / "results" / run / "summary.csv")


def row_of(frame: pd.DataFrame, method: str, keep: float, regime: str = "off-the-shelf",
           layers: str = "[]") -> pd.Series:
    """The one row of `method` at `keep` in `regime`, default options, default layers unless `layers`."""
    rows = frame[(frame["method"] == method) & (frame["keep_ratio"].round(6) == keep)
                 & (frame["options_key"] == "[]") & (frame["regime"].fillna("off-the-shelf") == regime)
                 & (frame["layers"] == layers)]
    assert len(rows) == 1, f"{method} {keep} {regime}: {len(rows)} rows"
    return rows.iloc[0]


# --- DeiT-S GMACs: computed from the geometry, no weights --------------------------------------------

def deit_small_gmacs(method: str, keep: float, **options) -> float:
    import timm
    import torch

    with torch.device("meta"):
        geometry = Geometry.from_model(timm.create_model("deit_small_patch16_224", pretrained=False))
    return methods.build(geometry, method, keep, **options).total_macs() / 1e9


def _deit_rows():
    """(README method cell, method, options) for each row of the DeiT-S table."""
    return {"idle": ("idle", {}), "idle (main)": ("idle", {"preset": "main"}), "evit": ("evit", {}),
            "evit no fuse": ("evit", {"fuse": False}), "topk": ("topk", {}), "random": ("random", {}),
            "dynamicvit": ("dynamicvit", {}), "tome": ("tome", {}), "pitome": ("pitome", {}),
            "tofu": ("tofu", {}), "mctf": ("mctf", {}), "ppt": ("ppt", {}), "zerotprune": ("zerotprune", {})}


def test_deit_small_gmacs_table():
    rows = checked_table("deit-s-gmacs")
    known = _deit_rows()
    assert {row["method"] for row in rows} - {"none"} == set(known), "the table covers exactly these rows"
    for row in rows:
        if row["method"] == "none":
            assert float(row["1.0"]) == round(deit_small_gmacs("none", 1.0), 3)
            continue
        method, options = known[row["method"]]
        for column, cell in row.items():
            if column in ("method", "1.0") or not cell:
                continue
            want = round(deit_small_gmacs(method, float(column), **options), 3)
            assert float(cell) == want, f"{row['method']} at {column}: README {cell}, computed {want:.3f}"


# --- the demo: `make demo` prints these rows --------------------------------------------------------

DEMO = [("none", 1.0), ("idle", 0.7), ("idle", 0.5), ("evit", 0.7), ("evit", 0.5)]


def demo_rows() -> dict[tuple[str, float], dict]:
    rows = {(row["method"], float(row["keep"])): row for row in checked_table("demo")}
    assert sorted(rows) == sorted(DEMO)
    return rows


def test_demo_table_is_the_committed_example():
    example = summary("example")
    for (method, keep), row in demo_rows().items():
        recorded = row_of(example, method, keep)
        assert float(row["top-1"]) == round(recorded["top1"], 2)
        assert float(row["GMACs"]) == float(f"{recorded['gmacs']:.3g}")


def test_demo_gmacs_are_computed_now():
    from bench.models import create_model

    model = create_model(EMBEDDED)
    geometry = Geometry.from_model(model)
    for (method, keep), row in demo_rows().items():
        gmacs = methods.build(geometry, method, keep).total_macs() / 1e9
        assert float(row["GMACs"]) == float(f"{gmacs:.3g}"), f"{method} {keep}"


@pytest.mark.slow
def test_demo_top1_is_what_the_harness_measures_now(tmp_path):
    """The demo's accuracy jobs, rerun (10,000 test images each, about a minute on 2 cores)."""
    done = subprocess.run([sys.executable, "run_all.py", "--methods", "idle,evit", "--ratios", "0.5,0.7",
                           "--metrics", "acc", "--out", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = pd.read_csv(tmp_path / "run" / "summary.csv")
    for (method, keep), row in demo_rows().items():
        assert float(row["top-1"]) == round(row_of(measured, method, keep)["top1"], 2), f"{method} {keep}"


def test_embedded_baseline_accuracy():
    stated = float(claim(r"It reaches \*\*([0-9.]+) % top-1\*\*").group(1))
    assets = json.loads((ROOT / "bench" / "assets" / f"{EMBEDDED}.json").read_text())
    assert stated == round(row_of(summary("example"), "none", 1.0)["top1"], 2)
    assert stated == float(demo_rows()[("none", 1.0)]["top-1"])
    assert stated == assets["final_test_top1"]


# --- finetuned vs off the shelf ----------------------------------------------------------------------

def test_finetuned_table_is_the_committed_report():
    report = summary("finetuned")
    rows = checked_table("finetuned")
    assert len(rows) >= 12, "every method at both ratios"
    for row in rows:
        keep, epochs = float(row["keep"]), float(row["epochs"])
        off = row_of(report, row["method"], keep)
        # the settings column is what the report's regime names beyond the epochs (off the method's defaults)
        regime = ", ".join([f"finetuned {epochs:g} ep"] + ([row["settings"]] if row["settings"] else []))
        tuned = row_of(report, row["method"], keep, regime)
        assert float(row["off the shelf"]) == round(off["top1"], 2)
        assert float(row["finetuned"]) == round(tuned["top1"], 2)
        p_value = row.get("p vs EViT", "")
        if p_value:  # McNemar mid-p of this row against EViT's at the same ratio and epochs
            pairs = pd.read_csv(ROOT / "results" / "finetuned" / "pairwise.csv")
            label = f"{row['method']} [finetuned {epochs:g} ep]"
            evit = f"evit [finetuned {epochs:g} ep]"
            match = pairs[(pairs["keep_ratio"].round(6) == keep) & (((pairs["a"] == label) & (pairs["b"] == evit))
                                                                   | ((pairs["a"] == evit) & (pairs["b"] == label)))]
            assert len(match) == 1 and p_value == f"{match.iloc[0]['p_value']:.2g}", (row, match)


def test_finetuned_paragraph_states_the_report():
    report = summary("finetuned")
    full = row_of(report, "none", 1.0)["top1"]
    gap = float(claim(r"6 epochs bring IdleViT and EViT at keep 0.7 to within ([0-9.]+) points").group(1))
    for method in ("idle", "evit"):
        assert round(full - row_of(report, method, 0.7, "finetuned 6 ep")["top1"], 2) <= gap
    found = claim(r"IdleViT beats EViT by ([0-9.]+) points on the same 10,000 images \(McNemar mid-p ([0-9.]+)\), "
                  r"at lower cost \(([0-9.]+) against ([0-9.]+) GMACs\)")
    pairs = pd.read_csv(ROOT / "results" / "finetuned" / "pairwise.csv")
    pair = pairs[(pairs["keep_ratio"].round(6) == 0.5) & (pairs["a"] == "idle [finetuned 2 ep]")
                 & (pairs["b"] == "evit [finetuned 2 ep]")].iloc[0]
    assert float(found.group(1)) == pair["delta_top1"] and pair["n_images"] == 10000
    assert found.group(2) == f"{pair['p_value']:.2g}"
    for group, method in ((3, "idle"), (4, "evit")):
        assert float(found.group(group)) == float(f"{row_of(report, method, 0.5)['gmacs']:.3g}")
    short = "finetuned 2 ep, backbone_lr_scale=0.05, lr=0.01, ratio_weight=50"
    found = claim(r"rank worse than chance \(([0-9.]+) % at keep 0.7,\s+([0-9.]+) % at 0.5\)")
    assert [float(v) for v in found.groups()] == [round(row_of(report, "dynamicvit", k, "finetuned 2 ep")["top1"], 2)
                                                  for k in (0.7, 0.5)]
    found = claim(r"reaches ([0-9.]+) and ([0-9.]+) %: level with random dropping finetuned the same way at keep 0.7\s+"
                  r"\(([0-9.]+) %, McNemar mid-p ([0-9.]+)\) and below it at keep 0.5 \(([0-9.]+) %\)")
    assert [float(found.group(i)) for i in (1, 2)] == [round(row_of(report, "dynamicvit", k, short)["top1"], 2)
                                                       for k in (0.7, 0.5)]
    assert [float(found.group(i)) for i in (3, 5)] == [round(row_of(report, "random", k, "finetuned 2 ep")["top1"], 2)
                                                       for k in (0.7, 0.5)]
    level = dynamicvit_against_random(pairs, 0.7, short, "finetuned 2 ep")
    assert found.group(4) == f"{level['p_value']:.2g}" and level["p_value"] >= 0.05  # "level": not significant
    for keep in (0.5, 0.7):  # the official recipe below random at both ratios, by more than both intervals
        random_low = row_of(report, "random", keep, "finetuned 2 ep")["top1_ci_low"]
        assert row_of(report, "dynamicvit", keep, "finetuned 2 ep")["top1_ci_high"] < random_low, keep
    assert row_of(report, "dynamicvit", 0.5, short)["top1_ci_high"] < \
        row_of(report, "random", 0.5, "finetuned 2 ep")["top1_ci_low"]  # "below"
    long = short.replace("2 ep", "6 ep")
    found = claim(r"After 6 epochs DynamicViT beats random at\s+keep 0.7 \(([0-9.]+) against ([0-9.]+) %, mid-p "
                  r"([0-9.]+)\) and still trails it at keep 0.5 \(([0-9.]+) against ([0-9.]+) %\)")
    for keep, (dyn, rnd) in ((0.7, (1, 2)), (0.5, (4, 5))):
        assert float(found.group(dyn)) == round(row_of(report, "dynamicvit", keep, long)["top1"], 2)
        assert float(found.group(rnd)) == round(row_of(report, "random", keep, "finetuned 6 ep")["top1"], 2)
    beats = dynamicvit_against_random(pairs, 0.7, long, "finetuned 6 ep")
    assert found.group(3) == f"{beats['p_value']:.2g}" and beats["p_value"] < 0.05 and beats["delta_top1"] > 0
    trails = dynamicvit_against_random(pairs, 0.5, long, "finetuned 6 ep")
    assert trails["p_value"] < 0.05 and trails["delta_top1"] < 0
    # off the shelf and three finetunes at both ratios, and 12 epochs at keep 0.5 (docs/methods.md)
    assert len(report[report["method"] == "dynamicvit"]) == 9


def test_dynamicvit_table_in_the_docs_is_the_committed_report():
    """docs/methods.md#dynamicvit-on-the-embedded-model: every cell of its table is a row of results/finetuned."""
    docs = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    section = docs.split("### DynamicViT on the embedded model", 1)[1].split("\n**", 1)[0]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
             for line in section.splitlines() if line.startswith("| ") and "%" in line}
    short = "backbone_lr_scale=0.05, lr=0.01, ratio_weight=50"
    rows = {  # the table's first column -> method, regime, layers
        "official, 2 epochs (lr 1e-3, backbone × 0.01, ratio weight 2)": ("dynamicvit", "finetuned 2 ep", "[]"),
        "short-budget, 2 epochs (lr 1e-2, backbone × 0.05, ratio weight 50)": ("dynamicvit", f"finetuned 2 ep, {short}", "[]"),
        "short-budget, 6 epochs": ("dynamicvit", f"finetuned 6 ep, {short}", "[]"),
        "short-budget, 12 epochs": ("dynamicvit", f"finetuned 12 ep, {short}", "[]"),
        "`random`, finetuned with the common recipe, 2 epochs": ("random", "finetuned 2 ep", "[]"),
        "`random`, 6 epochs": ("random", "finetuned 6 ep", "[]"),
        "`random`, 12 epochs": ("random", "finetuned 12 ep", "[]"),
        "`random` at DynamicViT's places (`--layers 2,5,8`), 2 epochs": ("random", "finetuned 2 ep", "[2, 5, 8]"),
    }
    assert set(cells) == set(rows)
    report = summary("finetuned")
    for label, (method, regime, layers) in rows.items():
        for keep, cell in zip((0.7, 0.5), cells[label]):
            if cell:
                assert cell == f"{row_of(report, method, keep, regime, layers)['top1']:.2f} %", (label, keep)


def dynamicvit_against_random(pairs: pd.DataFrame, keep: float, dynamicvit_regime: str,
                              random_regime: str) -> dict:
    """The McNemar row of DynamicViT against random (default layers) at `keep`, as DynamicViT minus random."""
    dyn, rnd = f"dynamicvit [{dynamicvit_regime}]", f"random [{random_regime}]"
    at = pairs[pairs["keep_ratio"].round(6) == keep]
    forward, backward = at[(at["a"] == dyn) & (at["b"] == rnd)], at[(at["a"] == rnd) & (at["b"] == dyn)]
    assert len(forward) + len(backward) == 1, (keep, dynamicvit_regime, random_regime)
    if len(forward):
        return dict(forward.iloc[0])
    row = dict(backward.iloc[0])
    return dict(row, delta_top1=-row["delta_top1"])


# --- tolerances: each stated bound is the one a test asserts -------------------------------------

def test_stated_tolerances_are_the_tested_ones():
    import torch
    from random_vits import REFERENCE_TOL
    from test_dynamicvit import TOLERANCE as DYNAMICVIT_TOL
    from test_flops import FVCORE_REL_TOL
    from test_idle import TOLERANCE as IDLE_TOL

    found = claim(r"≤ ([0-9.e-]+) in fp32 and ≤ ([0-9.e-]+) in fp64 \(IdleViT and DynamicViT: ≤ ([0-9.e-]+) in fp32\)")
    fp32, fp64, tight = (float(found.group(i)) for i in (1, 2, 3))
    assert (fp32, fp64) == (REFERENCE_TOL[torch.float32], REFERENCE_TOL[torch.float64])
    assert tight == IDLE_TOL[torch.float32] == DYNAMICVIT_TOL[torch.float32]
    assert fp64 == IDLE_TOL[torch.float64] == DYNAMICVIT_TOL[torch.float64]
    agreement = float(claim(r"fvcore agree within ([0-9.]+) %").group(1))
    assert agreement / 100 == FVCORE_REL_TOL
    claim(r"bit for bit")  # identity: tests/test_identity.py asserts torch.equal
    assert "torch.equal(got, want)" in (ROOT / "tests" / "test_identity.py").read_text()


def test_stated_published_exceptions_are_the_tested_ones():
    from test_flops import KNOWN_MISMATCHES

    stated = claim(r"within half a unit of their last digit, except (\d+) rows").group(1)
    assert int(stated) == len(KNOWN_MISMATCHES)


# --- what the README says the project has ---------------------------------------------------------

NUMBERS = {"Twelve": 12, "Thirteen": 13, "Fourteen": 14, "Fifteen": 15, "Sixteen": 16}


def test_method_count_and_table_are_the_registry():
    stated = NUMBERS[claim(r"\*\*token reduction in Vision Transformers\*\*\. (\w+) methods").group(1)]
    registered = [name for name in methods.available() if name != "none"]
    assert stated == len(registered)
    section = README.split("## Methods", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z-]+)`", "".join(line.split("|")[1] for line in section.splitlines()
                                                     if line.startswith("| `"))))
    assert listed == set(registered)


def test_embedded_model_facts():
    from bench.models import create_model

    model = create_model(EMBEDDED)
    found = claim(r"(\d+) blocks \(so every\s+method's default layers apply unchanged\), width (\d+), (\d+) heads, "
                  r"(\d+)×(\d+) grey input, patch (\d+) \((\d+) patches \+ CLS\),\s+([0-9.]+) M parameters")
    depth, width, heads, height, width_px, patch, patches, params = found.groups()
    assert int(depth) == len(model.blocks) and int(width) == model.embed_dim
    assert int(heads) == model.blocks[0].attn.num_heads
    assert (1, int(height), int(width_px)) == tuple(model.default_cfg["input_size"])
    assert (int(patch),) * 2 == tuple(model.patch_embed.patch_size)
    assert int(patches) == model.patch_embed.num_patches
    assert float(params) == round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    sizes = claim(r"Fashion-MNIST's ([0-9,]+) test images and a ([0-9,]+)-image training subset")
    from bench.data import load_fashion_mnist

    shipped = tuple(len(load_fashion_mnist(split)[1]) for split in ("test", "train"))
    assert (int(sizes.group(1).replace(",", "")), int(sizes.group(2).replace(",", ""))) == shipped


# --- the layout names files that exist --------------------------------------------------------------

def test_layout_names_existing_files():
    """Every file and folder the layout block names exists (relative to the repository, its top-level
    folder, or the sub-folder its line starts with)."""
    block = README.split("## Layout", 1)[1].split("```", 2)[1]
    names = re.compile(r"[\w/]*\w\.(?:py|md|sh|toml|yaml)\b|\b[\w]+/(?=[\s,]|$)")
    folder = sub = ""
    checked = 0
    for line in filter(str.strip, block.splitlines()):
        first = line.split()[0]
        if not line.startswith(" "):
            folder, sub = first.rstrip("/"), ""
        elif first.endswith("/"):
            sub = first.rstrip("/")
        for name in names.findall(line):
            places = [ROOT / name, ROOT / folder / name, ROOT / folder / sub / name]
            assert any(place.exists() for place in places), f"the README's layout names {name!r} ({line.strip()})"
            checked += 1
    assert checked > 40
