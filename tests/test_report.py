"""bench.report on synthetic records: aggregation, baselines, regimes, published figures, notes, formatting,
LaTeX, merging, failures, CLI, and the layering of the report modules."""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from bench import report
from bench.jobs.flops import FVCORE_TOLERANCE
from bench.records import preds_path, write_error, write_record
from bench.report import tables
from bench.report.__main__ import main
from bench.spec import JobSpec

MODEL = "tokenbench_vit_fmnist"
N = 200
LABELS = np.arange(N) % 10
FINETUNED = (("epochs", 2),)  # a finetune recipe: the regime "finetuned 2 ep"
# What a FLOPs record's schedule says about each block: IdleViT carries the unselected tokens idle.
IDLE_BLOCKS = [dict(n_in=50, n_attn=50, n_mlp=50, n_out=50, action="")] * 3 + \
    [dict(n_in=50, n_attn=25, n_mlp=25, n_out=50, action="idle")] * 9


def acc(run, method="none", keep=1.0, wrong=(), limit=N, dtype="fp32", finetune=(), random_weights=False,
        **options):
    """An accuracy record whose predictions are right except at the indices in `wrong`."""
    spec = JobSpec("acc", MODEL, method, keep, method_options=tuple(sorted(options.items())), limit=limit,
                   dtype=dtype, finetune=finetune, random_weights=random_weights)
    labels = LABELS[:limit]
    top1 = labels.copy()
    top1[list(wrong)] = (labels[list(wrong)] + 1) % 10
    path = preds_path(run, spec.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, labels=labels, top5=np.stack([top1] + [(top1 + k) % 10 for k in range(1, 5)], axis=1))
    metrics = dict(top1=100.0 * np.mean(top1 == labels), top5=100.0, n_images=int(limit), preds_file=path.name,
                   tokens_per_block=[50] * 12, data_config={}, weights="random" if random_weights else "embedded")
    write_record(run, spec, metrics, {"device_name": "test-cpu"}, time.time())
    return spec


def flops(run, method="none", keep=1.0, gmacs=1.0, tokens=None, fvcore_rel_diff=0.0, blocks=None, **options):
    spec = JobSpec("flops", MODEL, method, keep, method_options=tuple(sorted(options.items())))
    metrics = dict(gmacs=gmacs, gmacs_no_overhead=gmacs * 0.9, gmacs_fvcore=gmacs / (1 + fvcore_rel_diff),
                   fvcore_rel_diff=fvcore_rel_diff, fvcore_agrees=abs(fvcore_rel_diff) <= FVCORE_TOLERANCE,
                   params_m=0.6, tokens_per_block=tokens or [50] * 12,
                   blocks=blocks or [dict(n_in=t, n_attn=t, n_mlp=t, n_out=t, action="") for t in tokens or [50] * 12],
                   schedule={})
    write_record(run, spec, metrics, {}, time.time())
    return spec


def throughput(run, method="none", keep=1.0, batch=64, img_s=1000.0, dtype="fp32", spread=1.02, **options):
    spec = JobSpec("throughput", MODEL, method, keep, method_options=tuple(sorted(options.items())),
                   batch_size=batch, dtype=dtype)
    speedup = img_s / 1000.0
    metrics = dict(batch_size=batch, img_s=img_s, img_s_q25=img_s * 0.99, img_s_q75=img_s * 0.99 * spread,
                   img_s_all=[img_s] * 5, baseline_img_s=1000.0, baseline_img_s_all=[1000.0] * 5, speedup=speedup,
                   speedup_ci_low=speedup - 0.01, speedup_ci_high=speedup + 0.02, speedup_all=[speedup] * 5,
                   spread=spread, unstable=spread > 1.10, latency_ms=1000.0 * batch / img_s, peak_mem_mb=None,
                   repeats=5, warmup=2, iters=3, fused_attn=True, baseline_fused_attn=True, threads=1, dtype=dtype,
                   device="cpu")
    write_record(run, spec, metrics, {"device_name": "test-cpu"}, time.time())
    return spec


def published_csv(path, *rows):
    """A published.csv with the columns of bench/assets/published.csv."""
    path.write_text("model,method,keep_ratio,method_options,top1,regime,gmacs,gmacs_convention,gmacs_rounding,"
                    "throughput,throughput_conditions,source\n" + "".join(r + "\n" for r in rows))
    return path


