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
from functools import lru_cache
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


class StorageError(OSError):
    """A file of the run folder cannot be written (disk full, read-only file system): its message is one
    line naming the path and the errno. Finished records stay as they are."""


def storage_error(exc: OSError, path, advice: str = "") -> StorageError:
    """`exc` as a StorageError whose message names `path` (the kernel names no file for a failed write)."""
    text = exc.strerror if isinstance(exc, StorageError) else \
        f"cannot write {path}: {exc.strerror or exc} (errno {exc.errno})"
    return StorageError(exc.errno, text + (f"; {advice}" if advice else ""))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same folder, write, fsync, rename: readers see the old file or the new one. A
    failure (disk full, read-only) removes the temp file and raises StorageError naming `path`."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a shared run folder must be readable
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass  # already renamed, or the file system refuses even that: nothing more to do
        if isinstance(exc, OSError):
            raise storage_error(exc, path) from None
        raise


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may take fewer bytes than it was given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
    if status == "ok" and data["metrics"].get("preds_file") is not None:
        _check_predictions(Path(path), data["metrics"])
    return Record(spec.key, status, spec, data, Path(path))


def _check_predictions(path: Path, metrics: dict) -> None:
    """A finished accuracy record stands only with its per-image predictions, which every paired
    statistic reads: a record whose predictions file is missing or damaged is not finished."""
    name = str(metrics["preds_file"])
    if Path(name).name != name:
        raise RecordError(f"{path}: predictions file {name!r} is not a file name beside the record")
    preds = path.with_name(name)
    try:
        stat = preds.stat()
    except OSError:
        raise RecordError(f"{path}: its predictions file {name} is missing") from None
    problem = _predictions_problem(str(preds), stat.st_ino, stat.st_mtime_ns, stat.st_size, metrics.get("n_images"))
    if problem is not None:
        raise RecordError(f"{path}: its predictions file {name} {problem}")


@lru_cache(maxsize=4096)  # keyed by the file's identity and version: each version is read once
def _predictions_problem(preds: str, inode: int, mtime_ns: int, size: int, n_images) -> str | None:
    import numpy as np

    try:
        with np.load(preds, allow_pickle=False) as npz:
            labels, top5 = npz["labels"], npz["top5"]
    except Exception as exc:  # numpy, zipfile and zlib raise many types for a damaged file
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"cannot be read ({type(exc).__name__}{': ' + detail[:120] if detail else ''})"
    if labels.ndim != 1 or top5.ndim != 2 or top5.shape[0] != labels.shape[0]:
        return f"has labels {labels.shape} and top5 {top5.shape}, not the predictions of one set of images"
    if n_images is not None and labels.shape[0] != n_images:
        return f"holds {labels.shape[0]} images, the record {n_images}"
    return None


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
