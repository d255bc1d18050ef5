"""Fault injection: a grid must never lose a finished number, never mix a broken record into a table,
and a failing job must cost only itself.

The measurements are replaced by a cheap stand-in (`cheap_flops`, honest analytic numbers without
fvcore) where the harness, not the measurement, is under test; the throughput back-off and the
determinism tests run the real jobs on the embedded architecture with random weights.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import methods
import run_all
from bench import jobs, records, report
from bench.dispatch import runner
from bench.models import EMBEDDED_MODEL
from bench.records import load_grid, save_grid
from bench.spec import JobSpec

REPO = Path(__file__).resolve().parents[1]
RATIOS = ("0.5", "0.6", "0.7", "0.8", "0.9")
FLOPS_GRID = ["--metrics", "flops", "--models", EMBEDDED_MODEL, "--methods", "evit", "--ratios", ",".join(RATIOS)]
GRID_SIZE = 1 + len(RATIOS)  # the baseline and one job per ratio


def cheap_flops(spec: JobSpec, context) -> dict:
    """A stand-in for the FLOPs job: the method's analytic count on a meta-device model."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(spec.model)
    method = methods.build(model, spec.method, spec.keep_ratio, spec.layers, **spec.options())
    return dict(gmacs=method.total_macs() / 1e9, gmacs_no_overhead=method.total_macs(False) / 1e9,
                gmacs_fvcore=None, params_m=None, tokens_per_block=list(method.schedule().tokens_attn),
                schedule=method.describe())


def stub_run(monkeypatch, kind: str, run) -> None:
    """Replace what a registered job kind runs, for this test."""
    monkeypatch.setitem(jobs._KINDS, kind, dataclasses.replace(jobs.get(kind), run=run))


@pytest.fixture
def measured(monkeypatch):
    """Keys of the jobs that actually ran a measurement in this process, in order."""
    keys: list[str] = []

    def counting(spec, context):
        keys.append(spec.key)
        return cheap_flops(spec, context)

    stub_run(monkeypatch, "flops", counting)
    return keys


def grid_keys(run_dir: Path) -> set[str]:
    return {spec.key for spec in load_grid(run_dir)}


def record_files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(records.records_dir(run_dir).iterdir())}


def assert_clean(run_dir: Path, keys: set[str]) -> None:
    """Exactly one valid finished record per key; no temp, error or stray file."""
    names = set(record_files(run_dir))
    assert names == {f"{k}.json" for k in keys}, names ^ {f"{k}.json" for k in keys}
    for key in keys:
        assert records.read_record(records.record_path(run_dir, key)).status == "ok"


# ---------------------------------------------------------------------------------------------
# (1) A run killed mid-grid loses nothing; the rerun does only the missing jobs.

