"""Data-parallel finetuning inside one job: the processes submitit (or torchrun) started, as torch's
process group. One process per GPU; on CPU the gloo backend (how the tests run two processes)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0


def current() -> Processes:
    """This process's place, from the environment torch.distributed reads (RANK, WORLD_SIZE, LOCAL_RANK)."""
    return Processes(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: str) -> tuple[Processes, str]:
    """Join the job's process group when it has several tasks; the device this process trains on."""
    if os.environ.get("SUBMITIT_EXECUTOR") and "WORLD_SIZE" not in os.environ:
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:  # tasks_per_node > 1: one task per GPU
            submitit.helpers.TorchDistributedEnvironment().export()
    processes = current()
    if processes.world > 1 and not torch.distributed.is_initialized():
        cuda = device.startswith("cuda")
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=processes.rank,
                                             world_size=processes.world)
        if cuda:
            device = f"cuda:{processes.local_rank}"
            torch.cuda.set_device(device)
    return processes, device


def teardown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
