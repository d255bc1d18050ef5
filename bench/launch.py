"""Dispatch a grid of jobs: in this process, as local subprocesses (one per GPU), or as SLURM job arrays.

Local and SLURM jobs go through submitit. Each one calls `bench.runner.run_job` in its own process and
writes its record straight into the run folder, which must therefore be on a filesystem the jobs share.
They import a copy of the code taken at submission (<run>/launch/code/), so editing the repository while
jobs wait in a queue does not change what they run. <run>/launch/jobs.json maps keys to submitted jobs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

import submitit
from submitit.helpers import Checkpointable
from tqdm.auto import tqdm

from . import records
from .runner import RunSummary, plan, run_inline, run_job, summarize
from .spec import JobSpec, load_grid

LAUNCHERS = ("inline", "local", "slurm", "auto")
DEFAULT_TIME = "120"
DEFAULT_MAX_ARRAY_SIZE = 1000  # SLURM's own default MaxArraySize is 1001
DEFAULT_ARRAY_PARALLELISM = 256
POLL_S = 1.0  # how often the driver looks at its jobs
SLURM_REFRESH_S = 10.0  # how often it asks sacct (one call for all jobs)
REPO_ROOT = Path(__file__).resolve().parent.parent
LAUNCH_DIR, INDEX_FILE = "launch", "jobs.json"  # <run>/launch/jobs.json: key -> submitted job
CPU = "cpu"  # the one slot of a machine without GPUs


class LaunchError(ValueError):
    """A dispatch setting the user got wrong (bad --time, no sbatch, ...)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the dispatch options (--launcher, its local/SLURM settings, --no-wait, --collect) to `parser`."""
    group = parser.add_argument_group("dispatch", "Where jobs run. local/slurm jobs write their records "
                                      "straight into the run folder: it must be on a filesystem they share.")
    group.add_argument("--launcher", choices=LAUNCHERS, default=None,
                       help="inline: in this process (the default); local: one submitit subprocess per free "
                            "GPU, one job at a time on CPU; slurm: job arrays through sbatch; auto: slurm if "
                            "sbatch is on PATH, else local if a GPU is visible, else inline. With --collect "
                            "the default is the launcher the run was submitted with")
    group.add_argument("--time", default=DEFAULT_TIME,
                       help="time limit per job, local and slurm: minutes or SLURM's [D-]HH:MM:SS")
    group.add_argument("--no-wait", action="store_true",
                       help="slurm: return once the jobs are queued; gather them later with --collect RUN_DIR")
    group.add_argument("--collect", metavar="RUN_DIR", default=None,
                       help="gather a submitted run (grid.json + records) and say what is still pending or "
                            "was lost; with --retry-failed resubmit the failed and lost jobs")
    slurm = parser.add_argument_group("slurm", "SLURM settings of every job (sbatch options)")
    for flag in ("--partition", "--account", "--qos", "--constraint"):
        slurm.add_argument(flag, default=None)
    slurm.add_argument("--gpus-per-node", type=int, default=None,
                       help="GPUs per job (default: 1 for jobs on a cuda device, else none)")
    slurm.add_argument("--cpus-per-task", type=int, default=None)
    slurm.add_argument("--mem", default=None, help="memory per job in SLURM syntax, e.g. 32G")
    slurm.add_argument("--exclusive", action="store_true", help="every job gets a whole node")
    slurm.add_argument("--throughput-exclusive", action="store_true",
                       help="throughput jobs get a whole node, so nothing else runs beside a timing")
    slurm.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                       help="shell line run before each job, e.g. 'module load cuda; source venv/bin/activate' "
                            "(repeatable)")
    slurm.add_argument("--array-parallelism", type=int, default=DEFAULT_ARRAY_PARALLELISM,
                       help="at most this many tasks of one array run at once")
    slurm.add_argument("--max-array-size", type=int, default=None,
                       help="jobs per array at most (default: MaxArraySize of 'scontrol show config', else "
                            f"{DEFAULT_MAX_ARRAY_SIZE})")


# ----------------------------------------------------------------------------------------------
# Pure pieces: launcher choice, time limits, SLURM parameters, array chunks, GPU slots

def resolve_launcher(name: str | None, which: Callable[[str], str | None] = shutil.which,
                     gpus: Callable[[], list[int]] | None = None) -> str:
    """The launcher to use: `name`, or for "auto" SLURM if sbatch is on PATH, else local if GPUs are visible."""
    name = name or "inline"
    if name not in LAUNCHERS:
        raise LaunchError(f"unknown launcher {name!r}; valid: {', '.join(LAUNCHERS)}")
    if name != "auto":
        return name
    if which("sbatch"):
        return "slurm"
    return "local" if (gpus or visible_gpus)() else "inline"


def parse_time_min(text) -> int:
    """Minutes of a SLURM time: "90", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM" or "D-HH:MM:SS" (seconds round up)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not match:
        raise LaunchError(f"--time {text!r} is not a time limit; valid: minutes or [D-]HH:MM:SS")
    days, *fields = match.groups()
    numbers = [int(f) for f in fields if f is not None]
    if days is not None:  # after "D-" the first field is hours
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        hours += 24 * int(days)
    else:
        hours, minutes, seconds = {1: [0, *numbers, 0], 2: [0, *numbers], 3: numbers}[len(numbers)]
    total = 60 * hours + minutes + (1 if seconds else 0)
    if total <= 0:
        raise LaunchError(f"--time {text!r} is not a positive time limit; valid: minutes or [D-]HH:MM:SS")
    return total


