"""Job execution: run one JobSpec into a record, or a whole plan in this process.

`run_job` is what every backend calls (inline here, or inside a submitit job): it never raises for a
failing measurement; the failure becomes `<key>.error.json` with its traceback and the grid goes on.
Which jobs to run is decided once, in `todo`, so every backend skips, retries and recomputes alike:
- a job with a valid finished record is skipped (unless `force`),
- a job with an error record is rerun only with `retry_failed` (or `force`),
- every other job (never run, or its record does not validate) runs,
- a job whose dependency has no finished record is not run: it is `blocked`, with the reason.
Two processes working on one run folder never run the same job twice: each job runs under a lock on
`launch/locks/<key>.lock`, and a job found locked is left to its owner and looked at again at the end.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .. import jobs, provenance, records
from ..spec import JobSpec

log = logging.getLogger(__name__)


StorageError = records.StorageError  # the run folder cannot be written: one line, the path, the errno
RERUN_ADVICE = "finished records are kept; rerun the same command once the disk can be written"


@dataclass
class RunSummary:
    """What happened to a grid: keys per outcome, and the one-line reason of every failed or blocked job."""

    done: list[str] = field(default_factory=list)  # finished by this call
    skipped: list[str] = field(default_factory=list)  # finished before; not rerun
    failed: list[str] = field(default_factory=list)  # failed now, or before and not retried
    pending: list[str] = field(default_factory=list)  # not finished yet (queued, running, not reached)
    blocked: dict[str, str] = field(default_factory=dict)  # not run: a dependency did not finish -> why
    errors: dict[str, str] = field(default_factory=dict)  # failed key -> "ExcType: message"
    problems: list[str] = field(default_factory=list)  # record files that did not validate

    def counts(self) -> str:
        text = (f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed, "
                f"{len(self.pending)} pending")
        return text + (f", {len(self.blocked)} blocked" if self.blocked else "")


@dataclass
class Todo:
    """The jobs a backend must run, and what it leaves alone."""

    to_run: list[JobSpec]
    skipped: list[str]  # valid finished record
    failed: dict[str, str]  # error record kept (no retry): key -> message
    problems: list[str]


def unique(specs: Iterable[JobSpec]) -> list[JobSpec]:
    seen: dict[str, JobSpec] = {}
    for spec in specs:
        seen.setdefault(spec.key, spec)
    return list(seen.values())


def todo(specs: Sequence[JobSpec], run_dir, force: bool = False, retry_failed: bool = False) -> Todo:
    done, failed, problems = records.scan(run_dir)
    out = Todo([], [], {}, problems)
    for spec in unique(specs):
        if spec.key in done and not force:
            out.skipped.append(spec.key)
        elif spec.key in failed and not (retry_failed or force):
            out.failed[spec.key] = failed[spec.key].data.get("error", "failed")
        else:
            out.to_run.append(spec)
    return out


def summarize(specs: Sequence[JobSpec], run_dir, ran: Iterable[str] = ()) -> RunSummary:
    """The state of a grid from its records alone (for backends that run jobs elsewhere). Keys in `ran`
    that finished count as done (this call's work), the other finished ones as skipped; a job without a
    record whose dependency failed is blocked."""
    done, failed, problems = records.scan(run_dir)
    ran = set(ran)
    summary = RunSummary(problems=problems)
    for spec in unique(specs):
        if spec.key in done:
            (summary.done if spec.key in ran else summary.skipped).append(spec.key)
        elif spec.key in failed:
            summary.failed.append(spec.key)
            summary.errors[spec.key] = failed[spec.key].data.get("error", "failed")
        elif (reason := blocked_by(spec, failed)) is not None:
            summary.blocked[spec.key] = reason
        else:
            summary.pending.append(spec.key)
    return summary


def blocked_by(spec: JobSpec, failed: dict) -> str | None:
    for upstream in jobs.dependencies(spec):
        if upstream.key in failed:
            return f"dependency {upstream.key} failed"
    return None


def _upstream_records(spec: JobSpec, run_dir) -> dict:
    """kind -> finished record of each dependency; raises LookupError naming the first missing one."""
    out = {}
    for upstream in jobs.dependencies(spec):
        path = records.record_path(run_dir, upstream.key)
        try:
            out[upstream.kind] = records.read_record(path)
        except records.RecordError:
            raise LookupError(f"dependency {upstream.key} has no finished record") from None
    return out


def _has_valid_record(spec: JobSpec, run_dir) -> bool:
    path = records.record_path(run_dir, spec.key)
    if not path.exists():
        return False
    try:
        rec = records.read_record(path)
    except records.RecordError as exc:
        log.info("recomputing %s: %s", spec.key, exc)  # the driver reports invalid records
        return False
    return rec.status == "ok" and rec.key == spec.key


@contextmanager
def job_lock(run_dir, key: str, wait: bool):
    """An exclusive lock on launch/locks/<key>.lock; yields False (without waiting) when another process
    holds it. POSIX record locks, which NFS and Lustre run folders honour."""
    path = Path(run_dir) / "launch" / "locks" / f"{key}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError as exc:  # a read-only or full run folder: say which file, not a traceback
        raise records.storage_error(exc, path, RERUN_ADVICE) from None
    with handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            yield False
            return
        try:
            yield True
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def run_job(spec: JobSpec, run_dir, force: bool = False, origin: dict | None = None, wait: bool = True) -> str:
    """Run one job into its record: "ok", "skipped" (already finished), "error" (error record written),
    "blocked" (a dependency has no finished record) or "locked" (another process runs it; only when
    `wait` is False). `origin` is the provenance of the checkout the run was planned from.

    In a job of several processes (data-parallel finetuning) only process 0 locks and records; the
    others take part in the computation."""
    if int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", 0))) != 0:
        jobs.get(spec.kind).run(spec, jobs.JobContext(Path(run_dir), _upstream_records(spec, run_dir)))
        return "ok"
    with job_lock(run_dir, spec.key, wait) as mine:
        if not mine:
            return "locked"
        if not force and _has_valid_record(spec, run_dir):
            return "skipped"
        try:
            upstream = _upstream_records(spec, run_dir)
        except LookupError as exc:
            log.warning("job %s not run: %s", spec.key, exc)
            return "blocked"
        with device_lock(spec):
            return _run_locked(spec, run_dir, upstream, origin or {})


@contextmanager
def device_lock(spec: JobSpec):
    """Timing jobs (kinds that hold their device) take a machine-wide lock per device, so two runs on
    one machine, or two array tasks on one node, never time under each other's load."""
    if not jobs.get(spec.kind).holds_device:
        yield
        return
    device = spec.device.split(":")[0]
    if device == "cuda":
        device = f"cuda{os.environ.get('CUDA_VISIBLE_DEVICES', spec.device)}".replace(",", "_").replace(":", "")
    path = Path(tempfile.gettempdir()) / f"tokenbench-timing-{device}.lock"
    # Read-only and flock: another user's lock file (mode 0644 under their umask) still locks.
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as exc:
        raise records.storage_error(exc, path) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _run_locked(spec: JobSpec, run_dir, upstream: dict, origin: dict) -> str:
    started, env = time.time(), None
    try:
        env = dict(provenance.environment(spec.device, spec.dtype), **origin)
        metrics = jobs.get(spec.kind).run(spec, jobs.JobContext(Path(run_dir), upstream))
    except Exception as exc:  # a failing job is a record, not the end of the grid
        _write(records.write_error, run_dir, spec, exc, traceback.format_exc(), env, started)
        log.warning("job %s failed: %s: %s", spec.key, type(exc).__name__, exc)
        return "error"
    _write(records.write_record, run_dir, spec, metrics, env, started)
    return "ok"


def _write(writer, run_dir, spec: JobSpec, *args) -> None:
    try:
        writer(run_dir, spec, *args)
    except OSError as exc:  # the disk, not the job: stop the grid with one line; earlier records stand
        target = exc.filename or records.record_path(run_dir, spec.key)
        raise records.storage_error(exc, target, RERUN_ADVICE) from None


def error_message(run_dir, key: str) -> str:
    try:
        return records.read_record(records.error_path(run_dir, key)).data.get("error", "failed")
    except records.RecordError as exc:
        return str(exc)


def in_dependency_order(specs: Sequence[JobSpec]) -> list[JobSpec]:
    """`specs` with every job after the jobs it needs that are among them (stable otherwise)."""
    by_key = {spec.key: spec for spec in specs}
    ordered, placed = [], set()

    def place(spec: JobSpec) -> None:
        if spec.key in placed:
            return
        placed.add(spec.key)
        for upstream in jobs.dependencies(spec):
            if upstream.key in by_key:
                place(by_key[upstream.key])
        ordered.append(spec)

    for spec in specs:
        place(spec)
    return ordered


def run_inline(specs: Sequence[JobSpec], run_dir, force: bool = False, retry_failed: bool = False,
               origin: dict | None = None, progress: bool = True) -> RunSummary:
    """Run the grid in this process, dependencies first, with a progress bar over jobs. Jobs another
    process holds are left to it, then waited for at the end."""
    from tqdm.auto import tqdm

    plan = todo(specs, run_dir, force=force, retry_failed=retry_failed)
    summary = RunSummary(skipped=list(plan.skipped), failed=list(plan.failed), errors=dict(plan.failed),
                         problems=list(plan.problems))
    queue = in_dependency_order(plan.to_run)
    bar = tqdm(total=len(queue), desc="jobs", unit="job", disable=None if progress else True, dynamic_ncols=True)
    deferred: list[JobSpec] = []
    try:
        for number, spec in enumerate(queue, 1):
            bar.set_postfix_str(spec.key, refresh=True)
            started = time.time()
            outcome = run_job(spec, run_dir, force=force, origin=origin, wait=False)
            if outcome == "locked":
                deferred.append(spec)
                continue
            _outcome(spec, outcome, run_dir, summary)
            bar.update(1)
            if progress and bar.disable:  # a log file, not a terminal: one line per job instead of a bar
                print(f"[{number}/{len(queue)}] {spec.key}: {outcome} ({time.time() - started:.1f} s)",
                      file=sys.stderr, flush=True)
        if deferred:
            print(f"waiting for {len(deferred)} job(s) another process is running in {run_dir}",
                  file=sys.stderr, flush=True)
        for spec in deferred:  # now wait for their owner, then take the record it wrote (or run them)
            _outcome(spec, run_job(spec, run_dir, origin=origin), run_dir, summary)
            bar.update(1)
    finally:
        bar.close()
    return summary


def _outcome(spec: JobSpec, outcome: str, run_dir, summary: RunSummary) -> None:
    if outcome == "error":
        summary.failed.append(spec.key)
        summary.errors[spec.key] = error_message(run_dir, spec.key)
    elif outcome == "ok":
        summary.done.append(spec.key)
    elif outcome == "blocked":
        failed = records.scan(run_dir)[1]
        summary.blocked[spec.key] = blocked_by(spec, failed) or "a dependency has no finished record"
    else:  # another process finished it
        summary.skipped.append(spec.key)


class JobFailed(RuntimeError):
    """Raised by a submitted job whose measurement failed (its error record is written): the job ends in
    SLURM's FAILED state, so jobs submitted `afterok` on it are cancelled instead of started."""


def run_submitted(spec: JobSpec, run_dir, force: bool = False, origin: dict | None = None) -> str:
    """`run_job` as a submitted job runs it: a failure (or a missing dependency) fails the job itself."""
    outcome = run_job(spec, run_dir, force=force, origin=origin)
    if outcome in ("error", "blocked"):
        reason = error_message(run_dir, spec.key) if outcome == "error" else "a dependency has no finished record"
        raise JobFailed(f"{spec.key}: {reason}")
    return outcome


class CheckpointableRun:
    """`run_submitted` for kinds that checkpoint themselves (finetuning): on a timeout or preemption
    submitit calls `checkpoint`, which requeues the same call; the job then resumes from its own last
    checkpoint."""

    def __call__(self, *args, **kwargs) -> str:
        return run_submitted(*args, **kwargs)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def job_function(spec: JobSpec):
    """What a submitted job calls: `run_submitted`, requeueable for checkpointable kinds."""
    return CheckpointableRun() if jobs.get(spec.kind).checkpointable else run_submitted
