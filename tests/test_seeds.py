"""--seeds: which jobs it expands (a method's seed option, finetuned configurations), canonical keys, and
the mean ± std rows of the report (frame.collapse_seeds, the tables)."""
from __future__ import annotations

import math

import pandas as pd
import pytest

import run_all
from bench import grid, validate
from bench.report import frame, tables


def _plan(tmp_path, *argv):
    request, _ = run_all.parse([*argv, "--device", "cpu", "--out", str(tmp_path / "run")])
    return grid.plan(request)


def _jobs(plan, kind):
    return sorted(((s.method, s.seed, dict(s.method_options).get("seed")) for s in plan.jobs if s.kind == kind),
                  key=str)


def test_seeds_parse():
    request, _ = run_all.parse(["--seeds", "2,0,2,1"])
    assert request.seeds == (2, 0, 1) and request.seed == 0
    assert run_all.parse([])[0].seeds is None
    for bad in ("-1", "a", "1.5"):
        with pytest.raises(run_all.CliError, match="seed"):
            run_all.parse(["--seeds", bad])


def test_random_method_runs_once_per_seed(tmp_path):
    plan = _plan(tmp_path, "--methods", "evit,random", "--ratios", "0.5", "--metrics", "acc,flops,trace",
                 "--seeds", "0,1,2")
    expected = [("evit", 0, None), ("none", 0, None), ("random", 0, None), ("random", 1, 1), ("random", 2, 2)]
    assert _jobs(plan, "acc") == sorted(expected, key=str)
    assert _jobs(plan, "trace") == sorted(expected, key=str)
    # FLOPs read no seed (reset to 0) but the option is part of the configuration
    assert _jobs(plan, "flops") == sorted([("evit", 0, None), ("none", 0, None), ("random", 0, None),
                                           ("random", 0, 1), ("random", 0, 2)], key=str)


def test_keys_are_canonical(tmp_path):
    def acc_keys(*argv):
        return {s.key for s in _plan(tmp_path, "--methods", "random", "--metrics", "acc", *argv).jobs}

    plain = acc_keys()
    # seed 0 is the default option: the same jobs as without --seeds; deterministic jobs keep --seed
    assert plain <= acc_keys("--seeds", "0,1")
    # --seeds S is --seed S with the seed option S for the random method (the baseline keeps --seed)
    assert {k for k in acc_keys("--seeds", "2") if "-random-" in k} == \
        {k for k in acc_keys("--seed", "2", "--method-opt", "random.seed=2") if "-random-" in k}
    assert acc_keys("--seeds", "3,4") - acc_keys("--seeds", "3") != set()


def test_seed_option_and_seeds_conflict(tmp_path):
    with pytest.raises(validate.UsageError, match="--seeds"):
        _plan(tmp_path, "--methods", "random", "--seeds", "0,1", "--method-opt", "random.seed=4")


def test_finetuned_configurations_run_once_per_seed(tmp_path):
    plan = _plan(tmp_path, "--methods", "evit", "--ratios", "0.5", "--metrics", "acc", "--seeds", "0,1",
                 "--finetune-epochs", "1")
    assert _jobs(plan, "acc") == sorted([("evit", 0, None), ("evit", 1, None), ("none", 0, None)], key=str)
    tunes = [s for s in plan.jobs if s.kind == "finetune"]
    assert sorted(s.seed for s in tunes) == [0, 1] and all(s.method == "evit" for s in tunes)
    # each accuracy job comes after its own finetune job
    order = [s.key for s in plan.jobs]
    for tune in tunes:
        acc = next(s for s in plan.jobs if s.kind == "acc" and s.seed == tune.seed and s.method == "evit")
        assert order.index(tune.key) < order.index(acc.key)


def test_without_seeds_nothing_changes(tmp_path):
    plan = _plan(tmp_path, "--methods", "evit,random", "--ratios", "0.5", "--metrics", "acc", "--seed", "3")
    assert _jobs(plan, "acc") == sorted([("evit", 3, None), ("none", 3, None), ("random", 3, None)], key=str)


# ----------------------------------------------------------------------------------------------
# Mean ± std in reports


def _row(**kw) -> dict:
    base = dict(model="m", method="random", options_key=(), layers=(), keep_ratio=0.5, checkpoint="",
                pretrained=False, random_weights=False, regime="off-the-shelf", finetune=(), data="d", limit=None,
                acc_dtype="fp32", acc_device="cpu", seed=0, top1=70.0, top1_ci_low=65.0, top1_ci_high=75.0,
                delta_top1=-20.0, ece=0.05, gmacs=0.5, preds_path="x", delta_top1_significant=True)
    base.update(kw)
    base["options"] = dict(base["options_key"])
    base["variant"] = frame.variant_label(base)
    return base


def test_collapse_seeds_means_and_stds():
    summary = pd.DataFrame([
        _row(method="none", keep_ratio=1.0, top1=90.0, delta_top1=math.nan),
        _row(seed=0, top1=70.0, delta_top1=-20.0, ece=0.05),
        _row(seed=1, options_key=(("seed", 1),), top1=72.0, delta_top1=-18.0, ece=0.07),
        _row(seed=2, options_key=(("seed", 2),), top1=77.0, delta_top1=-13.0, ece=0.09),
        _row(seed=0, keep_ratio=0.7, top1=80.0),  # another ratio: one seed, unchanged
    ])
    out = frame.collapse_seeds(summary)
    assert len(out) == 3
    mean = out[(out["method"] == "random") & (out["keep_ratio"] == 0.5)].iloc[0]
    assert mean["top1"] == pytest.approx(73.0) and mean["top1_std"] == pytest.approx(3.605551, rel=1e-5)  # ddof 1
    assert mean["ece"] == pytest.approx(0.07) and mean["ece_std"] == pytest.approx(0.02)
    assert mean["n_seeds"] == 3 and mean["seeds"] == [0, 1, 2] and mean["variant"] == "random"
    assert math.isnan(mean["top1_ci_low"]) and mean["delta_top1_significant"] is None
    single = out[out["keep_ratio"] == 0.7].iloc[0]
    assert single["n_seeds"] == 1 and single["top1"] == 80.0 and single["top1_ci_low"] == 65.0
    table = tables.paper_table(out)
    shown = table[table["Keep"] == "0.5"].iloc[0]
    assert shown["Top-1 [95% CI]"] == "73.00 ± 3.61" and shown["ΔTop-1"] == "-17.00 ± 3.61"
    assert shown["Notes"] == "mean ± std over 3 seeds (0, 1, 2)"
    assert table[table["Keep"] == "0.7"].iloc[0]["Top-1 [95% CI]"] == "80.00 [65.00, 75.00]"


def test_rows_that_differ_in_more_than_the_seed_stay_apart():
    summary = pd.DataFrame([_row(seed=0), _row(seed=1, options_key=(("seed", 1),), data="other")])
    assert frame.collapse_seeds(summary)["n_seeds"].tolist() == [1, 1]


def test_seeds_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = run_all.main(["--methods", "random", "--ratios", "0.5", "--metrics", "acc", "--limit", "16",
                       "--seeds", "0,1", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    console = capsys.readouterr().out
    assert "mean ± std over 2 seeds (0, 1)" in console and " ± " in console
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary.loc[summary["method"] == "random", "seed"]) == [0, 1]  # one row per seed in the CSV
    assert "mean ± std over 2 seeds (0, 1)" in (out / "table.md").read_text()