def needs_gpu(spec: JobSpec) -> bool:
    return spec.device.startswith("cuda")


def slurm_parameters(args: argparse.Namespace, gpu: bool, throughput: bool) -> dict:
    """submitit.SlurmExecutor parameters for one group of jobs (all on GPU or all on CPU, throughput or not)."""
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (1 if gpu else None)
    params = dict(
        time=parse_time_min(args.time), partition=args.partition, account=args.account, qos=args.qos,
        constraint=args.constraint, cpus_per_task=args.cpus_per_task, mem=args.mem, gpus_per_node=gpus or None,
        exclusive=True if args.exclusive or (throughput and args.throughput_exclusive) else None,
        setup=list(args.slurm_setup) or None, array_parallelism=args.array_parallelism,
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


def array_plan(specs: Sequence[JobSpec], args: argparse.Namespace, max_size: int) -> list[tuple[dict, list[JobSpec]]]:
    """The grid as SLURM arrays: one parameter set per (GPU?, throughput?) group, chunks of at most `max_size`."""
    groups: dict[tuple[bool, bool], list[JobSpec]] = {}
    for spec in specs:
        groups.setdefault((needs_gpu(spec), spec.metric == "throughput"), []).append(spec)
    return [(slurm_parameters(args, gpu, throughput), chunk[i:i + max_size])
            for (gpu, throughput), chunk in groups.items() for i in range(0, len(chunk), max_size)]


def gpu_slots(cuda_visible_devices: str | None, device_count: int) -> list[int]:
    """Physical ids of the GPUs this process may use (local jobs get one each through CUDA_VISIBLE_DEVICES)."""
    if cuda_visible_devices is None:
        return list(range(device_count))
    ids = [item.strip() for item in cuda_visible_devices.split(",") if item.strip()]
    if not all(item.isdigit() for item in ids):
        raise LaunchError(f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} is not a list of GPU indices; "
                          "valid for --launcher local: e.g. 0,1")
    return [int(item) for item in ids][:device_count]


def visible_gpus() -> list[int]:
    import torch

    return gpu_slots(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())


class SlotScheduler:
    """Hands out devices so that no two running jobs share one: a job holds one GPU (or the only CPU slot),
    and a CPU throughput job on a GPU machine holds every slot, since it shares the CPU with all of them."""

    def __init__(self, gpus: Sequence[int]):
        self.slots = list(gpus) or [CPU]
        self.free = list(self.slots)

    def acquire(self, spec: JobSpec) -> list | None:
        """The slots `spec` may run on now, taken from the free ones; None when it must wait."""
        wanted = len(self.slots) if (spec.metric == "throughput" and not needs_gpu(spec)) else 1
        if len(self.free) < wanted:
            return None
        held, self.free = self.free[:wanted], self.free[wanted:]
        return held

    def release(self, held: list) -> None:
        self.free += held


