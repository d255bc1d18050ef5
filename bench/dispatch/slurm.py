"""The SLURM backend: the grid as job arrays through submitit, dependants as `afterok` jobs.

Jobs without a pending dependency go in as arrays, one per (GPU?, timing?) group and chunked to the
cluster's MaxArraySize. A job that needs another job's record goes in on its own with
`--dependency=afterok:<that job>` and `--kill-on-invalid-dep=yes`, so SLURM starts it only after its
dependency succeeded and cancels it if the dependency failed. Jobs of the run that are still queued or
running from an earlier submission (a driver stopped with Ctrl-C, say) are never submitted again.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Sequence

from .. import jobs
from ..spec import JobSpec
from .local import needs_gpu
from ..request import DispatchOptions, LaunchError
from .runner import in_dependency_order, job_function
from .watch import LAUNCH_DIR, Progress, load_index, save_index

DEFAULT_MAX_ARRAY_SIZE = 1000  # SLURM's own default MaxArraySize is 1001
POLL_S = 1.0
SLURM_REFRESH_S = 10.0  # how often the driver asks sacct (one call for all jobs)
# Not COMPLETING: such a job has finished its work (its record, if any, is written); a retry may go in.
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "SUSPENDED", "RESIZING")


def check_available() -> None:
    missing = [name for name in ("sbatch", "srun") if not shutil.which(name)]
    if missing:
        raise LaunchError(f"--launcher slurm: {' and '.join(missing)} not on PATH (not a SLURM login node?); "
                          "valid here: --launcher local or inline")


def check_partition(partition: str | None) -> None:
    """A partition the cluster does not have is refused now, before the grid and the code snapshot are
    written, rather than by sbatch after them. Where scontrol does not answer, sbatch will judge."""
    if partition is None or not shutil.which("scontrol"):
        return
    try:
        found = subprocess.run(["scontrol", "show", "partition", partition], capture_output=True, text=True,
                               timeout=30)
        names = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return
    if found.returncode != 0 and "not found" in (found.stdout + found.stderr).lower():
        valid = ", ".join(dict.fromkeys(names)) or "see sinfo"
        raise LaunchError(f"--partition {partition!r} is not a partition of this cluster; valid: {valid}")


def slurm_parameters(options: DispatchOptions, gpu: bool, timing: bool, tasks: int = 1) -> dict:
    """submitit.SlurmExecutor parameters for one group of jobs (all on GPU or all on CPU, timing or not,
    with `tasks` processes each: one per GPU for data-parallel finetuning, which submitit's distributed
    environment turns into a torch process group)."""
    gpus = options.gpus_per_node if options.gpus_per_node is not None else (tasks if gpu else None)
    params = dict(
        time=options.time_min, partition=options.partition, account=options.account, qos=options.qos,
        constraint=options.constraint, cpus_per_task=options.cpus_per_task, mem=options.mem,
        gpus_per_node=gpus or None,
        exclusive=True if options.exclusive or (timing and options.throughput_exclusive) else None,
        setup=list(options.slurm_setup) or None, array_parallelism=options.array_parallelism,
        tasks_per_node=tasks if tasks > 1 else None,
    )
    return {name: value for name, value in params.items() if value is not None}


def parse_max_array_size(scontrol_config: str) -> int | None:
    """MaxArraySize from `scontrol show config` output (an array of N tasks has indices 0..N-1)."""
    match = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)", scontrol_config, re.MULTILINE)
    return int(match.group(1)) if match else None


def max_array_size(override: int | None = None) -> int:
    if override:
        return override
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    return parse_max_array_size(out) or DEFAULT_MAX_ARRAY_SIZE


def _group(spec: JobSpec, options: DispatchOptions) -> tuple[bool, bool, int]:
    kind = jobs.get(spec.kind)
    return needs_gpu(spec), kind.holds_device, options.processes(kind.data_parallel)


def array_plan(specs: Sequence[JobSpec], options: DispatchOptions, max_size: int) -> list[tuple[dict, list[JobSpec]]]:
    """The grid as SLURM arrays: one parameter set per (GPU?, timing?, processes) group, chunks of at most
    `max_size`."""
    groups: dict[tuple[bool, bool, int], list[JobSpec]] = {}
    for spec in specs:
        groups.setdefault(_group(spec, options), []).append(spec)
    return [(slurm_parameters(options, *group), chunk[i:i + max_size])
            for group, chunk in groups.items() for i in range(0, len(chunk), max_size)]


def active_jobs(run_dir: Path, keys: Sequence[str]) -> dict[str, str]:
    """key -> SLURM job id of the run's jobs that are still queued or running (squeue, one call)."""
    index = load_index(run_dir)
    ids = {index[key]["job_id"]: key for key in keys
           if index.get(key, {}).get("launcher") == "slurm"}
    if not ids:
        return {}
    base_ids = sorted({job_id.split("_")[0] for job_id in ids})
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(base_ids)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise LaunchError(f"--launcher slurm: squeue does not answer ({exc}); cannot tell which jobs of "
                          f"{run_dir} are still queued; gather them with --collect {run_dir}") from None
    import submitit

    active = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id in ids and state.split()[0] in ACTIVE_STATES:
            key = ids[job_id]
            # A job whose function has returned is still RUNNING for SLURM a moment longer: it is done.
            if not submitit.SlurmJob(folder=index[key]["folder"], job_id=job_id).paths.result_pickle.exists():
                active[key] = job_id
    return active


