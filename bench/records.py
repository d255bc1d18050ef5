"""The run folder on disk: the grid, one JSON record per job, written atomically, safe under
concurrent writers, readable by colleagues (files follow the umask, as every other tool's do).

Layout of a run folder:
    results/<run>/grid.json                  every job the run asked for, and where its code came from
    results/<run>/records/<key>.json         a finished job: spec, metrics, environment
    results/<run>/records/<key>.error.json   a failed job: spec, error message, traceback
    results/<run>/records/<key>.preds.npz    per-image predictions of an accuracy job (labels, top-5 ids)
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .spec import JobSpec

SCHEMA = 2  # 1: before job kinds (a "metric" field and no provenance); not readable, say so
RECORDS_DIR = "records"
GRID_FILE = "grid.json"


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
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a shared run folder must be readable
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


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


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
    if not isinstance(data, dict) or "schema" not in data:
        raise RecordError(f"{path}: not a tokenbench record")
    if data["schema"] != SCHEMA:
        raise RecordError(f"{path}: record version {data['schema']} (this tokenbench reads version {SCHEMA}); "
                          "rerun the job, or report it with the tokenbench that wrote it")
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


# ---------------------------------------------------------------------------------------------
# The grid: every job a run folder was asked for, so that --collect and reports know what is missing.

class GridError(ValueError):
    """A run folder without a usable grid.json."""


def save_grid(run_dir, specs: Sequence[JobSpec], provenance: dict | None = None) -> Path:
    path = Path(run_dir) / GRID_FILE
    atomic_write_json(path, dict(schema=SCHEMA, provenance=provenance or {}, specs=[s.to_dict() for s in specs]))
    return path


def load_grid(run_dir) -> list[JobSpec]:
    return _read_grid(run_dir)[0]


def grid_provenance(run_dir) -> dict:
    return _read_grid(run_dir)[1]


def _read_grid(run_dir) -> tuple[list[JobSpec], dict]:
    path = Path(run_dir) / GRID_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GridError(f"{run_dir} has no {GRID_FILE}; valid: a run folder written by run_all.py") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GridError(f"{path} is unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        version = data.get("schema") if isinstance(data, dict) else None
        raise GridError(f"{path} is a version-{version} grid (this tokenbench reads version {SCHEMA}); "
                        "valid: a run folder written by this version of run_all.py")
    try:
        return [JobSpec.from_dict(d) for d in data["specs"]], dict(data.get("provenance") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise GridError(f"{path}: bad job spec ({exc})") from None
