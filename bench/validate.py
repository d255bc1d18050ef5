"""Pre-flight: check a whole grid before anything is written, so a typo costs a message, not a run.

`preflight(specs, run_dir)` raises `UsageError` (a ValueError) with one line naming the bad value and
the valid ones. `bench.grid.plan` runs it after it has built every method configuration against its
model (so methods, options, layers and ratios are checked there). Checks here, cheapest first:
- job fields: kind, dtype, batch size, image limit, device string;
- models: every name is a timm model (closest names suggested otherwise);
- each kind's own checks (`JobKind.validate`): an accuracy job's weights, data and class count, a
  throughput job's knobs, ...;
- the device: it exists here and can run the dtype (a tiny autocast probe of the ops a ViT uses);
- the output folder can be created and written.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import torch

from . import jobs, models
from .spec import DTYPES, JobSpec

DEVICE_TYPES = ("cpu", "cuda", "mps")


class UsageError(ValueError):
    """A grid that cannot run as asked (bad name, value, file or folder); the message says which."""


def preflight(specs: Sequence[JobSpec], run_dir, devices_here: bool = True) -> None:
    """Validate every job of a grid and the output folder; raise UsageError on the first problem.

    `devices_here=False` skips the device and dtype checks, for launchers whose jobs run on other
    machines (a SLURM login node usually has no GPU although the jobs will).
    """
    specs = list(specs)
    if not specs:
        raise UsageError("the grid has no jobs; valid: at least one method, ratio, model and metric")
    for spec in specs:
        check_fields(spec)
        if devices_here:
            check_device(spec.device)
    for name in _unique(s.model for s in specs):
        _wrap(models.check_model_name, name)
    # A kind's own checks read the weights, data and knobs, not the method configuration (grid.plan
    # built every configuration against its model already): once per job without its method.
    for spec in _unique_by(specs, lambda s: replace(s, method="none", keep_ratio=1.0, layers=None, method_options=())):
        check = jobs.get(spec.kind).validate
        if check is not None:
            _wrap(check, spec)
    if devices_here:
        for device, dtype in _unique((s.device, s.dtype) for s in specs):
            check_dtype_runs(device, dtype)
    check_output_dir(run_dir)


# ---------------------------------------------------------------------------------------------
# Flags given empty

_EMPTY_HINTS = {
    "--out": "a folder name, or no --out for results/<timestamp>",
    "--data-dir": "an ImageNet-style folder, or no --data-dir for the embedded Fashion-MNIST",
    "--checkpoint": "a .pth, .pt or .safetensors file, or no --checkpoint",
    "--device": "cpu, cuda, cuda:1, ..., or no --device",
}


def check_given_values(values: dict) -> None:
    """A flag given as an empty or blank string (a shell variable that was never set) is a mistake:
    taken as "not given", `--out ""` would write to a new folder and `--data-dir ""` measure the
    embedded data set instead of the one meant."""
    for flag, value in values.items():
        if value is not None and not str(value).strip():
            raise UsageError(f"{flag} {value!r} is empty; valid: {_EMPTY_HINTS.get(flag, 'a value')}")


# ---------------------------------------------------------------------------------------------
# Job fields

def check_fields(spec: JobSpec) -> None:
    try:
        jobs.get(spec.kind)
    except jobs.UnknownKind as exc:
        raise UsageError(str(exc)) from None
    if spec.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {spec.dtype!r}; valid: {', '.join(DTYPES)}")
    if not _is_positive_int(spec.batch_size):
        raise UsageError(f"batch size {spec.batch_size!r} is not valid; valid: an integer >= 1")
    if spec.limit is not None and not _is_positive_int(spec.limit):
        raise UsageError(f"image limit {spec.limit!r} is not valid; valid: an integer >= 1 (or no limit)")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_device(device: str) -> None:
    """The device string parses and the device is present on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device {device!r}; valid: {', '.join(_devices_here())}") from None
    if dev.type not in DEVICE_TYPES:
        raise UsageError(f"device {device!r} is not supported; valid: {', '.join(_devices_here())}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"device {device!r}: no CUDA GPU is visible here; valid: {', '.join(_devices_here())}")
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"device {device!r}: only {count} CUDA GPU(s) visible; "
                             f"valid: {', '.join(_devices_here())}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {device!r}: MPS is not available here; valid: {', '.join(_devices_here())}")


