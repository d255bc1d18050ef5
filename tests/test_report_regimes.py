"""bench.report: regimes, published figures under one rule, notes that flag a row, the noise floor, and the
report package's layering (no part imports another, no import circle)."""
from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd
import pytest

from bench import report
from bench.report import published
from tests.test_report import FINETUNED, IDLE_BLOCKS, MODEL, acc, flops, published_csv, row, throughput
from tests.test_report import run  # noqa: F401  (the fixture)

# ----------------------------------------------------------------------------------------------
# Regimes, published figures, notes, noise floor


@pytest.fixture
def regimes(tmp_path):
    """One configuration off the shelf and finetuned; the baseline finetuned too (a control)."""
    run = tmp_path / "regimes"
    acc(run, wrong=range(4), finetune=FINETUNED)  # 98 %, recorded first: must not become anyone's baseline
    acc(run, wrong=range(20))  # 90 %, off the shelf: the baseline of every regime
    acc(run, "idle", 0.5, wrong=range(60))  # 70 % off the shelf
    acc(run, "idle", 0.5, wrong=range(10), finetune=FINETUNED)  # 95 % after finetuning
    flops(run, gmacs=1.2345)
    flops(run, "idle", 0.5, gmacs=0.7, tokens=[50] * 3 + [25] * 9, blocks=IDLE_BLOCKS)
    return run


def test_finetuned_record_is_its_own_row_against_the_off_the_shelf_baseline(regimes):
    tidy = report.load_runs(regimes)
    assert set(tidy["regime"]) == {"off-the-shelf", "finetuned 2 ep"}
    summary = report.summarize(tidy)
    assert len(summary) == 4
    shelf, tuned = row(summary, "idle", regime="off-the-shelf"), row(summary, "idle", regime="finetuned 2 ep")
    assert tuned["finetune"] == FINETUNED and tuned["variant"] == "idle [finetuned 2 ep]"
    assert shelf["variant"] == "idle"
    assert shelf["top1"] == pytest.approx(70.0) and tuned["top1"] == pytest.approx(95.0)
    assert shelf["delta_top1"] == pytest.approx(70.0 - 90.0)
    assert tuned["delta_top1"] == pytest.approx(95.0 - 90.0)  # the released model off the shelf, not the 98 %
    assert tuned["delta_top1_significant"] is True  # 15 right only when finetuned, 0 the other way
    assert tuned["gmacs"] == shelf["gmacs"] == 0.7  # FLOPs do not depend on the weights: both rows have them
    assert tuned["delta_gmacs_pct"] == pytest.approx(100 * (0.7 / 1.2345 - 1))
    table = report.paper_table(summary)
    assert table.loc[table["Method"] == "idle [finetuned 2 ep]", "Regime"].item() == "finetuned 2 ep"
    assert table.loc[table["Method"] == "idle [finetuned 2 ep]", "ΔTop-1"].item() == "+5.00"
    assert table.loc[table["Method"] == "idle", "Regime"].item() == "off-the-shelf"


def test_published_top1_only_within_the_same_regime(regimes, tmp_path):
    csv = published_csv(tmp_path / "published.csv",
                        f"{MODEL},none,1.0,,91.5,off-the-shelf,1.2,with_overhead,round,,,paper A",
                        f"{MODEL},idle,0.5,,96.0,finetuned 30 ep,0.7,with_overhead,round,,,paper B")
    summary = report.summarize(report.load_runs(regimes), published_csv=csv)
    for regime in ("off-the-shelf", "finetuned 2 ep"):  # 2 epochs is not the paper's 30
        idle = row(summary, "idle", regime=regime)
        assert idle["published_top1"] is None or pd.isna(idle["published_top1"]), regime
        assert idle["published_regime"] == "finetuned 30 ep" and idle["published_source"] == "paper B"
        assert idle["published_gmacs"] == 0.7 and idle["gmacs_agrees"] is True  # GMACs compared in every regime
    base = row(summary, "none", regime="off-the-shelf")
    assert base["published_top1"] == 91.5 and base["gmacs_agrees"] is True  # 1.2345 within 1.2 ± 0.05
    tuned_base = row(summary, "none", regime="finetuned 2 ep")
    assert tuned_base["published_top1"] is None or pd.isna(tuned_base["published_top1"])
    text = report.write_report(regimes, tmp_path / "out", figures=False, pictures=False,
                               published_csv=csv)["report"].read_text()
    section = text[text.index("## Published figures beside ours"):]
    assert "Top-1 (published, same regime)" in section and "Published regime" in section
    assert "finetuned 30 ep" in section and "96" not in section  # listed with its regime, no top-1 beside ours


def test_published_top1_of_the_matching_regime_when_a_paper_gives_both(regimes, tmp_path):
    csv = published_csv(tmp_path / "published.csv",
                        f"{MODEL},idle,0.5,,71.0,off-the-shelf,0.7,with_overhead,round,,,paper A",
                        f"{MODEL},idle,0.5,,96.0,finetuned 2 ep,0.7,with_overhead,round,,,paper A")
    summary = report.summarize(report.load_runs(regimes), published_csv=csv)
    assert row(summary, "idle", regime="off-the-shelf")["published_top1"] == 71.0
    assert row(summary, "idle", regime="finetuned 2 ep")["published_top1"] == 96.0


