"""Hostile runs, end to end: random weights marked everywhere (item 1), an unsteady machine flagged (item 2),
two runs into one folder (item 4), Ctrl-C while the heavy modules import (item 14), and the minor items
of 15: what a non-checkpoint file is, an option's valid values, a ToMe r larger than a block can merge.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import run_all
from bench import records, report
from tests.test_faults import FLOPS_GRID, GRID_SIZE, grid_keys

REPO = Path(__file__).resolve().parents[1]


def one_error_line(err: str, *expected: str) -> str:
    lines = [line for line in err.strip().splitlines() if line and not line.startswith("[")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Item 1: --random-weights measures an untrained model, and the record and the report say so

def test_random_weights_are_untrained_and_marked_in_the_record_and_report(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["--metrics", "acc", "--methods", "evit", "--ratios", "0.5", "--limit", "64", "--out"]
    assert run_all.main([*argv, str(run_dir), "--random-weights"]) == 0
    trained = tmp_path / "trained"
    assert run_all.main([*argv, str(trained)]) == 0
    console = capsys.readouterr().out
    for folder, weights in ((run_dir, "random-init"), (trained, "pretrained")):
        done, _, _ = records.scan(folder)
        assert {rec.metrics["weights"] for rec in done.values()} == {weights}
    baseline = {folder: next(rec.metrics["top1"] for rec in records.scan(folder)[0].values() if rec.spec.method == "none")
                for folder in (run_dir, trained)}
    assert baseline[run_dir] < 40 < 80 < baseline[trained]  # untrained: about chance on 10 classes
    table = (run_dir / "table.md").read_text()
    assert table.count("random weights") == 2 and "random weights" not in (trained / "table.md").read_text()
    assert "random weights" in console


# ---------------------------------------------------------------------------------------------
# Item 2: a timing on a machine that is not quiet is flagged in the record and the report

def test_an_unsteady_machine_flags_the_timing(tmp_path, capsys, monkeypatch):
    from bench.jobs import throughput

    rng = np.random.default_rng(0)
    monkeypatch.setattr(throughput, "_timed", lambda net, x, iters, sync: float(rng.uniform(0.005, 0.02)))
    run_dir = tmp_path / "run"
    assert run_all.main(["--metrics", "throughput", "--methods", "evit", "--ratios", "0.5", "--batch-sizes", "1",
                         "--warmup", "0", "--iters", "1", "--repeats", "5", "--max-repeats", "5",
                         "--out", str(run_dir)]) == 0
    done, _, _ = records.scan(run_dir)
    for rec in done.values():
        assert rec.metrics["unstable"] is True and rec.metrics["spread"] > 1.1
        assert rec.metrics["threads"] == throughput.job_cpus()
    assert (run_dir / "table.md").read_text().count("timing unstable") == 2


# ---------------------------------------------------------------------------------------------
# Item 4: two real runs into one --out: every job runs once, and the later run says it waited

TWO_RUNS = """
import os, sys, time
sys.path[:0] = [{repo!r}]
import dataclasses, run_all
from bench import jobs
from tests.test_faults import cheap_flops

def slow(spec, context):  # a line per measurement, in a log both processes append to
    with open(os.environ["RAN_LOG"], "a") as log:
        log.write(spec.key + "\\n")
    time.sleep(float(os.environ["JOB_SECONDS"]))
    return cheap_flops(spec, context)

