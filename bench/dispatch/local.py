"""The local backend: one submitit subprocess per free GPU (one job at a time on a CPU-only machine).

A timing job never shares its device with another running job, and a job starts only once every job
it depends on has finished; one whose dependency failed is not started at all.
"""
from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from typing import Sequence

from .. import jobs, records
from ..spec import JobSpec
from ..request import DispatchOptions, LaunchError
from .runner import job_function
from .watch import LAUNCH_DIR, Progress, save_index

POLL_S = 1.0  # how often the driver looks at its jobs
CPU = "cpu"  # the one slot of a machine without GPUs


def needs_gpu(spec: JobSpec) -> bool:
    return spec.device.startswith("cuda")


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
    and a CPU timing job on a GPU machine holds every slot, since it shares the CPU with all of them."""

    def __init__(self, gpus: Sequence[int], processes: int = 1):
        self.slots = list(gpus) or [CPU]
        self.free = list(self.slots)
        self.processes = processes  # GPUs a data-parallel job takes (--finetune-gpus)

    def acquire(self, spec: JobSpec) -> list | None:
        """The slots `spec` may run on now, taken from the free ones; None when it must wait."""
        kind = jobs.get(spec.kind)
        if kind.holds_device and not needs_gpu(spec):
            wanted = len(self.slots)
        elif kind.data_parallel and needs_gpu(spec):
            wanted = self.processes
            if wanted > len(self.slots):
                raise LaunchError(f"--finetune-gpus {wanted}: only {len(self.slots)} GPU(s) visible here; "
                                  f"valid: 1..{len(self.slots)}")
        else:
            wanted = 1
        if len(self.free) < wanted:
            return None
        held, self.free = self.free[:wanted], self.free[wanted:]
        return held

    def release(self, held: list) -> None:
        self.free += held


def local_parameters(options: DispatchOptions, held: list, data_parallel: bool = False) -> dict:
    """submitit.LocalExecutor parameters of a job holding `held` slots (always a timeout: submitit's is 2 min).
    A data-parallel job uses every GPU it holds, one process each; any other job one GPU at most."""
    gpus = [slot for slot in held if slot != CPU]
    gpus = gpus if data_parallel else gpus[:1]
    params = dict(timeout_min=options.time_min, gpus_per_node=len(gpus), visible_gpus=tuple(gpus))
    if len(gpus) > 1:
        params["tasks_per_node"] = len(gpus)  # one process per GPU; submitit sets RANK/WORLD_SIZE for DDP
    return params


def run_local(todo: Sequence[JobSpec], run_dir: Path, options: DispatchOptions, gpus: Sequence[int],
              origin: dict, executor=None) -> dict[str, str]:
    """Run jobs as local submitit processes; returns key -> reason for the jobs that ended without a record."""
    import submitit

    # No "%j" in the folder: the local executor does not expand it (files are named by job id instead).
    executor = executor or submitit.LocalExecutor(folder=run_dir / LAUNCH_DIR / "local")
    waiting = {spec.key for spec in todo}
    scheduler, queue, running = SlotScheduler(gpus, options.finetune_gpus), deque(todo), []  # running: (job, spec, held)
    progress = Progress(len(queue), run_dir)
    try:
        while queue or running:
            started = []
            for spec in list(queue):
                upstream = [u.key for u in jobs.dependencies(spec)]
                if any(key in waiting for key in upstream):
                    continue  # a dependency is queued or running: not yet
                if any(not records.record_path(run_dir, key).exists() for key in upstream):
                    queue.remove(spec)  # a dependency ended without a record: never start it
                    waiting.discard(spec.key)
                    progress.bar.update(1)
                    continue
                held = scheduler.acquire(spec)
                if held is None:
                    break  # in order: a later job does not overtake one waiting for a device
                queue.remove(spec)
                executor.update_parameters(**local_parameters(options, held, jobs.get(spec.kind).data_parallel))
                job = executor.submit(job_function(spec), spec, str(run_dir), options.force, origin)
                running.append((job, spec, held))
                started.append((spec, job))
            if started:
                save_index(run_dir, "local", started)
            for entry in [entry for entry in running if entry[0].done()]:
                running.remove(entry)
                job, spec, held = entry
                scheduler.release(held)
                waiting.discard(spec.key)
                progress.finished(spec, job, job.state)
            progress.show(running=len(running), pending=len(queue))
            time.sleep(POLL_S if running else 0)
    finally:
        progress.close()
    return progress.lost