SLOW_RUN_ALL = """
import os, sys, time
from pathlib import Path
sys.path[:0] = [{repo!r}, {tests!r}]
import dataclasses, run_all
from bench import jobs
from test_faults import cheap_flops

def slow(spec, context):  # a marker says the job started; the sleep is the window to kill it in
    (Path(os.environ["MARKERS"]) / spec.key).touch()
    time.sleep(float(os.environ["JOB_SECONDS"]))
    return cheap_flops(spec, context)

jobs._KINDS["flops"] = dataclasses.replace(jobs.get("flops"), run=slow)
sys.exit(run_all.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_run_resumes_with_only_the_missing_jobs(tmp_path, capsys, measured):
    run_dir, markers = tmp_path / "run", tmp_path / "started"
    markers.mkdir()
    script = tmp_path / "slow_run_all.py"
    script.write_text(SLOW_RUN_ALL.format(repo=str(REPO), tests=str(REPO / "tests")))
    proc = subprocess.Popen([sys.executable, str(script), *FLOPS_GRID, "--out", str(run_dir)], cwd=REPO,
                            env=dict(os.environ, MARKERS=str(markers), JOB_SECONDS="3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(list(markers.iterdir())) < 3:  # two jobs finished, the third is sleeping
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the grid did not get going"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    started = {p.name for p in markers.iterdir()}
    survived = record_files(run_dir)
    finished = {name.removesuffix(".json") for name in survived}
    assert 1 <= len(finished) < GRID_SIZE and finished <= started
    assert len(grid_keys(run_dir)) == GRID_SIZE
    assert_clean(run_dir, finished)  # nothing half-written by the killed process

    assert run_all.main([*FLOPS_GRID, "--out", str(run_dir)]) == 0
    assert sorted(measured) == sorted(grid_keys(run_dir) - finished)  # only the missing ones, once each
    assert_clean(run_dir, grid_keys(run_dir))
    after = record_files(run_dir)
    assert {name: after[name] for name in survived} == survived  # finished numbers untouched
    assert f"{len(finished)} skipped" in capsys.readouterr().out


def test_stale_temp_file_of_a_killed_writer_is_not_a_record(tmp_path, capsys, measured):
    """SIGKILL between the temp write and the rename leaves `.<key>.json.*.tmp` and no record:
    the job counts as not run, and the temp file is never read as a result."""
    run_dir = tmp_path / "run"
    assert run_all.main([*FLOPS_GRID, "--out", str(run_dir)]) == 0
    key = sorted(grid_keys(run_dir))[0]
    path = records.record_path(run_dir, key)
    stale = path.with_name(f".{path.name}.k1ll3d.tmp")
    stale.write_bytes(path.read_bytes()[:200])  # what the killed writer had flushed
    path.unlink()

    measured.clear()
    assert run_all.main([*FLOPS_GRID, "--out", str(run_dir)]) == 0
    assert measured == [key]
    assert records.read_record(path).status == "ok"
    assert report.load_runs(run_dir).attrs["problems"] == []


# ---------------------------------------------------------------------------------------------
# (2) Records that do not validate are reported and recomputed, never fatal, never in a table.

def test_invalid_records_are_reported_and_recomputed(tmp_path, capsys, measured):
    run_dir = tmp_path / "run"
    assert run_all.main([*FLOPS_GRID, "--out", str(run_dir)]) == 0
    keys = sorted(grid_keys(run_dir))
    truncated, wrong_schema, not_a_dict, foreign = (records.record_path(run_dir, k) for k in keys[:4])
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    wrong_schema.write_text(json.dumps(dict(json.loads(wrong_schema.read_text()), schema=99)))
    not_a_dict.write_text("[1, 2, 3]\n")
    foreign.write_bytes(records.record_path(run_dir, keys[4]).read_bytes())  # another job's record
    broken = {p.name.removesuffix(".json") for p in (truncated, wrong_schema, not_a_dict, foreign)}

    tidy = report.load_runs(run_dir)  # a report of the damaged folder works and leaves them out
    problems = " ".join(tidy.attrs["problems"])
    for path in (truncated, wrong_schema, not_a_dict):
        assert path.name in problems
    assert not set(tidy["key"]) & broken
    capsys.readouterr()

    measured.clear()
    assert run_all.main([*FLOPS_GRID, "--out", str(run_dir)]) == 0
    assert sorted(measured) == sorted(broken)
    err = capsys.readouterr().err
    for path in (truncated, wrong_schema, not_a_dict):
        assert path.name in err
    assert_clean(run_dir, set(keys))


# ---------------------------------------------------------------------------------------------
# (3) A failing job is recorded with its traceback; the rest finish; --retry-failed reruns it alone.

def test_failed_job_is_recorded_listed_and_retried_alone(tmp_path, capsys, monkeypatch, measured):
    run_dir = tmp_path / "run"
    counting = jobs.get("flops").run

    def flaky(spec, context):
        if spec.keep_ratio == 0.6:
            raise RuntimeError("injected failure at keep ratio 0.6")
        return counting(spec, context)

    stub_run(monkeypatch, "flops", flaky)
    assert run_all.main([*FLOPS_GRID, "--out", str(run_dir)]) == 1
    out, err = capsys.readouterr()
    done, failed, _ = records.scan(run_dir)
    assert len(done) == GRID_SIZE - 1 and len(failed) == 1
    (bad_key, bad), = failed.items()
    assert bad.spec.keep_ratio == 0.6
    assert "injected failure at keep ratio 0.6" in bad.data["error"]
    assert "in flaky" in bad.data["traceback"] and "RuntimeError" in bad.data["traceback"]
    assert f"{bad_key}: RuntimeError: injected failure at keep ratio 0.6" in err  # the summary lists it
    assert "1 failed" in out
    assert bad_key in (run_dir / "report.md").read_text()

    measured.clear()
    assert run_all.main([*FLOPS_GRID, "--out", str(run_dir)]) == 1  # a plain rerun leaves it failed
    assert measured == []

    stub_run(monkeypatch, "flops", counting)  # the cause is fixed
    assert run_all.main([*FLOPS_GRID, "--out", str(run_dir), "--retry-failed"]) == 0
    assert measured == [bad_key]
    assert_clean(run_dir, set(done) | {bad_key})


# ---------------------------------------------------------------------------------------------
# (4) Concurrent writers into one run folder, and a report built while they write.

WRITERS, OWN_RECORDS, SHARED_RECORDS, ROUNDS, PAYLOAD = 4, 10, 10, 3, 20_000


def writer_spec(writer: int | None, index: int) -> JobSpec:
    """A writer's own specs, or (writer=None) the specs every writer writes: same key, same file."""
    return JobSpec("flops", EMBEDDED_MODEL, method="evit", keep_ratio=round(0.05 + 0.9 * index / 20, 4),
                   seed=1000 if writer is None else writer)


