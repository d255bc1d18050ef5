"""Job dependencies (a job needs another job's record) and locks (two drivers on one run folder), through
the inline and local backends. SLURM's afterok is tested against a real cluster in test_slurm.py."""
from __future__ import annotations

import dataclasses
import fcntl
import multiprocessing
import time
import types
from pathlib import Path

import pytest

from bench import dispatch, jobs, records
from bench.dispatch import local, runner
from bench.spec import JobSpec
from tests.test_dispatch import parse, plan_of, spec

# ---------------------------------------------------------------------------------------------
# Job dependencies, with two kinds registered for the test: "make" writes a number, "use" needs it.

@pytest.fixture
def chained_kinds(monkeypatch, tmp_path):
    ran = []

    def make(spec, context):
        ran.append(("make", spec.keep_ratio))
        if spec.keep_ratio == 0.5:
            raise RuntimeError("the upstream job fails at 0.5")
        return {"value": spec.keep_ratio * 10}

    def use(spec, context):
        ran.append(("use", spec.keep_ratio))
        return {"doubled": 2 * context.record_of("make").metrics["value"]}

    make_kind = jobs.JobKind("make", make, key_fields=(), measures=False,
                             upstream_of=lambda s: dataclasses.replace(s, kind="make"))
    use_kind = jobs.JobKind("use", use, key_fields=(), depends_on=("make",))
    monkeypatch.setitem(jobs._KINDS, "make", make_kind)
    monkeypatch.setitem(jobs._KINDS, "use", use_kind)
    return ran


def test_dependants_run_after_their_dependency_and_read_its_record(tmp_path, chained_kinds):
    users = [spec("use", ratio=r, method="evit") for r in (0.7, 0.5)]
    grid = runner.in_dependency_order([*users, *[u for s in users for u in jobs.dependencies(s)]])
    assert [s.kind for s in grid] == ["make", "use", "make", "use"]  # each job after what it needs
    summary = dispatch.dispatch(plan_of(grid, tmp_path), parse())
    assert chained_kinds == [("make", 0.7), ("use", 0.7), ("make", 0.5)]  # a failed dependency: not run
    ok = records.read_record(records.record_path(tmp_path, users[0].key))
    assert ok.metrics["doubled"] == 14.0
    assert summary.blocked == {users[1].key: f"dependency {jobs.dependencies(users[1])[0].key} failed"}
    assert "1 blocked" in summary.counts()
    # The summary from records alone (as --collect sees it) says the same.
    assert runner.summarize(grid, tmp_path).blocked == summary.blocked


def test_local_launcher_waits_for_dependencies(tmp_path, monkeypatch, chained_kinds):
    monkeypatch.setattr(local, "POLL_S", 0)
    order = []

    class InlineExecutor:  # runs each job at submission: the order of submissions is the order of runs
        def update_parameters(self, **params):
            pass

        def submit(self, fn, spec, run_dir, force, origin):
            order.append(spec.kind)
            try:  # a submitted job that fails raises (JobFailed), as submitit would record it
                fn(spec, run_dir, force, origin)
            except runner.JobFailed:
                pass
            return types.SimpleNamespace(job_id=str(len(order)), done=lambda: True, state="FINISHED",
                                         paths=types.SimpleNamespace(folder=tmp_path), stderr=lambda: "")

    users = [spec("use", ratio=r, method="evit") for r in (0.7, 0.5)]
    todo = runner.in_dependency_order([*users, *[u for s in users for u in jobs.dependencies(s)]])
    lost = local.run_local(todo, tmp_path, parse("--launcher", "local"), gpus=[], origin={},
                           executor=InlineExecutor())
    assert order == ["make", "use", "make"]  # the user of the failed make is never started
    assert set(lost) == set()  # the failed make wrote its error record: not lost


def _hold_lock_and_finish(lock_path: Path, run_dir: Path, held: JobSpec, locked) -> None:
    """Another driver's process: it holds a job's lock, writes its record, then lets go."""
    with open(lock_path, "a") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        locked.set()
        time.sleep(0.5)
        records.write_record(run_dir, held, {"gmacs": 2.0}, {}, 0.0)


def test_two_runs_into_one_folder_do_each_job_once(tmp_path, monkeypatch):
    """Two drivers on one --out: a job held by the other is not run again but waited for, then skipped."""
    ran = []
    monkeypatch.setitem(jobs._KINDS, "flops", dataclasses.replace(
        jobs.get("flops"), run=lambda s, c: ran.append(s.key) or {"gmacs": 1.0}))
    held, free = spec(), spec(ratio=0.5, method="evit")
    lock_path = tmp_path / "launch" / "locks" / f"{held.key}.lock"
    lock_path.parent.mkdir(parents=True)
    context = multiprocessing.get_context("fork")  # POSIX record locks are per process
    locked = context.Event()
    other = context.Process(target=_hold_lock_and_finish, args=(lock_path, tmp_path, held, locked))
    other.start()
    assert locked.wait(30)
    summary = runner.run_inline([held, free], tmp_path, progress=False)
    other.join()
    assert ran == [free.key]  # the held job was never measured here
    assert summary.done == [free.key] and summary.skipped == [held.key]
    assert records.read_record(records.record_path(tmp_path, held.key)).metrics["gmacs"] == 2.0
