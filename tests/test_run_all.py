"""run_all.py end to end on tiny grids; the plan: grid expansion, canonical job keys, --method-opt / --layers."""
from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

import bench.models
import run_all
from bench import grid, jobs, records
from bench.records import load_grid, save_grid

EMBEDDED = "tokenbench_vit_fmnist"
# Hand count of the stock embedded model (docs/methods.md#block-cost): 12 blocks of
# 12*n*D^2 + 2*n^2*D with n = 49 patches + CLS, D = 64, MLP 4*D; stem 49 * (1*4*4) * 64; head 64 * 10.
EMBEDDED_BASELINE_MACS = 12 * (12 * 50 * 64**2 + 2 * 50**2 * 64) + 49 * 16 * 64 + 64 * 10


def specs_of(*argv, out=None):
    request, _ = run_all.parse(["--models", EMBEDDED, "--device", "cpu", "--out", str(out or "/tmp/unused"), *argv])
    return list(grid.plan(request).jobs)


def records_by_key(out: Path) -> dict:
    done, failed, problems = records.scan(out)
    assert not problems
    return {k: r.data for k, r in done.items()}


# ---------------------------------------------------------------------------------------------
# Grid expansion and keys

def test_grid_has_one_baseline_per_model_metric_and_batch_size():
    specs = specs_of("--methods", "idle", "--ratios", "0.5,0.7", "--batch-size", "32", "--batch-sizes", "1,8")
    # acc: baseline + 2 ratios; flops: the same; throughput: the same per batch size.
    assert len(specs) == 3 + 3 + 2 * 3
    baselines = [s for s in specs if s.method == "none"]
    assert Counter((s.kind, s.batch_size) for s in baselines) == {
        ("acc", 32): 1, ("flops", 1): 1, ("throughput", 1): 1, ("throughput", 8): 1}
    assert all(s.keep_ratio == 1.0 and s.layers is None and s.method_options == () for s in baselines)
    throughput = [s for s in specs if s.kind == "throughput"]
    assert Counter(s.batch_size for s in throughput) == {1: 3, 8: 3}
    assert {(s.method, s.keep_ratio) for s in specs} == {("none", 1.0), ("idle", 0.5), ("idle", 0.7)}
    assert len({s.key for s in specs}) == len(specs)
    assert all(s == jobs.normalise(s) for s in specs)  # each kind's fields only: keys ignore the rest


def test_default_configurations_spelled_out_get_the_default_key():
    """--layers idle=3,...,11 is IdleViT's default layer set and evit.fuse=true EViT's default option:
    the same configuration as giving neither, so the same job, not a second row."""
    plain = specs_of("--methods", "idle,evit", "--metrics", "flops")
    spelled = specs_of("--methods", "idle,evit", "--metrics", "flops", "--layers", "idle=3,4,5,6,7,8,9,10,11",
                       "--method-opt", "evit.fuse=true", "--method-opt", "idle.preset=infer")
    assert [s.key for s in spelled] == [s.key for s in plain]
    main = specs_of("--methods", "idle", "--metrics", "flops", "--method-opt", "idle.preset=main")
    by_layers = specs_of("--methods", "idle", "--metrics", "flops", "--layers", "idle=4,5,6,7,8,9,10,11")
    assert {s.key for s in main} == {s.key for s in by_layers}  # one configuration, two spellings
    assert [(s.layers, s.options()) for s in by_layers if s.method == "idle"] == [(None, {"preset": "main"})]