def write_records(run_dir: str, writer: int, start) -> None:
    own = [writer_spec(writer, i) for i in range(OWN_RECORDS)]
    shared = [writer_spec(None, i) for i in range(SHARED_RECORDS)]
    start.wait()  # all writers at once
    for spec in own + shared * ROUNDS:  # the shared records are rewritten while the others write them
        # A large payload of one value per writer: a torn or interleaved write would mix values.
        metrics = dict(gmacs=spec.keep_ratio, tokens_per_block=[50] * 12, writer=writer, payload=[writer] * PAYLOAD)
        records.write_record(run_dir, spec, metrics, env=dict(writer=writer), started=time.time())


def test_concurrent_writers_and_a_report_while_they_write(tmp_path):
    run_dir = tmp_path / "run"
    everything = [writer_spec(w, i) for w in range(WRITERS) for i in range(OWN_RECORDS)]
    everything += [writer_spec(None, i) for i in range(SHARED_RECORDS)]
    save_grid(run_dir, everything)

    # fork: the writers only serialise JSON, no torch op runs in them
    context = multiprocessing.get_context("fork")
    start = context.Barrier(WRITERS + 1)
    procs = [context.Process(target=write_records, args=(str(run_dir), w, start)) for w in range(WRITERS)]
    for proc in procs:
        proc.start()
    start.wait()
    scans = 0
    while any(proc.is_alive() for proc in procs):
        assert records.scan(run_dir)[2] == []  # a reader never sees a half-written record
        scans += 1
        if scans % 10 == 1:  # and a whole report can be built meanwhile
            report.write_report(run_dir, figures=False, pictures=False)
            assert report.load_runs(run_dir).attrs["problems"] == []
    for proc in procs:
        proc.join()
        assert proc.exitcode == 0

    done, failed, problems = records.scan(run_dir)
    assert problems == [] and failed == {}
    assert set(done) == {s.key for s in everything}  # none lost
    for rec in done.values():
        assert set(rec.metrics["payload"]) == {rec.metrics["writer"]} and len(rec.metrics["payload"]) == PAYLOAD
    assert not [p for p in records.records_dir(run_dir).iterdir() if p.name.startswith(".")]
    report.write_report(run_dir, figures=False, pictures=False)
    assert len(report.load_runs(run_dir)) == len(everything)