def local_parameters(args: argparse.Namespace, held: list) -> dict:
    """submitit.LocalExecutor parameters of a job holding `held` slots (always a timeout: submitit's is 2 min)."""
    gpus = [slot for slot in held if slot != CPU][:1]
    return dict(timeout_min=parse_time_min(args.time), gpus_per_node=len(gpus), visible_gpus=tuple(gpus))


class Requeueable(Checkpointable):
    """A job callable that SLURM requeues on timeout or preemption: submitit calls `checkpoint`, which
    resubmits it with the same arguments. For long jobs (fine-tuning) that resume from their own files."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def job_callable(spec: JobSpec) -> Callable:
    return Requeueable(run_job) if spec.finetune_epochs > 0 else run_job


# ----------------------------------------------------------------------------------------------
# Code snapshot

def _repo_files(root: Path) -> list[str] | None:
    """Tracked plus new, not ignored files of the git repository at `root` (None if it is not one)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=root, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return [name for name in out.stdout.decode().split("\0") if name] if out.returncode == 0 else None


@contextlib.contextmanager
def code_snapshot(dest_parent: Path, root: Path = REPO_ROOT):
    """Copy the code under `root` to a new folder in `dest_parent` and work from there while submitting.

    Submitted jobs start in the submitter's working directory and import from it first, so they run the
    copy, whatever happens to `root` later. A copy rather than submitit's RsyncSnapshot: that needs rsync
    and takes tracked files only, so a new, not yet committed module would be missing from the jobs.
    """
    Path(dest_parent).mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=dest_parent))
    files = _repo_files(root)
    if files is None:  # an installed package: copy the packages themselves
        files = [str(p.relative_to(root)) for pkg in ("bench", "methods") for p in (root / pkg).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts]
    for name in files:
        source = root / name
        if source.is_file():  # a tracked file deleted in the work tree is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    previous = Path.cwd()
    os.chdir(dest)
    try:
        yield dest
    finally:
        os.chdir(previous)


# ----------------------------------------------------------------------------------------------
# Watching jobs