def test_gmacs_agree_within_half_a_printed_digit_whatever_the_rounding(tmp_path):
    assert published.half_unit("2.9") == pytest.approx(0.05) and published.half_unit("11.4") == pytest.approx(0.05)
    assert published.half_unit("4") == pytest.approx(0.5) and published.half_unit("3.00") == pytest.approx(0.005)
    ours = pd.DataFrame([dict(model="m", method="none", keep_ratio=r, options_key=(), regime="off-the-shelf",
                              gmacs=g, gmacs_no_overhead=g) for r, g in ((0.7, 2.981), (0.8, 3.007), (0.9, 3.007))])
    csv = published_csv(tmp_path / "published.csv",
                        "m,none,0.7,,,off-the-shelf,2.9,with_overhead,truncate,,,truncated 2.981",
                        "m,none,0.8,,,off-the-shelf,3.0,with_overhead,round,,,rounded 3.007",
                        "m,none,0.9,,,off-the-shelf,3.00,with_overhead,round,,,two decimals printed")
    out = published.add(ours, csv).set_index("keep_ratio")
    # 2.981 truncates to 2.9, but |2.981 - 2.9| > 0.05: the one rule says no, the rounding is only shown
    assert out.at[0.7, "gmacs_agrees"] is False and out.at[0.7, "published_gmacs_rounding"] == "truncate"
    assert out.at[0.8, "gmacs_agrees"] is True and out.at[0.8, "published_gmacs_rounding"] == "round"
    assert out.at[0.9, "gmacs_agrees"] is False  # '3.00' claims ±0.005
    assert out.at[0.7, "gmacs_as_published"] == 2.981 and out.at[0.7, "published_gmacs"] == 2.9


def test_notes_flag_fvcore_random_weights_and_unstable_timing(tmp_path):
    run = tmp_path / "run"
    acc(run, wrong=range(20))
    acc(run, wrong=range(180), random_weights=True)  # untrained on purpose
    flops(run, gmacs=1.0, fvcore_rel_diff=0.0005)  # within 0.1 %: no note
    flops(run, "evit", 0.5, gmacs=0.6, fvcore_rel_diff=0.002)  # above 0.1 %
    throughput(run)
    throughput(run, "evit", 0.5, img_s=1500.0, spread=1.25)  # q75/q25 1.25 > 1.10
    summary = report.summarize(report.load_runs(run))
    table = report.paper_table(summary).set_index(summary.index)
    notes = {(r.method, r.random_weights): table.at[i, "Notes"] for i, r in summary.iterrows()}
    assert notes[("none", False)] == ""
    assert notes[("none", True)] == "random weights"
    assert notes[("evit", False)] == "fvcore differs by +0.20 % (> 0.1 %); timing unstable (q75/q25 1.25)"
    console = report.console_table(run)
    assert console.splitlines()[0].split()[-1] == "notes"
    assert "random weights" in console and "fvcore differs by +0.20 %" in console and "timing unstable" in console


def test_noise_floor_under_the_console_table_and_in_the_report(run, tmp_path):
    floor = ("Noise floor (tokenbench_vit_fmnist, bs 64, fp32, test-cpu): the unpatched model timed against a copy "
             "of itself reads 1.000× [0.990, 1.020] over 5 repeats.")
    lines = report.console_table(run).splitlines()
    assert lines[-1] == floor and sum(line.startswith("Noise floor") for line in lines) == 1  # one timed condition
    assert lines[0].split()[0] == "model"
    text = report.write_report(run, tmp_path / "out", figures=False, pictures=False)["report"].read_text()
    assert floor in text and text.index("## Results") < text.index(floor)


# ----------------------------------------------------------------------------------------------
# Layering: frame makes the summary, the parts that read it do not import each other

REPORT_DIR = Path(report.__file__).parent
PARTS = ("tables", "plots", "viz", "stats")


def _report_imports(module: str) -> set[str]:
    """The bench.report modules `module` imports anywhere in its source (functions included)."""
    source = REPORT_DIR / ("__init__.py" if module == "__init__" else f"{module}.py")
    own = {p.stem for p in REPORT_DIR.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] if a.name.count(".") >= 2 else "__init__"
                      for a in node.names if a.name.startswith("bench.report")}
        elif isinstance(node, ast.ImportFrom):
            target = {0: "", 1: "bench.report.", 2: "bench."}.get(node.level, "?") + (node.module or "")
            if (target + ".").startswith("bench.report."):
                path = target[len("bench.report"):].lstrip(".")
                if path:
                    found.add(path.split(".")[0])
                else:  # from . import x: a submodule, or a name of the package itself
                    found |= {a.name if a.name in own else "__init__" for a in node.names}
    return found - {module}


def test_report_parts_do_not_import_each_other():
    for part in PARTS:
        imports = _report_imports(part)
        assert not imports & (set(PARTS) - {part}), (part, imports)
        assert "__init__" not in imports and "__main__" not in imports, (part, imports)


def test_no_import_circle_in_bench_report():
    graph = {p.stem: _report_imports(p.stem) for p in REPORT_DIR.glob("*.py")}
    assert graph["__init__"] >= {"frame", "tables"}  # the walk does see relative imports

    def visit(node, path):
        assert node not in path, " -> ".join([*path, node])
        for nxt in graph.get(node, ()):
            visit(nxt, [*path, node])

    for module in graph:
        visit(module, [])