def test_report_of_a_running_grid_says_what_is_pending(tmp_path, measured):
    """Jobs of grid.json without a record (queued, running, lost) are named in the report."""
    run_dir = tmp_path / "run"
    specs = [JobSpec("flops", EMBEDDED_MODEL, method="evit", keep_ratio=r) for r in (0.5, 0.6, 0.7, 0.8)]
    save_grid(run_dir, specs)
    for spec in specs[:2]:
        assert runner.run_job(spec, run_dir) == "ok"
    report.write_report(run_dir, figures=False, pictures=False)
    text = (run_dir / "report.md").read_text()
    assert "pending" in text.lower(), "the report does not say which jobs of grid.json are pending"
    for spec in specs[2:]:
        assert spec.key in text
    for spec in specs[:2]:
        assert spec.key not in text


# ---------------------------------------------------------------------------------------------
# (5) Throughput: an out-of-memory error halves the batch; the record holds the batch actually used.

def test_throughput_out_of_memory_backoff_records_the_batch_used(tmp_path, monkeypatch):
    import bench.jobs.throughput

    create_model = bench.jobs.throughput.create_model
    batches_run: list[int] = []

    def out_of_memory_above_two(module, args):
        if args[0].shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        batches_run.append(args[0].shape[0])

    def create_tight_model(*args, **kwargs):
        model = create_model(*args, **kwargs)
        model.register_forward_pre_hook(out_of_memory_above_two)
        return model

    monkeypatch.setattr(bench.jobs.throughput, "create_model", create_tight_model)
    spec = JobSpec("throughput", EMBEDDED_MODEL, method="evit", keep_ratio=0.5, batch_size=8,
                   extra=(("iters", 1), ("max_repeats", 5), ("repeats", 5), ("warmup", 1)))
    assert runner.run_job(spec, tmp_path) == "ok"
    rec = records.read_record(records.record_path(tmp_path, spec.key))
    assert rec.spec.batch_size == 8  # requested
    assert rec.metrics["batch_size"] == 2  # used: 8 -> 4 -> 2
    assert set(batches_run) == {2}
    assert rec.metrics["img_s"] > 0 and len(rec.metrics["img_s_all"]) == 5


# ---------------------------------------------------------------------------------------------
# (6) Determinism: the same accuracy spec twice on CPU gives the same numbers; the seed is recorded.

@pytest.fixture
def tiny_image_folder(tmp_path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label in [f"class{i}" for i in range(10)]:  # as many classes as the embedded model's head
        (root / label).mkdir(parents=True)
        for i in range(1):
            pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / label / f"{i}.png")
    return root


@pytest.fixture
def random_checkpoint(tmp_path) -> Path:
    import timm

    torch.manual_seed(0)
    path = tmp_path / "random-init.pth"
    torch.save({"model": timm.create_model(EMBEDDED_MODEL).state_dict()}, path)
    return path


def test_same_accuracy_spec_twice_gives_the_same_numbers(tmp_path, tiny_image_folder, random_checkpoint):
    spec = JobSpec("acc", EMBEDDED_MODEL, method="random", keep_ratio=0.5, checkpoint=str(random_checkpoint),
                   data=str(tiny_image_folder), batch_size=4, seed=7)
    results = []
    for attempt in ("first", "second"):
        run_dir = tmp_path / attempt
        assert runner.run_job(spec, run_dir) == "ok"
        rec = records.read_record(records.record_path(run_dir, spec.key))
        preds = np.load(records.preds_path(run_dir, spec.key))
        results.append((rec, {name: preds[name] for name in preds.files}))
    (first, first_preds), (second, second_preds) = results
    assert first.data["spec"]["seed"] == second.data["spec"]["seed"] == 7
    for name in ("top1", "top5", "n_images", "tokens_per_block"):
        assert first.metrics[name] == second.metrics[name], name
    assert first.metrics["n_images"] == 10
    assert first_preds.keys() == second_preds.keys() >= {"labels", "top5"}  # and any per-image extras
    for name in first_preds:
        np.testing.assert_array_equal(first_preds[name], second_preds[name])