@pytest.fixture
def run(tmp_path):
    """Baseline + two methods; a baseline under other conditions (fewer images); one failed job."""
    run = tmp_path / "run"
    acc(run, wrong=range(20))  # 90 %
    acc(run, wrong=range(10), limit=100)  # 90 % of 100: another condition with its own baseline
    acc(run, "random", 0.5, wrong=range(20))  # the baseline's very predictions: p = 1
    acc(run, "random", 0.5, wrong=range(15), limit=100)  # 85 % of 100
    acc(run, "idle", 0.5, wrong=range(60))  # 70 %: 40 more wrong, significant
    flops(run, gmacs=1.2345)
    flops(run, "random", 0.5, gmacs=0.6, tokens=[50] * 3 + [25] * 9)
    flops(run, "idle", 0.5, gmacs=0.7, tokens=[50] * 3 + [25] * 9, blocks=IDLE_BLOCKS)
    for batch, img_s in ((8, 500.0), (64, 1000.0)):
        throughput(run, batch=batch, img_s=img_s)
        throughput(run, "random", 0.5, batch=batch, img_s=img_s * 1.5)
    try:
        raise RuntimeError("out of memory at batch 512")
    except RuntimeError as exc:
        write_error(run, JobSpec("throughput", MODEL, "idle", 0.5, batch_size=512), exc, "traceback", None, time.time())
    return run


def row(summary, method, **where):
    rows = summary[summary["method"] == method]
    for col, value in where.items():
        rows = rows[rows[col] == value]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_load_runs_one_row_per_record(run):
    tidy = report.load_runs(run)
    assert len(tidy) == 5 + 3 + 4 + 1
    assert {"model", "method", "keep_ratio", "options", "options_key", "layers", "regime", "kind", "dtype", "device",
            "batch_size", "status", "key", "run", "top1", "gmacs", "img_s", "speedup", "blocks"} <= set(tidy.columns)
    assert "finetune_epochs" not in tidy and "metric" not in tidy  # schema 1 names
    failed = tidy[tidy["status"] == "error"]
    assert len(failed) == 1 and "out of memory" in failed.iloc[0]["error"]
    assert report.load_runs([run]).shape == tidy.shape
    ok = tidy[tidy["status"] == "ok"]
    assert set(ok["regime"]) == {"off-the-shelf"} and set(ok["layers"]) == {()}  # () = the method's default
    assert all(o == {} for o in ok["options"]) and set(ok["options_key"]) == {()}


def test_options_are_structured_data(tmp_path):
    """Options stay real values from the record to the summary: a per-block ToMe r list is a tuple in
    `options_key`, `options` and `opt.r`, and `options` can be handed to methods.apply as it is (the token
    pictures do). Text written from such a list and parsed back used to split '(8, 8, 4)' at every comma."""
    import methods
    from bench.models import create_model

    r = methods.get_method("tome").options["r"].coerce("r", "8,8,4")
    run = tmp_path / "run"
    flops(run, "tome", 1.0, gmacs=0.5, r=r, prop_attn=False)
    flops(run, "evit", 0.5, gmacs=0.6, fuse=False)
    tidy = report.load_runs(run)
    tome = tidy[tidy["method"] == "tome"].iloc[0]
    assert tome["options"] == {"prop_attn": False, "r": (8, 8, 4)}
    assert tome["options_key"] == (("prop_attn", False), ("r", (8, 8, 4)))
    assert tome["opt.r"] == (8, 8, 4) and tome["opt.prop_attn"] is False
    assert tidy.loc[tidy["method"] == "evit", "opt.fuse"].item() is False
    summary = report.summarize(tidy)
    tome = row(summary, "tome")
    assert tome["variant"] == "tome (prop_attn=False, r=8,8,4)"
    assert row(summary, "evit")["variant"] == "evit (fuse=False)"
    model = methods.apply(create_model(MODEL), "tome", keep_ratio=1.0, **tome["options"])
    assert model.token_reduction.describe()["options"]["r"] == (8, 8, 4)
    paths = report.write_report(run, tmp_path / "out", figures=False, pictures=False)
    csv = pd.read_csv(paths["summary"])
    assert json.loads(csv.loc[csv["method"] == "tome", "options"].item()) == {"prop_attn": False, "r": [8, 8, 4]}


def test_deltas_against_the_baseline_of_the_same_conditions(run):
    summary = report.summarize(report.load_runs(run))
    same = row(summary, "random", limit=N)
    assert same["delta_top1"] == pytest.approx(0.0)
    assert same["delta_top1_p"] == pytest.approx(1.0) and same["delta_top1_significant"] is False
    fewer = row(summary, "random", limit=100)
    assert fewer["delta_top1"] == pytest.approx(85.0 - 90.0)  # not against the 200-image baseline
    assert fewer["delta_top1_p"] == pytest.approx(2 * 1 / 32 - 1 / 32)  # 0 vs 5 discordant: mid-p 1/32
    idle = row(summary, "idle")
    assert idle["delta_top1"] == pytest.approx(70.0 - 90.0) and idle["delta_top1_significant"] is True
    assert same["delta_gmacs_pct"] == pytest.approx(100 * (0.6 / 1.2345 - 1))
    assert idle["delta_gmacs_pct"] == pytest.approx(100 * (0.7 / 1.2345 - 1))
    assert same["tp_batch_size"] == 64 and same["img_s"] == pytest.approx(1500.0)  # the largest batch
    assert same["speedup_ci_low"] < same["speedup"] < same["speedup_ci_high"]
    assert same["top1_ci_low"] < same["top1"] < same["top1_ci_high"]
    assert idle["blocks"] == IDLE_BLOCKS  # the FLOPs record's schedule, for the plots' idle band