def submit(todo: Sequence[JobSpec], run_dir: Path, options: DispatchOptions, origin: dict) -> list:
    """Submit what is not already queued; [(spec, job)] of every job of `todo` now in the queue."""
    import submitit

    check_available()
    already = active_jobs(run_dir, [spec.key for spec in todo])
    queued = [(spec, submitit.SlurmJob(folder=load_index(run_dir)[spec.key]["folder"], job_id=already[spec.key]))
              for spec in todo if spec.key in already]
    fresh = [spec for spec in todo if spec.key not in already]
    unfinished = {spec.key for spec in todo}  # queued before or to submit now
    independent = [s for s in fresh if not any(u.key in unfinished for u in jobs.dependencies(s))]
    dependants = [s for s in fresh if s not in independent]
    submitted: list = []
    try:
        for params, chunk in array_plan(independent, options, max_array_size(options.max_array_size)):
            # A fresh executor per array: update_parameters merges, so an earlier --exclusive would stick.
            executor = _executor(run_dir, params)
            with executor.batch():
                handles = [executor.submit(job_function(spec), spec, str(run_dir), options.force, origin) for spec in chunk]
            submitted += zip(chunk, handles)
            save_index(run_dir, "slurm", submitted)
        job_of = {spec.key: job for spec, job in [*queued, *submitted]}
        for spec in in_dependency_order(dependants):
            after = ":".join(job_of[u.key].job_id for u in jobs.dependencies(spec) if u.key in job_of)
            params = dict(slurm_parameters(options, *_group(spec, options)), dependency=f"afterok:{after}",
                          additional_parameters={"kill-on-invalid-dep": "yes"})
            params.pop("array_parallelism", None)
            job = _executor(run_dir, params).submit(job_function(spec), spec, str(run_dir), options.force, origin)
            job_of[spec.key] = job
            submitted.append((spec, job))
            save_index(run_dir, "slurm", submitted)
    except submitit.core.utils.FailedJobError as exc:  # sbatch refused: no controller, bad partition, ...
        reason = next((line for line in str(exc).splitlines() if line.strip()), "sbatch failed")
        raise LaunchError(f"--launcher slurm: {reason.strip()}; {len(submitted)} of {len(fresh)} jobs "
                          f"submitted; fix it and rerun, or gather them with --collect {run_dir}") from None
    return [*queued, *submitted]


def _executor(run_dir: Path, params: dict):
    import submitit

    executor = submitit.SlurmExecutor(folder=run_dir / LAUNCH_DIR / "slurm" / "%j")
    executor.update_parameters(job_name="tokenbench", **params)
    return executor


def job_states(handles: Sequence) -> dict[str, str]:
    """job id -> SLURM state, from one sacct call for all of them (UNKNOWN without accounting)."""
    if handles:
        handles[0].watcher.update()
    return {job.job_id: job.watcher.get_state(job.job_id, mode="cache") for job in handles}


def ended(job) -> bool:
    """Whether a SLURM job is over, as of the last `job_states`."""
    return job.paths.result_pickle.exists() or job.watcher.is_done(job.job_id, mode="cache")


def wait(submitted: Sequence[tuple[JobSpec, object]], run_dir: Path) -> dict[str, str]:
    """Show progress until every job ended; key -> reason for those that ended without a record."""
    active = {job: spec for spec, job in submitted}
    progress, states, refreshed = Progress(len(active), run_dir), {}, float("-inf")
    try:
        while active:
            if time.time() - refreshed >= SLURM_REFRESH_S:
                states, refreshed = job_states(list(active)), time.time()
            for job in [job for job in active if ended(job)]:
                progress.finished(active.pop(job), job, states.get(job.job_id, "UNKNOWN"))
            running = sum(states.get(job.job_id, "").startswith("RUNNING") for job in active)
            progress.show(running=running, pending=len(active) - running)
            time.sleep(POLL_S if active else 0)
    finally:
        progress.close()
    return progress.lost
