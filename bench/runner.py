"""Job execution: run one JobSpec into a record, or a whole list of them in this process.

`run_job` is what every launcher calls (inline here, or inside a submitit job): it never raises for a
failing measurement; the failure becomes `<key>.error.json` with its traceback and the grid goes on.
Which jobs to run is decided once, in `plan`, so every launcher skips, retries and recomputes alike:
- a job with a valid finished record is skipped (unless `force`),
- a job with an error record is rerun only with `retry_failed` (or `force`),
- every other job (never run, or its record does not validate) runs.
"""
from __future__ import annotations

import importlib
import logging
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from . import records
from .spec import JobSpec

log = logging.getLogger(__name__)

# metric -> module exposing `run(spec, run_dir) -> metrics`. Imported when a job needs it, so a
# FLOPs-only grid never imports the data pipeline (and a half-written module breaks only its jobs).
METRIC_MODULES = {"acc": "bench.accuracy", "flops": "bench.flops", "throughput": "bench.throughput"}


@dataclass
class RunSummary:
    """What happened to a grid: keys per outcome, and the one-line error of every failed job."""

    done: list[str] = field(default_factory=list)  # finished by this call
    skipped: list[str] = field(default_factory=list)  # finished before; not rerun
    failed: list[str] = field(default_factory=list)  # failed now, or before and not retried
    pending: list[str] = field(default_factory=list)  # not finished yet (queued, running, not reached)
    errors: dict[str, str] = field(default_factory=dict)  # failed key -> "ExcType: message"
    problems: list[str] = field(default_factory=list)  # record files that did not validate

    @property
    def ok(self) -> bool:
        return not self.failed and not self.pending

    def counts(self) -> str:
        return (f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed, "
                f"{len(self.pending)} pending")


@dataclass
class Plan:
    """The jobs a launcher must run, and what it leaves alone."""

    to_run: list[JobSpec]
    skipped: list[str]  # valid finished record
    failed: dict[str, str]  # error record kept (no retry): key -> message
    problems: list[str]


def unique(specs: Iterable[JobSpec]) -> list[JobSpec]:
    """Specs in order, each key once."""
    seen: dict[str, JobSpec] = {}
    for spec in specs:
        seen.setdefault(spec.key, spec)
    return list(seen.values())


def plan(specs: Sequence[JobSpec], run_dir, force: bool = False, retry_failed: bool = False) -> Plan:
    done, failed, problems = records.scan(run_dir)
    out = Plan([], [], {}, problems)
    for spec in unique(specs):
        if spec.key in done and not force:
            out.skipped.append(spec.key)
        elif spec.key in failed and not (retry_failed or force):
            out.failed[spec.key] = failed[spec.key].data.get("error", "failed")
        else:
            out.to_run.append(spec)
    return out


def summarize(specs: Sequence[JobSpec], run_dir, ran: Iterable[str] = ()) -> RunSummary:
    """The state of a grid from its records alone (for launchers that run jobs elsewhere).

    Keys in `ran` that finished count as done (this call's work), the other finished ones as skipped.
    """
    done, failed, problems = records.scan(run_dir)
    ran = set(ran)
    summary = RunSummary(problems=problems)
    for spec in unique(specs):
        if spec.key in done:
            (summary.done if spec.key in ran else summary.skipped).append(spec.key)
        elif spec.key in failed:
            summary.failed.append(spec.key)
            summary.errors[spec.key] = failed[spec.key].data.get("error", "failed")
        else:
            summary.pending.append(spec.key)
    return summary


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


def measure(spec: JobSpec, run_dir) -> dict:
    """The metrics dict of one job (raises whatever the metric raises)."""
    if spec.metric not in METRIC_MODULES:
        raise ValueError(f"unknown metric {spec.metric!r}; valid: {', '.join(METRIC_MODULES)}")
    module = importlib.import_module(METRIC_MODULES[spec.metric])
    return module.run(spec, Path(run_dir))


def run_job(spec: JobSpec, run_dir, force: bool = False) -> str:
    """Run one job into its record: "ok", "skipped" (already finished) or "error" (error record written)."""
    if not force and _has_valid_record(spec, run_dir):
        return "skipped"
    started = time.time()
    env = None
    try:
        import torch

        # Seed here too so a metric that forgets to still gives reproducible random init / sampling.
        torch.manual_seed(spec.seed)
        env = records.environment(spec.device, spec.dtype)
        metrics = measure(spec, run_dir)
        records.write_record(run_dir, spec, metrics, env, started)
        return "ok"
    except Exception as exc:  # a failing job is a record, not the end of the grid
        records.write_error(run_dir, spec, exc, traceback.format_exc(), env, started)
        log.warning("job %s failed: %s: %s", spec.key, type(exc).__name__, exc)
        return "error"


def error_message(run_dir, key: str) -> str:
    try:
        return records.read_record(records.error_path(run_dir, key)).data.get("error", "failed")
    except records.RecordError as exc:
        return str(exc)


def run_inline(specs: Sequence[JobSpec], run_dir, force: bool = False, retry_failed: bool = False,
               progress: bool = True) -> RunSummary:
    """Run the grid in this process, one job after another, with a progress bar over jobs."""
    from tqdm.auto import tqdm

    todo = plan(specs, run_dir, force=force, retry_failed=retry_failed)
    summary = RunSummary(skipped=list(todo.skipped), failed=list(todo.failed), errors=dict(todo.failed),
                         problems=list(todo.problems))
    bar = tqdm(todo.to_run, desc="jobs", unit="job", disable=None if progress else True,
               dynamic_ncols=True)  # None: only on a terminal
    for number, spec in enumerate(bar, 1):
        bar.set_postfix_str(spec.key, refresh=True)
        started = time.time()
        outcome = run_job(spec, run_dir, force=force)
        if progress and bar.disable:  # a log file, not a terminal: one line per job instead of a bar
            print(f"[{number}/{len(todo.to_run)}] {spec.key}: {outcome} ({time.time() - started:.1f} s)",
                  file=sys.stderr, flush=True)
        if outcome == "error":
            summary.failed.append(spec.key)
            summary.errors[spec.key] = error_message(run_dir, spec.key)
        elif outcome == "ok":
            summary.done.append(spec.key)
        else:  # another process finished it while we were busy
            summary.skipped.append(spec.key)
    return summary