def test_paper_table_columns_and_formatting(run):
    summary = report.summarize(report.load_runs(run))
    table = report.paper_table(summary)
    assert list(table.columns) == ["Model", "Method", "Keep", "Tokens per stage", "Regime", "Top-1 [95% CI]",
                                   "ΔTop-1", "GMACs", "ΔGMACs %", "img/s", "Speedup × [95% CI]", "Peak memory",
                                   "Notes"]
    base = table[(table["Method"] == "none") & table["Top-1 [95% CI]"].str.startswith("90.00 [")]
    assert len(base) == 2 and set(base["GMACs"]) == {"1.23"} and set(base["ΔTop-1"]) == {"—"}
    rnd = table[(table["Method"] == "random") & (table["Tokens per stage"] != "")].iloc[0]
    assert rnd["Tokens per stage"] == "50→25"
    assert rnd["GMACs"] == "0.60" and rnd["ΔGMACs %"] == "-51.4"
    assert rnd["img/s"] == "1,500 (bs 64, fp32, test-cpu)" and rnd["Speedup × [95% CI]"] == "1.50× [1.49, 1.52]"
    assert set(table["Regime"]) == {"off-the-shelf"} and set(table["Notes"]) == {""}
    deltas = set(table.loc[table["Method"] == "random", "ΔTop-1"])
    assert deltas == {"+0.00 (n.s.)", "-5.00"}  # 0 vs 5 discordant: mid-p 1/32 < 0.05
    assert table.loc[table["Method"] == "idle", "ΔTop-1"].item() == "-20.00"  # significant: no mark


def test_write_report_files_and_latex_structure(run, tmp_path):
    paths = report.write_report(run, tmp_path / "out", figures=False, pictures=False)
    for name in ("summary", "table_md", "table_tex", "report", "pairwise", "records"):
        assert paths[name].is_file(), name
    csv = pd.read_csv(paths["summary"])
    assert {"top1", "top1_ci_low", "delta_top1", "delta_top1_p", "gmacs", "delta_gmacs_pct", "img_s", "speedup",
            "speedup_ci_low", "speedup_ci_high", "regime", "published_top1", "gmacs_agrees"} <= set(csv.columns)
    assert json.loads(csv.loc[csv["method"] == "random", "tokens_per_block"].iloc[0])[-1] == 25
    md = paths["table_md"].read_text().splitlines()
    assert md[0].startswith("| Model") and "ΔTop-1" in md[0] and md[1].startswith("|:")
    tex = paths["table_tex"].read_text()
    for part in (r"\begin{table}", r"\caption{", r"\begin{tabular}", r"\toprule", r"\midrule", r"\bottomrule",
                 r"\end{tabular}", r"$\Delta$Top-1", r"Speedup $\times$"):
        assert part in tex, part
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    caption = tex[tex.index(r"\caption{"):].splitlines()[0]
    assert "95\\% CI" in caption and "test-cpu" in caption and "fp32" in caption
    assert "Δ" not in tex and "×" not in tex and "%" not in tex.replace("\\%", "")
    text = paths["report"].read_text()
    assert "out of memory at batch 512" in text and "![" not in text
    assert "| idle" in text and "| random" in text and "only A right" in text  # pairwise: idle vs random


def test_flops_only_run_and_merging(tmp_path):
    laptop, cluster = tmp_path / "laptop", tmp_path / "cluster"
    flops(laptop, gmacs=2.0)
    flops(laptop, "random", 0.5, gmacs=1.0)
    summary = report.summarize(report.load_runs(laptop))
    assert "top1" not in summary or summary["top1"].isna().all()
    text = report.console_table(laptop)
    assert text.splitlines()[0].split() == ["model", "method", "keep", "top-1", "GMACs", "img/s", "speedup"]
    assert "1.00" in text and "2.00" in text and "Noise floor" not in text  # nothing timed
    acc(cluster, wrong=range(10))
    acc(cluster, "random", 0.5, wrong=range(30))
    merged = report.summarize(report.load_runs([laptop, cluster]))
    rnd = row(merged, "random")
    assert rnd["gmacs"] == 1.0 and rnd["top1"] == pytest.approx(85.0) and rnd["delta_gmacs_pct"] == -50.0
    assert len(merged) == 2


