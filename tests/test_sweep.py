"""Sweep files: expansion into the same jobs as the equivalent flags, the shipped sweeps, bad files."""
from __future__ import annotations

from pathlib import Path

import pytest

import run_all
from bench import grid, sweep

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def keys_of_flags(*argv) -> set[str]:
    request, _ = run_all.parse([*argv, "--device", "cpu", "--out", "/tmp/unused"])
    return {s.key for s in grid.plan(request).jobs}


def keys_of_sweep(path, *argv) -> set[str]:
    request, _ = run_all.parse(["--sweep", str(path), "--device", "cpu", "--out", "/tmp/unused", *argv])
    return {s.key for s in grid.plan_many(sweep.expand(request.sweep, request)).jobs}


def test_a_sweep_expands_to_the_jobs_of_the_equivalent_flags(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[base]\nmethods = ["idle", "evit"]\nratios = [0.5]\nmetrics = ["flops", "acc"]\n'
                    '[[sweep]]\n"evit.fuse" = [true, false]\n"layers.idle" = [[3, 6, 9], [2, 5, 8]]\n'
                    '[[sweep]]\nratios = [0.7]\nfinetune_epochs = [1]\n"finetune.cut_weight" = [10.0]\n')
    by_flags = keys_of_flags("--methods", "idle,evit", "--ratios", "0.5", "--metrics", "flops,acc",
                             "--method-opt", "evit.fuse=true", "--method-opt", "evit.fuse=false",
                             "--layers", "idle=3,6,9", "--layers", "idle=2,5,8")
    by_flags |= keys_of_flags("--methods", "idle,evit", "--ratios", "0.7", "--metrics", "flops,acc",
                              "--finetune-epochs", "1", "--finetune-opt", "cut_weight=10")
    assert keys_of_sweep(path) == by_flags
    points = sweep.expand(path, run_all.parse(["--sweep", str(path)])[0])
    assert len(points) == 2 * 2 + 1  # the first block crosses its axes; blocks are unioned


def test_the_shipped_idlevit_sweep_is_the_paper_ablation_grid():
    jobs = grid.plan_many(sweep.expand(SWEEPS / "idlevit_ablations.toml",
                                       run_all.parse(["--device", "cpu", "--out", "/tmp/unused"])[0])).jobs
    tuned = [s for s in jobs if s.kind == "finetune"]
    recipes = {(dict(s.finetune)["cut_loss"], dict(s.finetune)["cut_weight"], s.options().get("preset", "infer"),
                s.keep_ratio) for s in tuned}
    # 4 loss types + 3 other weights + the main preset at 0.5/0.7, and 3 more keep ratios at the defaults
    assert len(recipes) == 2 * (4 + 3 + 1) + 3
    assert ("both", 20.0, "infer", 0.5) in recipes and ("none", 20.0, "infer", 0.7) in recipes
    assert ("both", 20.0, "main", 0.5) in recipes and ("both", 20.0, "infer", 0.9) in recipes
    assert {s.kind for s in jobs} == {"acc", "flops", "finetune"}


@pytest.mark.parametrize("name", ["evit_fuse.toml", "dynamicvit_ratio_weight.yaml"])
def test_the_other_shipped_sweeps_plan(name):
    request = run_all.parse(["--device", "cpu", "--out", "/tmp/unused"])[0]
    assert grid.plan_many(sweep.expand(SWEEPS / name, request)).jobs


@pytest.mark.parametrize("text, named", [
    ('[[sweep]]\nbogus = [1]\n', "unknown sweep axis 'bogus'"),
    ('[[sweep]]\n"evit.fuse" = ["maybe"]\n', "fuse='maybe'"),
    ('[[sweep]]\n"evitt.fuse" = [true]\n', "'evitt'"),
    ('[base]\nmethods = ["nosuch"]\n', "'nosuch'"),
    ('[[sweep]]\nratios = 0.5\n', "non-empty list"),
    ('[[sweep]]\n"finetune.cut_weight" = [1.0]\n', "finetune_epochs"),
    ('[other]\nx = 1\n', "unknown section 'other'"),
    ('[[sweep]\n', "not valid"),
])
def test_bad_sweep_files_are_one_line_and_exit_2(tmp_path, capsys, text, named):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = tmp_path / "run"
    assert run_all.main(["--sweep", str(path), "--metrics", "flops", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and not out.exists()


def test_a_missing_sweep_file(tmp_path, capsys):
    assert run_all.main(["--sweep", str(tmp_path / "none.toml"), "--out", str(tmp_path / "run")]) == 2
    assert "cannot be read" in capsys.readouterr().err
