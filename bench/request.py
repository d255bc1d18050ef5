"""What a user asks for, typed: the command line's flags after parsing, before any checking.

`run_all.py` builds a `Request` from argv and hands it to `bench.grid.plan`, which checks and expands
it; its `DispatchOptions` go to `bench.dispatch`. `DispatchOptions(...)` checks everything about
dispatch that needs no cluster when it is built, so a bad flag is rejected before anything is written
(LaunchError: one line naming the value and the valid ones). Light to import (no torch, timm, methods
or submitit), so parsing a command line costs nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .spec import EMBEDDED_MODEL


LAUNCHERS = ("inline", "local", "slurm", "auto")
DEFAULT_TIME = "120"
DEFAULT_ARRAY_PARALLELISM = 256
_MEM = re.compile(r"\d+[KMGT]?B?", re.IGNORECASE)  # sbatch --mem: a number with an optional unit


class LaunchError(ValueError):
    """A dispatch setting the user got wrong (bad --time, no sbatch, ...)."""


def parse_time_min(text) -> int:
    """Minutes of a SLURM time: "90", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM" or "D-HH:MM:SS" (seconds round up)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not match:
        raise LaunchError(f"--time {text!r} is not a time limit; valid: minutes or [D-]HH:MM:SS")
    days, *parts = match.groups()
    numbers = [int(f) for f in parts if f is not None]
    if days is not None:  # after "D-" the first field is hours
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        hours += 24 * int(days)
    else:
        hours, minutes, seconds = {1: [0, *numbers, 0], 2: [0, *numbers], 3: numbers}[len(numbers)]
    total = 60 * hours + minutes + (1 if seconds else 0)
    if total <= 0:
        raise LaunchError(f"--time {text!r} is not a positive time limit; valid: minutes or [D-]HH:MM:SS")
    return total


@dataclass(frozen=True)
class DispatchOptions:
    launcher: str | None = None  # None: inline, or with --collect the launcher the run used
    time: str = DEFAULT_TIME
    no_wait: bool = False
    force: bool = False
    retry_failed: bool = False
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    exclusive: bool = False
    throughput_exclusive: bool = True  # a timing shares its node with nothing (docs/protocol.md#dispatch)
    slurm_setup: tuple[str, ...] = field(default=())
    array_parallelism: int = DEFAULT_ARRAY_PARALLELISM
    max_array_size: int | None = None  # None: the cluster's MaxArraySize
    finetune_gpus: int = 1  # processes (one per GPU) of each data-parallel job: DDP inside one job

    def __post_init__(self):
        if self.launcher is not None and self.launcher not in LAUNCHERS:
            raise LaunchError(f"--launcher {self.launcher!r} is not valid; valid: {', '.join(LAUNCHERS)}")
        parse_time_min(self.time)
        for flag, value, minimum in (("--gpus-per-node", self.gpus_per_node, 0),
                                     ("--cpus-per-task", self.cpus_per_task, 1),
                                     ("--array-parallelism", self.array_parallelism, 1),
                                     ("--max-array-size", self.max_array_size, 1),
                                     ("--finetune-gpus", self.finetune_gpus, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise LaunchError(f"{flag} {value!r} is not valid; valid: an integer >= {minimum}")
        if self.mem is not None and not _MEM.fullmatch(str(self.mem).strip()):
            raise LaunchError(f"--mem {self.mem!r} is not a memory size; valid: a number with an optional "
                              "unit K, M, G or T (e.g. 32G)")
        for flag in ("partition", "account", "qos", "constraint"):
            value = getattr(self, flag)
            if value is not None and (not str(value).strip() or any(c.isspace() for c in str(value))):
                raise LaunchError(f"--{flag} {value!r} is not valid; valid: a SLURM name without spaces")

    def processes(self, data_parallel: bool) -> int:
        """Processes of one job: --finetune-gpus for kinds that train data-parallel, else one."""
        return self.finetune_gpus if data_parallel else 1

    @property
    def time_min(self) -> int:
        return parse_time_min(self.time)


@dataclass(frozen=True)
class Request:
    models: tuple[str, ...] = (EMBEDDED_MODEL,)
    methods: tuple[str, ...] | None = None  # names as given (aliases allowed); None: every method
    ratios: tuple[float, ...] = (0.7,)
    metrics: tuple[str, ...] | None = None  # job kinds to measure; None: every measuring kind
    layer_sets: tuple[tuple[str | None, tuple[int, ...]], ...] = ()  # (method or None = all, blocks)
    method_options: tuple[tuple[str, str, Any], ...] = ()  # (method, option, value); repeats sweep
    data: str | None = None  # None: the embedded Fashion-MNIST test split
    checkpoint: str | None = None
    pretrained: bool = False
    random_weights: bool = False
    skip_unreadable: bool = False  # accuracy: leave images that cannot be decoded out, and list them
    batch_size: int = 256  # accuracy
    batch_sizes: tuple[int, ...] | None = None  # throughput; None: the device's defaults
    device: str | None = None  # None: cuda if available
    dtype: str = "fp32"
    limit: int | None = None
    seed: int = 0
    seeds: tuple[int, ...] | None = None  # --seeds: one job per seed of each seed-dependent configuration
    trace_images: int | None = None  # trace jobs: images traced; None: the kind's default
    throughput: tuple[tuple[str, Any], ...] = ()  # timing knobs the user set (warmup, repeats, ...)
    finetune: tuple[tuple[str, Any], ...] = ()  # finetune recipe settings the user set; () = off-the-shelf
    out: str | None = None  # None: results/<timestamp>
    dispatch: DispatchOptions = field(default_factory=DispatchOptions)
    sweep: str | None = None  # a sweep file whose points are planned with these settings (bench/sweep.py)