def _devices_here() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def check_dtype_runs(device: str, dtype: str) -> None:
    """Reject a dtype the device cannot run, with the dtypes it can."""
    error = _dtype_error(device, dtype)
    if error is not None:
        runnable = [d for d in DTYPES if _dtype_error(device, d) is None]
        raise UsageError(f"dtype {dtype!r} cannot run on device {device!r} ({error}); "
                         f"valid there: {', '.join(runnable)}")


@lru_cache(maxsize=None)
def _dtype_error(device: str, dtype: str) -> str | None:
    """None if the ops of a ViT forward run on `device` in the precision context jobs use
    (`bench.models.autocast`), else why not.

    A probe rather than a table: which (device, dtype) pairs autocast supports changes between
    torch releases and GPU generations (fp16 autocast on CPU works in torch 2.14, for instance).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported():
        return "the GPU has no bfloat16 support"
    try:
        with torch.inference_mode(), models.autocast(device, dtype):
            images = torch.randn(2, 1, 8, 8, device=dev)
            tokens = torch.nn.functional.conv2d(images, torch.randn(8, 1, 4, 4, device=dev), stride=4)
            tokens = tokens.flatten(2).transpose(1, 2)  # (B, 4, 8)
            tokens = torch.nn.functional.layer_norm(tokens, (8,))
            qkv = torch.nn.functional.linear(tokens, torch.randn(24, 8, device=dev)).view(2, 4, 3, 1, 8)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            scores = (q @ k.transpose(-2, -1)).softmax(-1)  # the explicit path token scoring uses
            out = torch.nn.functional.gelu(attn + scores @ v).topk(2, dim=2).values
            out.float().sum().item()
    except Exception as exc:  # any failure means the device cannot run it: say what torch said
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'failed'}"
    return None


# ---------------------------------------------------------------------------------------------
# Files and folders

def check_output_dir(run_dir) -> None:
    """The run folder can be created and written: no path component longer than the file system
    allows, and a probe file in it or in its nearest existing parent, removed at once (a probe rather
    than os.access, which says yes to root everywhere)."""
    path = Path(run_dir).absolute()
    limit = _name_max(next(p for p in path.parents if _exists(p)))
    too_long = next((part for part in path.parts if len(os.fsencode(part)) > limit), None)
    if too_long is not None:  # before any stat of the path, which would fail with ENAMETOOLONG
        raise UsageError(f"output dir {str(run_dir)[:60]!r}...: the name {too_long[:40]!r}... has "
                         f"{len(os.fsencode(too_long))} bytes; valid: folder names of at most {limit} bytes")
    if path.exists() and not path.is_dir():
        raise UsageError(f"output dir {str(run_dir)!r} is a file; valid: a folder (existing or new) you can write")
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"output dir {str(run_dir)!r} cannot be created: {str(folder)!r} is a file; "
                         "valid: a folder (existing or new) you can write")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tokenbench-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"output dir {str(run_dir)!r} is not writable ({exc.strerror} in {str(folder)!r}); "
                         "valid: a folder (existing or new) you can write") from None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _wrap(check, *args) -> None:
    """Run a check of another module and re-raise its user error as UsageError, message unchanged."""
    try:
        check(*args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _unique(items: Iterable) -> list:
    return list(dict.fromkeys(items))


def _unique_by(specs: Iterable[JobSpec], key) -> list[JobSpec]:
    seen: dict = {}
    for spec in specs:
        seen.setdefault(key(spec), spec)
    return list(seen.values())

