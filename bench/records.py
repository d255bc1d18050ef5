"""Records: one JSON file per finished job, written atomically, safe under concurrent writers.

Layout of a run folder:
    results/<run>/records/<key>.json         a finished job: spec, metrics, environment
    results/<run>/records/<key>.error.json   a failed job: spec, error message, traceback
    results/<run>/records/<key>.preds.npz    per-image predictions of an accuracy job (labels, top-5 ids)
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spec import JobSpec

SCHEMA = 1
RECORDS_DIR = "records"


def records_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / RECORDS_DIR


def record_path(run_dir, key: str) -> Path:
    return records_dir(run_dir) / f"{key}.json"


def error_path(run_dir, key: str) -> Path:
    return records_dir(run_dir) / f"{key}.error.json"


def preds_path(run_dir, key: str) -> Path:
    return records_dir(run_dir) / f"{key}.preds.npz"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same folder, flush, fsync, rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU model ("AMD EPYC ...") where Linux says it; platform.processor() only gives the ISA."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu", dtype: str | None = None) -> dict:
    """Versions and machine facts every record carries."""
    import timm
    import torch

    env = dict(
        torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
        host=socket.gethostname(), platform=platform.platform(), threads=torch.get_num_threads(),
        device=device, dtype=dtype, git_commit=_git_commit(),
        slurm_job_id=os.environ.get("SLURM_JOB_ID"), slurm_array_task_id=os.environ.get("SLURM_ARRAY_TASK_ID"),
    )
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = cpu_name()
    try:
        from timm.layers import use_fused_attn

        env["fused_attn"] = bool(use_fused_attn())
    except ImportError:
        pass
    return env


def write_record(run_dir, spec: JobSpec, metrics: dict, env: dict, started: float) -> Path:
    """Write the record of a finished job and remove any earlier error record of it."""
    path = record_path(run_dir, spec.key)
    atomic_write_json(path, dict(
        schema=SCHEMA, key=spec.key, status="ok", spec=spec.to_dict(), metrics=metrics, env=env,
        started=started, finished=time.time(), wall_s=time.time() - started,
    ))
    try:
        error_path(run_dir, spec.key).unlink()
    except FileNotFoundError:
        pass
    return path


def write_error(run_dir, spec: JobSpec, exc: BaseException, tb: str, env: dict | None, started: float) -> Path:
    path = error_path(run_dir, spec.key)
    atomic_write_json(path, dict(
        schema=SCHEMA, key=spec.key, status="error", spec=spec.to_dict(),
        error=f"{type(exc).__name__}: {exc}", traceback=tb, env=env,
        started=started, finished=time.time(),
    ))
    return path


class RecordError(ValueError):
    """A record file that does not validate (truncated, foreign, wrong schema)."""


@dataclass(frozen=True)
class Record:
    key: str
    status: str  # "ok" | "error"
    spec: JobSpec
    data: dict  # the whole JSON document
    path: Path

    @property
    def metrics(self) -> dict:
        return self.data.get("metrics", {})


def read_record(path: Path) -> Record:
    """Load and validate one record; raises RecordError with the reason."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise RecordError(f"{path}: not a schema-{SCHEMA} record")
    try:
        spec = JobSpec.from_dict(data["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"{path}: bad spec ({exc})") from None
    status = data.get("status")
    if status not in ("ok", "error") or data.get("key") != spec.key:
        raise RecordError(f"{path}: key or status does not match its spec")
    if status == "ok" and not isinstance(data.get("metrics"), dict):
        raise RecordError(f"{path}: finished record without metrics")
    return Record(spec.key, status, spec, data, Path(path))


def scan(run_dir) -> tuple[dict[str, Record], dict[str, Record], list[str]]:
    """All records of a run: (finished by key, failed by key, problems). Invalid files are reported, not fatal.

    A key with both a finished and an error record counts as finished.
    """
    done: dict[str, Record] = {}
    failed: dict[str, Record] = {}
    problems: list[str] = []
    folder = records_dir(run_dir)
    if not folder.is_dir():
        return done, failed, problems
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):
            continue  # a temp file of a writer in progress
        try:
            rec = read_record(path)
        except RecordError as exc:
            problems.append(str(exc))
            continue
        (done if rec.status == "ok" else failed)[rec.key] = rec
    for key in set(done) & set(failed):
        failed.pop(key)
    return done, failed, problems