def test_parsing_imports_neither_methods_nor_timm():
    import subprocess
    import sys

    code = ("import sys, run_all; run_all.parse(['--methods', 'idle,evit', '--ratios', '0.5']); "
            "print(sorted(m for m in ('methods', 'timm', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(run_all.__file__).parent)
    assert out.stdout.strip() == "[]"


def test_method_at_ratio_one_is_its_own_row_and_none_alone_is_the_baseline():
    specs = specs_of("--methods", "idle", "--ratios", "1.0", "--metrics", "flops")
    assert sorted((s.method, s.keep_ratio) for s in specs) == [("idle", 1.0), ("none", 1.0)]
    assert specs_of("--methods", "none", "--ratios", "0.5,0.7", "--metrics", "flops")[0].method == "none"
    assert len(specs_of("--methods", "none,baseline", "--ratios", "0.5,0.7", "--metrics", "flops")) == 1


def test_keys_do_not_depend_on_flag_order_or_spelling_and_survive_grid_json(tmp_path):
    specs = specs_of("--methods", "idle,dynamicvit", "--ratios", "0.5,0.7", "--metrics", "acc,flops",
                     "--method-opt", "idle.cheap_score=true", "--method-opt", "idle.preset=main")
    same = specs_of("--methods", "dyvit,idlevit,idle", "--ratios", "0.70,0.5,0.5", "--metrics", "flops,acc",
                    "--method-opt", "idle.preset=main", "--method-opt", "idle.cheap_score=1")
    assert {s.key for s in specs} == {s.key for s in same}
    save_grid(tmp_path, specs)
    assert [s.key for s in load_grid(tmp_path)] == [s.key for s in specs]


def test_flops_keys_ignore_accuracy_only_settings(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "c0"
    elsewhere.mkdir(parents=True)
    (elsewhere / "a.png").write_bytes(b"")
    plain = {s.key for s in specs_of("--methods", "idle", "--metrics", "flops")}
    assert plain == {s.key for s in specs_of("--methods", "idle", "--metrics", "flops", "--batch-size", "32",
                                             "--limit", "10", "--data-dir", str(elsewhere.parent))}
    acc = {s.key for s in specs_of("--methods", "idle", "--metrics", "acc")}
    assert acc.isdisjoint({s.key for s in specs_of("--methods", "idle", "--metrics", "acc", "--limit", "10")})


# ---------------------------------------------------------------------------------------------
# --method-opt and --layers

def test_method_opt_values_are_coerced_so_equal_settings_share_a_key():
    spellings = ["false", "0", "no", "False"]
    keysets = [{s.key for s in specs_of("--methods", "idle", "--metrics", "flops",
                                        "--method-opt", f"idle.cheap_score={v}")} for v in spellings]
    assert all(k == keysets[0] for k in keysets)
    idle = [s for s in specs_of("--methods", "idle", "--metrics", "flops", "--method-opt", "idlevit.cheap_score=yes")
            if s.method == "idle"]
    assert [s.method_options for s in idle] == [(("cheap_score", True),)]


def test_repeated_method_opt_and_layers_sweep():
    specs = specs_of("--methods", "idle", "--ratios", "0.5,0.7", "--metrics", "flops",
                     "--method-opt", "idle.preset=infer", "--method-opt", "idle.preset=main",
                     "--method-opt", "idle.cheap_score=true")
    idle = [s for s in specs if s.method == "idle"]
    assert sorted((s.options().get("preset", "infer"), s.options()["cheap_score"], s.keep_ratio) for s in idle) == [
        ("infer", True, 0.5), ("infer", True, 0.7), ("main", True, 0.5), ("main", True, 0.7)]
    specs = specs_of("--methods", "idle", "--metrics", "flops", "--layers", "idle=9,3,6", "--layers", "idle=2,5,8")
    assert sorted(s.layers for s in specs if s.method == "idle") == [(2, 5, 8), (3, 6, 9)]
    bare = specs_of("--methods", "idle", "--metrics", "flops", "--layers", "4,7")
    assert [s.layers for s in bare if s.method == "idle"] == [(4, 7)]


@pytest.mark.parametrize("argv, named", [
    (["--method-opt", "idle.nosuch=1"], "nosuch"),
    (["--method-opt", "idle.preset=bogus"], "bogus"),
    (["--method-opt", "idle.cheap_score=maybe"], "maybe"),
    (["--method-opt", "cheap_score=1"], "cheap_score=1"),
    (["--method-opt", "dynamicvit.x=1"], "dynamicvit"),
    (["--method-opt", "nomethod.x=1"], "nomethod"),
    (["--layers", "idle=3,99"], "99"),
    (["--layers", "idle=3,x"], "3,x"),
    (["--ratios", "0.5,abc"], "abc"),
    (["--ratios", "0"], "0"),
    (["--metrics", "acc,speed"], "speed"),
    (["--methods", ","], "valid"),
    (["--batch-sizes", "1,-4"], "-4"),
    (["--max-array-size", "-1"], "-1"),
    (["--array-parallelism", "0"], "0"),
    (["--gpus-per-node", "-1"], "-1"),
    (["--mem", "lots"], "lots"),
    (["--time", "soon"], "soon"),
    (["--no-wait"], "--no-wait"),
    (["--launcher", "local", "--no-wait"], "--no-wait"),
    (["--out", "x" * 300], "at most"),
])
def test_bad_flags_give_one_line_exit_2_and_write_nothing(tmp_path, capsys, argv, named):
    out = tmp_path / "run"
    argv = ["--methods", "idle", *argv] if "--methods" not in argv else argv
    assert run_all.main(["--models", EMBEDDED, "--metrics", "flops", "--out", str(out), *argv]) == 2
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("run_all.py: error: ") and named in err
    assert "Traceback" not in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# End to end (FLOPs jobs: seconds on CPU, no weights, no data)

FLOPS_GRID = ["--models", EMBEDDED, "--methods", "idle", "--ratios", "0.5,0.7", "--metrics", "flops",
              "--device", "cpu"]


def finished_times(out: Path) -> dict:
    return {k: d["finished"] for k, d in records_by_key(out).items()}


@pytest.fixture
def no_figures(monkeypatch):
    import bench.report

    monkeypatch.setattr(bench.report, "write_report",
                        functools.partial(bench.report.write_report, figures=False, pictures=False))


@pytest.fixture
def fast_jobs(monkeypatch):
    """For tests of the run logic, not of the numbers: a FLOPs job that only reads its spec (fvcore
    traces take seconds here), reports without figures, and the list of specs each run measured."""
    import bench.report

    measured = []

    def fake_flops(spec, context):
        measured.append(spec)
        if spec.method == "idle" and spec.keep_ratio == 0.5 and fail_keys.get("on"):
            raise RuntimeError("injected failure for the test")
        return dict(gmacs=spec.keep_ratio, tokens_per_block=[])

    fail_keys = {}
    monkeypatch.setitem(jobs._KINDS, "flops", dataclasses.replace(jobs.get("flops"), run=fake_flops))
    monkeypatch.setattr(bench.report, "write_report",
                        functools.partial(bench.report.write_report, figures=False, pictures=False))
    return measured, fail_keys


def test_flops_grid_end_to_end(tmp_path, capsys, no_figures):
    out = tmp_path / "run"
    assert run_all.main([*FLOPS_GRID, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "3 done, 0 skipped, 0 failed" in stdout
    assert "idle" in stdout and "none" in stdout  # the table
    recs = records_by_key(out)
    assert len(recs) == 3 and {s.key for s in load_grid(out)} == set(recs)
    by_row = {(d["spec"]["method"], d["spec"]["keep_ratio"]): d["metrics"] for d in recs.values()}
    baseline = by_row[("none", 1.0)]
    assert baseline["gmacs"] == pytest.approx(EMBEDDED_BASELINE_MACS / 1e9, rel=1e-9)
    assert baseline["gmacs_fvcore"] == pytest.approx(EMBEDDED_BASELINE_MACS / 1e9, rel=1e-9)
    assert baseline["tokens_per_block"] == [50] * 12
    assert by_row[("idle", 0.5)]["gmacs"] < by_row[("idle", 0.7)]["gmacs"] < baseline["gmacs"]
    for metrics in by_row.values():
        assert {"gmacs", "gmacs_no_overhead", "gmacs_fvcore", "params_m", "tokens_per_block",
                "schedule", "blocks", "fvcore_rel_diff"} <= set(metrics)
        assert metrics["gmacs_no_overhead"] <= metrics["gmacs"]
        assert metrics["fvcore_agrees"] is True and abs(metrics["fvcore_rel_diff"]) <= 1e-3
    env = next(iter(recs.values()))["env"]
    assert len(env["git_commit"]) == 40 and isinstance(env["git_dirty"], bool)  # the checkout run_all ran from


def test_second_run_skips_everything_and_force_redoes_it(tmp_path, capsys, fast_jobs):
    out = tmp_path / "run"
    measured, _ = fast_jobs
    assert run_all.main([*FLOPS_GRID, "--out", str(out)]) == 0
    first = finished_times(out)
    assert len(first) == len(measured) == 3
    capsys.readouterr()
    measured.clear()
    assert run_all.main([*FLOPS_GRID, "--out", str(out)]) == 0
    assert "0 done, 3 skipped" in capsys.readouterr().out
    assert finished_times(out) == first and measured == []

    assert run_all.main([*FLOPS_GRID, "--out", str(out), "--force"]) == 0
    assert "3 done, 0 skipped" in capsys.readouterr().out
    again = finished_times(out)
    assert again.keys() == first.keys() and all(again[k] > first[k] for k in first)
    assert sorted(s.key for s in measured) == sorted(first)

    measured.clear()
    assert run_all.main(["--collect", str(out)]) == 0  # gathers, measures nothing
    assert measured == [] and "3 done" in capsys.readouterr().out
    assert run_all.main(["--collect", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grid.json" in err
    for argv in (["--collect", ""], ["--collect", str(out), "--methods", "evit"], ["--collect", str(out), "--limit", "3"]):
        assert run_all.main(argv) == 2  # an empty folder name, or grid flags --collect would ignore
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--collect" in err
    assert measured == []


def test_failing_job_is_recorded_others_finish_and_retry_failed_reruns_only_it(tmp_path, capsys, fast_jobs):
    out = tmp_path / "run"
    measured, failing = fast_jobs
    failing["on"] = True
    assert run_all.main([*FLOPS_GRID, "--out", str(out)]) == 1
    captured = capsys.readouterr()
    [bad] = [s for s in load_grid(out) if s.method == "idle" and s.keep_ratio == 0.5]
    assert bad.key in captured.err and "injected failure for the test" in captured.err
    assert "0 failed" not in captured.out and "1 failed" in captured.out
    error = json.loads(records.error_path(out, bad.key).read_text())
    assert "RuntimeError: injected failure" in error["error"] and "fake_flops" in error["traceback"]
    good = finished_times(out)
    assert len(good) == 2 and bad.key not in good and len(measured) == 3

    # Without --retry-failed the failure stands and nothing is rerun.
    measured.clear()
    assert run_all.main([*FLOPS_GRID, "--out", str(out)]) == 1
    assert "0 done, 2 skipped, 1 failed" in capsys.readouterr().out
    assert measured == []
    assert json.loads(records.error_path(out, bad.key).read_text())["finished"] == error["finished"]

    failing["on"] = False
    assert run_all.main([*FLOPS_GRID, "--out", str(out), "--retry-failed"]) == 0
    assert "1 done, 2 skipped, 0 failed" in capsys.readouterr().out
    assert [s.key for s in measured] == [bad.key]
    after = finished_times(out)
    assert {k: after[k] for k in good} == good and bad.key in after
    assert not records.error_path(out, bad.key).exists()


def test_invalid_record_is_reported_and_recomputed(tmp_path, capsys, fast_jobs):
    out = tmp_path / "run"
    measured, _ = fast_jobs
    assert run_all.main([*FLOPS_GRID, "--out", str(out)]) == 0
    key = next(iter(records_by_key(out)))
    records.record_path(out, key).write_text('{"schema": 1, "key": "trunc')
    capsys.readouterr()
    measured.clear()
    assert run_all.main([*FLOPS_GRID, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 done, 2 skipped" in captured.out and key in captured.err
    assert [s.key for s in measured] == [key] and key in records_by_key(out)


def test_all_metrics_on_a_tiny_grid(tmp_path, capsys, no_figures):
    """Accuracy on 32 Fashion-MNIST images with random weights and throughput at batch 2 (FLOPs: above)."""
    checkpoint = tmp_path / "random.safetensors"
    save_file(bench.models.create_model(EMBEDDED).state_dict(), str(checkpoint))
    out = tmp_path / "run"
    argv = ["--models", EMBEDDED, "--methods", "idle", "--ratios", "0.5", "--metrics", "acc,throughput",
            "--device", "cpu", "--checkpoint", str(checkpoint), "--limit", "32", "--batch-size", "16",
            "--batch-sizes", "2", "--repeats", "5", "--max-repeats", "6", "--iters", "1", "--warmup", "0",
            "--out", str(out)]
    assert run_all.main(argv) == 0
    assert "4 done, 0 skipped, 0 failed" in capsys.readouterr().out
    recs = {(d["spec"]["kind"], d["spec"]["method"]): d for d in records_by_key(out).values()}
    assert set(recs) == {(m, k) for m in ("acc", "throughput") for k in ("none", "idle")}
    for method in ("none", "idle"):
        acc = recs[("acc", method)]["metrics"]
        assert acc["n_images"] == 32 and {"top1", "top5", "tokens_per_block", "data_config"} <= set(acc)
        preds = np.load(records.preds_path(out, recs[("acc", method)]["key"]).with_name(acc["preds_file"]))
        assert preds["labels"].shape == (32,) and preds["top5"].shape == (32, 5)
        assert acc["top1"] == pytest.approx(100 * np.mean(preds["top5"][:, 0] == preds["labels"]))
        timed = recs[("throughput", method)]
        assert timed["spec"]["extra"] == {"iters": 1, "repeats": 5, "max_repeats": 6, "warmup": 0}
        assert timed["metrics"]["batch_size"] == 2 and len(timed["metrics"]["img_s_all"]) in (5, 6)
    assert recs[("acc", "idle")]["metrics"]["tokens_per_block"] != recs[("acc", "none")]["metrics"]["tokens_per_block"]