def _load_index(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / LAUNCH_DIR / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _save_index(run_dir: Path, launcher: str, submitted: Sequence[tuple[JobSpec, submitit.Job]]) -> None:
    index = _load_index(run_dir)
    for spec, job in submitted:
        index[spec.key] = dict(launcher=launcher, job_id=job.job_id, folder=str(job.paths.folder), at=time.time())
    records.atomic_write_json(run_dir / LAUNCH_DIR / INDEX_FILE, index)


def _lost_reason(job: submitit.Job, state: str) -> str:
    tail = (job.stderr() or "").strip().splitlines()[-1:]
    return f"job {job.job_id} ended {state} without a record" + (f" ({tail[0].strip()})" if tail else "")


class _Progress:
    """A tqdm bar over jobs with done / running / pending / failed counts. Remembers the jobs that ended
    without any record (killed, cancelled, timed out, or broken before run_job) in `lost`."""

    def __init__(self, total: int, run_dir: Path):
        self.run_dir, self.done, self.failed, self.lost = run_dir, 0, 0, {}
        self.bar = tqdm(total=total, desc="jobs", unit="job", dynamic_ncols=True)

    def finished(self, spec: JobSpec, job: submitit.Job, state: str) -> None:
        if records.record_path(self.run_dir, spec.key).exists():
            self.done += 1
        else:
            self.failed += 1
            if not records.error_path(self.run_dir, spec.key).exists():
                self.lost[spec.key] = _lost_reason(job, state)
        self.bar.update(1)

    def show(self, running: int, pending: int) -> None:
        self.bar.set_postfix(dict(done=self.done, running=running, pending=pending, failed=self.failed))


def _run_local(todo: Sequence[JobSpec], run_dir: Path, args: argparse.Namespace, gpus: Sequence[int],
               executor=None) -> dict[str, str]:
    """Run jobs as local submitit processes, at most one per GPU (one at a time without GPUs);
    returns key -> reason for the jobs that ended without a record."""
    executor = executor or submitit.LocalExecutor(folder=run_dir / LAUNCH_DIR / "local" / "%j")
    scheduler, queue, running = SlotScheduler(gpus), deque(todo), {}
    progress = _Progress(len(queue), run_dir)
    try:
        while queue or running:
            started = []
            while queue and (held := scheduler.acquire(queue[0])) is not None:
                spec = queue.popleft()
                executor.update_parameters(**local_parameters(args, held))
                job = executor.submit(job_callable(spec), spec, str(run_dir), args.force)
                running[job] = (spec, held)
                started.append((spec, job))
            if started:
                _save_index(run_dir, "local", started)
            for job in [job for job in running if job.done()]:
                spec, held = running.pop(job)
                scheduler.release(held)
                progress.finished(spec, job, job.state)
            progress.show(running=len(running), pending=len(queue))
            time.sleep(POLL_S if running else 0)
    finally:
        progress.bar.close()
    return progress.lost


def _submit_slurm(todo: Sequence[JobSpec], run_dir: Path, args: argparse.Namespace) -> list:
    """Submit the jobs as SLURM arrays; [(spec, job)] in submission order."""
    if not shutil.which("sbatch"):
        raise LaunchError("--launcher slurm: sbatch is not on PATH; valid here: --launcher local or inline")
    submitted = []
    for params, chunk in array_plan(todo, args, max_array_size(args.max_array_size)):
        # A fresh executor per array: update_parameters merges, so an earlier --exclusive would stick.
        executor = submitit.SlurmExecutor(folder=run_dir / LAUNCH_DIR / "slurm" / "%j")
        executor.update_parameters(job_name="tokenbench", **params)
        try:
            with executor.batch():
                jobs = [executor.submit(job_callable(spec), spec, str(run_dir), args.force) for spec in chunk]
        except submitit.core.utils.FailedJobError as exc:  # sbatch refused: no controller, bad partition, ...
            _save_index(run_dir, "slurm", submitted)  # arrays already queued stay collectable
            reason = next((line for line in str(exc).splitlines() if line.strip()), "sbatch failed")
            raise LaunchError(f"--launcher slurm: {reason.strip()}; {len(submitted)} of {len(todo)} jobs "
                              f"submitted; fix it and rerun, or gather them with --collect {run_dir}") from None
        submitted += zip(chunk, jobs)
    return submitted


def _slurm_states(jobs: Sequence[submitit.Job]) -> dict[str, str]:
    """job id -> SLURM state, from one sacct call for all of them (UNKNOWN without accounting)."""
    if jobs:
        jobs[0].watcher.update()
    return {job.job_id: job.watcher.get_state(job.job_id, mode="cache") for job in jobs}


def _ended(job: submitit.Job) -> bool:
    """Whether a SLURM job is over, as of the last `_slurm_states`."""
    return job.paths.result_pickle.exists() or job.watcher.is_done(job.job_id, mode="cache")


def _wait_slurm(submitted: Sequence[tuple[JobSpec, submitit.Job]], run_dir: Path) -> dict[str, str]:
    """Show progress until every job ended; key -> reason for those that ended without a record."""
    active = {job: spec for spec, job in submitted}
    progress, states, refreshed = _Progress(len(active), run_dir), {}, float("-inf")
    try:
        while active:
            if time.time() - refreshed >= SLURM_REFRESH_S:
                states, refreshed = _slurm_states(list(active)), time.time()
            for job in [job for job in active if _ended(job)]:
                progress.finished(active.pop(job), job, states.get(job.job_id, "UNKNOWN"))
            running = sum(states.get(job.job_id, "").startswith("RUNNING") for job in active)
            progress.show(running=running, pending=len(active) - running)
            time.sleep(POLL_S if active else 0)
    finally:
        progress.bar.close()
    return progress.lost


# ----------------------------------------------------------------------------------------------
# Entry points

def _with_lost(summary: RunSummary, lost: dict[str, str]) -> RunSummary:
    """Pending jobs whose job ended without a record are failures, with the reason as their error."""
    for key in [key for key in summary.pending if key in lost]:
        summary.pending.remove(key)
        summary.failed.append(key)
        summary.errors[key] = lost[key]
    return summary


def check_arguments(specs: Sequence[JobSpec], args: argparse.Namespace) -> str:
    """The launcher `args` resolve to, after the checks of the launch flags that need no cluster
    (LaunchError), so that the CLI can reject them before it writes anything."""
    launcher = resolve_launcher(args.launcher)
    if launcher == "inline":
        return launcher
    if launcher == "local" and args.no_wait:
        raise LaunchError("--no-wait needs --launcher slurm: local jobs are started by this process as GPUs free up")
    parse_time_min(args.time)  # a bad --time is a user error before anything is submitted
    pinned = sorted({spec.device for spec in specs if spec.device.startswith("cuda:")})
    if pinned:  # a job sees only the GPU it was given, as cuda:0
        raise LaunchError(f"--device {pinned[0]} with --launcher {launcher}: each job gets a GPU of its own; "
                          "valid: --device cuda")
    return launcher


def dispatch(specs: Sequence[JobSpec], run_dir, args: argparse.Namespace) -> RunSummary:
    """Run `specs` into `run_dir` with the launcher `args.launcher` names; the summary of the grid.
    `args` comes from a parser with `add_arguments` and run_all's --force and --retry-failed."""
    launcher = check_arguments(specs, args)
    if launcher == "inline":
        return run_inline(specs, run_dir, force=args.force, retry_failed=args.retry_failed)
    run_dir = Path(run_dir).resolve()  # jobs start in the code snapshot, not here
    todo = plan(specs, run_dir, force=args.force, retry_failed=args.retry_failed)
    lost: dict[str, str] = {}
    if todo.to_run:
        with code_snapshot(run_dir / LAUNCH_DIR / "code"):
            if launcher == "local":
                lost = _run_local(todo.to_run, run_dir, args, visible_gpus())
            else:
                submitted = _submit_slurm(todo.to_run, run_dir, args)
                _save_index(run_dir, "slurm", submitted)
        if launcher == "slurm" and not args.no_wait:
            lost = _wait_slurm(submitted, run_dir)
    return _with_lost(summarize(specs, run_dir, ran=[spec.key for spec in todo.to_run]), lost)


def _collected(specs: Sequence[JobSpec], run_dir: Path) -> RunSummary:
    """The run's summary (every finished job is done), where lost jobs count as failed."""
    summary, index = summarize(specs, run_dir, ran=[spec.key for spec in specs]), _load_index(run_dir)
    jobs = {key: submitit.SlurmJob(folder=index[key]["folder"], job_id=index[key]["job_id"])
            for key in summary.pending if index.get(key, {}).get("launcher") == "slurm"}
    states = _slurm_states(list(jobs.values()))
    lost = {key: "never submitted" if key not in index else
            f"local job {index[key]['job_id']} has no record (local jobs end with the process that ran them)"
            for key in summary.pending if key not in jobs}
    lost.update({key: _lost_reason(job, states[job.job_id]) for key, job in jobs.items() if _ended(job)})
    running = sum(states[job.job_id].startswith("RUNNING") for key, job in jobs.items() if key not in lost)
    print(f"collect {run_dir}: {len(summary.done)} finished, {len(summary.failed)} failed, "
          f"{running} running, {len(summary.pending) - len(lost) - running} queued, {len(lost)} lost")
    return _with_lost(summary, lost)


def collect(run_dir, args: argparse.Namespace) -> RunSummary:
    """Gather a submitted run: its grid, the records so far, and where the other jobs are. With
    --retry-failed, resubmit failed and lost jobs (with --launcher, or the launcher the run used)."""
    run_dir = Path(run_dir).resolve()
    specs = load_grid(run_dir)
    summary = _collected(specs, run_dir)
    retry = [spec for spec in specs if spec.key in summary.failed]
    if not (args.retry_failed and retry):
        return summary
    used = {entry.get("launcher") for entry in _load_index(run_dir).values()}
    launcher = args.launcher or ("slurm" if "slurm" in used else "local" if used else "inline")
    dispatch(retry, run_dir, argparse.Namespace(**{**vars(args), "launcher": launcher, "retry_failed": True}))
    return _collected(specs, run_dir)