def test_pairwise_tests_stay_within_one_training_budget(tmp_path):
    """Two recipes of one budget are tested against each other (their labels say which); off the shelf
    and finetuned never are, nor two budgets."""
    run = tmp_path / "run"
    acc(run, "random", 0.5, wrong=range(40))
    acc(run, "random", 0.5, wrong=range(20), finetune=FINETUNED)
    acc(run, "dynamicvit", 0.5, wrong=range(30), finetune=FINETUNED)
    acc(run, "dynamicvit", 0.5, wrong=range(10), finetune=FINETUNED + (("lr", 0.01),))
    acc(run, "dynamicvit", 0.5, wrong=range(5), finetune=(("epochs", 6),))
    pairs = pd.read_csv(report.write_report(run, tmp_path / "out", figures=False, pictures=False)["pairwise"])
    assert sorted(zip(pairs["a"], pairs["b"])) == sorted([
        ("dynamicvit [finetuned 2 ep]", "dynamicvit [finetuned 2 ep, lr=0.01]"),
        ("dynamicvit [finetuned 2 ep]", "random [finetuned 2 ep]"),
        ("dynamicvit [finetuned 2 ep, lr=0.01]", "random [finetuned 2 ep]")])


def test_empty_run_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert report.console_table(tmp_path / "empty") == "(no finished records)"
    paths = report.write_report(tmp_path / "empty", figures=False, pictures=False)
    assert paths["summary"].is_file()
    with pytest.raises(report.ReportError, match="does not exist"):
        report.load_runs(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()  # a mistyped run folder is not created


def test_published_figures_matched_with_default_options(run, tmp_path):
    # Written with an alias and a spelled-out default, as papers state them; and a row of another ratio.
    csv = published_csv(tmp_path / "published.csv",
                        f"{MODEL},baseline,1.0,,91.5,off-the-shelf,1.3,with_overhead,round,,,paper A",
                        f"{MODEL},random,0.7,,80.0,off-the-shelf,0.8,with_overhead,round,,,paper B",
                        f"{MODEL},random,0.5,seed=0,81.0,off-the-shelf,0.5,no_overhead,round,,,paper C")
    summary = report.summarize(report.load_runs(run), published_csv=csv)
    assert set(summary.loc[summary["method"] == "none", "published_top1"]) == {91.5}
    assert set(summary.loc[summary["method"] == "none", "gmacs_agrees"]) == {False}  # 1.2345 is not 1.3 ± 0.05
    rnd = summary[summary["method"] == "random"].set_index("limit")
    assert set(rnd["published_source"]) == {"paper C"}  # not paper B: another keep ratio
    assert set(rnd["published_top1"]) == {81.0}  # the same regime: beside ours
    assert rnd["gmacs_as_published"].tolist() == pytest.approx([0.6 * 0.9] * 2)  # ours without overhead too
    assert set(rnd["gmacs_agrees"]) == {True}  # 0.54 is within 0.5 ± 0.05
    assert report.summarize(report.load_runs(run))["published_source"].isna().all()  # the shipped file: DeiTs only
    paths = report.write_report(run, tmp_path / "out", figures=False, pictures=False, published_csv=csv)
    assert "Published figures beside ours" in paths["report"].read_text()


def test_cli(run, tmp_path, capsys):
    assert main([str(run), "--out", str(tmp_path / "cli"), "--no-figures", "--no-pictures"]) == 0
    out = capsys.readouterr().out
    assert "report:" in out and (tmp_path / "cli" / "report.md").is_file()
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_links_every_figure(run, tmp_path, monkeypatch):
    from bench.report import plots, viz

    def fake_figures(tidy, summary, out_dir):
        out_dir.mkdir(parents=True)
        return {name: out_dir / f"{name}.png" for name in ("top1_vs_gmacs", "tokens_per_layer")}

    monkeypatch.setattr(plots, "write_figures", fake_figures)
    monkeypatch.setattr(viz, "write_pictures", lambda summary, out_dir: (
        {"token selection": out_dir / "tokens_img0.png"}, {"tome keep 0.5": "no patch_state recorded"}))
    text = report.write_report(run, tmp_path / "out")["report"].read_text()
    for name in ("top1_vs_gmacs", "tokens_per_layer", "tokens_img0"):
        assert f"](figures/{name}.png)" in text and f"(figures/{name}.pdf)" in text
    assert "tome keep 0.5 skipped (no patch_state recorded)" in text


def test_tokens_per_stage_and_rates():
    assert report.tokens_per_stage([50, 50, 50, 35, 35, 35, 25, 25]) == "50→35→25"
    assert report.tokens_per_stage(list(range(50, 14, -3))) == "50→47→…→17 (12 stages)"
    assert report.tokens_per_stage(None) == ""
    assert tables._fmt_rate(12345.6) == "12,346" and tables._fmt_rate(0.4567) == "0.457"
