"""Dispatch a plan: in this process, as local subprocesses (one per GPU), or as SLURM job arrays.

    summary = dispatch(plan, DispatchOptions(launcher="slurm", partition="gpu"))
    summary = collect(run_dir, DispatchOptions(retry_failed=True))

Local and SLURM jobs go through submitit. Each calls `runner.run_job` in its own process and writes its
record straight into the run folder, which must therefore be on a filesystem the jobs share. They import
a copy of the code taken at submission (<run>/launch/code/), so editing the repository while jobs wait
in a queue does not change what they run. <run>/launch/jobs.json maps keys to submitted jobs.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from .. import records
from ..spec import JobSpec, Plan
from ..request import LAUNCHERS, DispatchOptions, LaunchError, parse_time_min  # noqa: F401
from .runner import RunSummary, StorageError, run_inline, summarize, todo  # noqa: F401
from .watch import LAUNCH_DIR, load_index


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while dispatching; `advice` says how to go on without losing or duplicating work."""

    def __init__(self, advice: str):
        super().__init__(advice)
        self.advice = advice


def resolve_launcher(name: str | None, which=shutil.which, gpus=None) -> str:
    """The launcher to use: `name`, or for "auto" SLURM if sbatch is on PATH, else local if GPUs are visible."""
    name = name or "inline"
    if name not in LAUNCHERS:
        raise LaunchError(f"unknown launcher {name!r}; valid: {', '.join(LAUNCHERS)}")
    if name != "auto":
        return name
    if which("sbatch"):
        return "slurm"
    if gpus is None:
        from .local import visible_gpus as gpus
    return "local" if gpus() else "inline"


def check(specs: Sequence[JobSpec], options: DispatchOptions) -> str:
    """The launcher `options` resolve to, after every check that needs no job to run, so that nothing is
    written for a dispatch that cannot happen."""
    launcher = resolve_launcher(options.launcher)
    if options.no_wait and launcher != "slurm":
        raise LaunchError(f"--no-wait needs --launcher slurm (here: {launcher}): other launchers run the jobs "
                          "from this process")
    if launcher == "inline":
        return launcher
    pinned = sorted({spec.device for spec in specs if spec.device.startswith("cuda:")})
    if pinned:  # a job sees only the GPU it was given, as cuda:0
        raise LaunchError(f"--device {pinned[0]} with --launcher {launcher}: each job gets a GPU of its own; "
                          "valid: --device cuda")
    if launcher == "local":
        from .local import visible_gpus

        visible_gpus()  # a bad CUDA_VISIBLE_DEVICES is a LaunchError now, not after the snapshot
    else:
        from .slurm import check_available, check_partition

        check_available()
        check_partition(options.partition)
    return launcher


def dispatch(plan: Plan, options: DispatchOptions) -> RunSummary:
    """Check, write the grid, run the plan's jobs with the chosen launcher; the summary of the grid."""
    launcher = check(plan.jobs, options)
    run_dir = Path(plan.run_dir).resolve()  # jobs start in the code snapshot, not here
    records.save_grid(run_dir, plan.grid, plan.origin)
    return _run(list(plan.jobs), run_dir, options, launcher, plan.origin)


def _run(specs: list[JobSpec], run_dir: Path, options: DispatchOptions, launcher: str, origin: dict) -> RunSummary:
    if launcher == "inline":
        return run_inline(specs, run_dir, force=options.force, retry_failed=options.retry_failed, origin=origin)
    from .snapshot import code_snapshot

    plan = todo(specs, run_dir, force=options.force, retry_failed=options.retry_failed)
    lost: dict[str, str] = {}
    if plan.to_run:
        with code_snapshot(run_dir / LAUNCH_DIR / "code"):
            if launcher == "local":
                from .local import run_local, visible_gpus

                try:
                    lost = run_local(plan.to_run, run_dir, options, visible_gpus(), origin)
                except KeyboardInterrupt:
                    raise Interrupted("local jobs stop with this process; finished jobs are kept, the same "
                                      "command continues the run") from None
            else:
                from . import slurm

                submitted = slurm.submit(plan.to_run, run_dir, options, origin)
        if launcher == "slurm" and not options.no_wait:
            try:
                lost = slurm.wait(submitted, run_dir)
            except KeyboardInterrupt:
                raise Interrupted(f"the submitted jobs keep running; follow them with: python run_all.py "
                                  f"--collect {run_dir}") from None
    return _with_lost(summarize(specs, run_dir, ran=[spec.key for spec in plan.to_run]), lost)


def _with_lost(summary: RunSummary, lost: dict[str, str]) -> RunSummary:
    """Pending jobs whose job ended without a record are failures, with the reason as their error."""
    for key in [key for key in summary.pending if key in lost]:
        summary.pending.remove(key)
        summary.failed.append(key)
        summary.errors[key] = lost[key]
    return summary


def _collected(specs: Sequence[JobSpec], run_dir: Path) -> RunSummary:
    """The run's summary (every finished job is done), where lost jobs count as failed."""
    import submitit

    from .slurm import ended, job_states
    from .watch import lost_reason

    summary, index = summarize(specs, run_dir, ran=[spec.key for spec in specs]), load_index(run_dir)
    handles = {key: submitit.SlurmJob(folder=index[key]["folder"], job_id=index[key]["job_id"])
               for key in summary.pending if index.get(key, {}).get("launcher") == "slurm"}
    states = job_states(list(handles.values()))
    lost = {key: "never submitted" if key not in index else
            f"local job {index[key]['job_id']} has no record (local jobs end with the process that ran them)"
            for key in summary.pending if key not in handles}
    lost.update({key: lost_reason(job, states[job.job_id]) for key, job in handles.items() if ended(job)})
    running = sum(states[job.job_id].startswith("RUNNING") for key, job in handles.items() if key not in lost)
    print(f"collect {run_dir}: {len(summary.done)} finished, {len(summary.failed)} failed, "
          f"{running} running, {len(summary.pending) - len(lost) - running} queued, {len(lost)} lost"
          + (f", {len(summary.blocked)} blocked by a failed dependency" if summary.blocked else ""))
    return _with_lost(summary, lost)


def collect(run_dir, options: DispatchOptions) -> RunSummary:
    """Gather a submitted run: its grid, the records so far, and where the other jobs are. With
    retry_failed, resubmit failed and lost jobs (with options.launcher, or the launcher the run used)."""
    run_dir = Path(run_dir).resolve()
    specs = records.load_grid(run_dir)
    summary = _collected(specs, run_dir)
    retry = [spec for spec in specs if spec.key in summary.failed or spec.key in summary.blocked]
    if not (options.retry_failed and retry):
        return summary
    used = {entry.get("launcher") for entry in load_index(run_dir).values()}
    launcher = options.launcher or ("slurm" if "slurm" in used else "local" if used else "inline")
    options = replace(options, launcher=launcher, retry_failed=True)
    _run(retry, run_dir, options, check(retry, options), records.grid_provenance(run_dir))
    return _collected(specs, run_dir)