jobs._KINDS["flops"] = dataclasses.replace(jobs.get("flops"), run=slow)
sys.exit(run_all.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_runs_into_one_folder_measure_every_job_once(tmp_path):
    run_dir, ran = tmp_path / "run", tmp_path / "ran.log"
    script = tmp_path / "two_runs.py"
    script.write_text(TWO_RUNS.format(repo=str(REPO)))
    env = dict(os.environ, RAN_LOG=str(ran), JOB_SECONDS="3")
    argv = [sys.executable, str(script), *FLOPS_GRID, "--out", str(run_dir)]
    first = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ran.exists():  # the first run is measuring: start the second one now
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (out1, err1), (out2, err2) = first.communicate(timeout=300), second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    measured = ran.read_text().split()
    assert sorted(measured) == sorted(grid_keys(run_dir)) and len(measured) == GRID_SIZE  # once each
    assert "waiting for" in err2 and "another process" in err2, err2
    assert "Traceback" not in err1 + err2
    done, failed, problems = records.scan(run_dir)
    assert len(done) == GRID_SIZE and not failed and not problems


# ---------------------------------------------------------------------------------------------
# Item 14: Ctrl-C while the heavy modules (torch, pandas) are being imported

STALL = """
import importlib.abc, os, sys, time

class Stall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == os.environ.get("STALL_ON"):
            open(os.environ["STALL_MARKER"], "w").close()
            time.sleep(60)  # the test interrupts this
        return None

sys.meta_path.insert(0, Stall())
"""


@pytest.mark.slow
@pytest.mark.parametrize("argv, module, prog", [
    (["run_all.py", "--metrics", "flops", "--methods", "evit"], "torch", "run_all.py"),
    (["run_all.py", "--collect", "results/none-such"], "torch", "run_all.py"),
    (["-m", "bench.report", "results/none-such"], "pandas", "python -m bench.report"),
    (["-m", "bench.report", "results/none-such"], "torch", "python -m bench.report"),
], ids=["run", "collect", "report-pandas", "report-torch"])
def test_ctrl_c_during_start_up_is_one_line_and_130(tmp_path, argv, module, prog):
    hooks, marker, out = tmp_path / "hooks", tmp_path / "importing", tmp_path / "run"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(STALL)
    env = dict(os.environ, PYTHONPATH=str(hooks), STALL_ON=module, STALL_MARKER=str(marker))
    args = [*argv, "--out", str(out)] if argv[0] == "run_all.py" and "--collect" not in argv else argv
    # A child inherits an ignored SIGINT (a job started in the background by a non-interactive shell, as CI
    # may be), and Python then installs no handler: restore the default, as a terminal the user types in has.
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()] == [line for line in err.splitlines() if prog in line]
    one_error_line(err, prog, "interrupted")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Item 15: a checkpoint that is not one says what it is; an option's valid values; ToMe's r clamped

CHECKPOINTS = {
    "text": (b"these are my notes, not weights\n", "a text file", "these are my notes"),
    "empty": (b"", "empty", "0 bytes"),
    "html": (b"<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>\n", "an HTML page", "download"),
    "lfs-pointer": (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 88000000\n",
                    "Git LFS pointer", "git lfs pull"),
    "binary": (bytes(range(7, 250)) * 3, "binary", "no checkpoint format"),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path, capsys, name):
    content, *expected = CHECKPOINTS[name]
    path = tmp_path / f"{name}.pth"
    path.write_bytes(content)
    rc = run_all.main(["--metrics", "flops", "--checkpoint", str(path), "--out", str(tmp_path / "run")])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err, str(path), "cannot be read", *expected)
    assert "(101)" not in line and "valid:" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, expected", [
    ("random.seed=abc", ["seed='abc'", "valid: an integer"]),
    ("random.seed=1.5", ["seed='1.5'", "valid: an integer"]),
    ("tome.prop_attn=2", ["prop_attn='2'", "valid: true, false"]),
    ("idle.layers_per_stage=three", ["layers_per_stage='three'", "valid: an integer"]),
])
def test_a_bad_option_value_lists_the_valid_ones(tmp_path, capsys, option, expected):
    method = option.split(".")[0]
    rc = run_all.main(["--metrics", "flops", "--methods", method, "--method-opt", option,
                       "--out", str(tmp_path / "run")])
    assert rc == 2
    one_error_line(capsys.readouterr().err, *expected)


def test_tome_r_larger_than_a_block_can_merge_is_recorded_and_noted(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_all.main(["--metrics", "flops,acc", "--methods", "tome", "--method-opt", "tome.r=1000",
                         "--limit", "16", "--out", str(run_dir)]) == 0
    done, _, _ = records.scan(run_dir)
    tome = {rec.spec.kind: rec.metrics for rec in done.values() if rec.spec.method == "tome"}
    used = tome["flops"]["schedule"]["merge_counts_used"]
    assert used[:6] == [24, 12, 6, 3, 2, 1] and set(used[6:]) == {0}  # half the image tokens, block by block
    for metrics in tome.values():
        (note,) = metrics["method_notes"]
        assert "r=1000" in note and "24,12,6,3,2,1,0" in note
    assert "r=1000" in (run_dir / "table.md").read_text()
    plain = {rec.spec.kind: rec.metrics for rec in done.values() if rec.spec.method == "none"}
    assert plain["flops"]["method_notes"] == [] and plain["acc"]["method_notes"] == []
