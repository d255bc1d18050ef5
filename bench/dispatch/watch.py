"""Following submitted jobs: the run's job index (launch/jobs.json) and a progress bar over them."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from .. import records
from ..spec import JobSpec

LAUNCH_DIR, INDEX_FILE = "launch", "jobs.json"  # <run>/launch/jobs.json: key -> submitted job


def load_index(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / LAUNCH_DIR / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return {}


def save_index(run_dir: Path, launcher: str, submitted: Sequence[tuple[JobSpec, object]]) -> None:
    """Add (spec, submitit job) pairs to the index; earlier entries of other keys stay."""
    index = load_index(run_dir)
    for spec, job in submitted:
        index[spec.key] = dict(launcher=launcher, job_id=job.job_id, folder=str(job.paths.folder), at=time.time())
    records.atomic_write_json(Path(run_dir) / LAUNCH_DIR / INDEX_FILE, index)


def lost_reason(job, state: str) -> str:
    tail = (job.stderr() or "").strip().splitlines()[-1:]
    return f"job {job.job_id} ended {state} without a record" + (f" ({tail[0].strip()})" if tail else "")


class Progress:
    """A tqdm bar over jobs with done / running / pending / failed counts. Remembers the jobs that ended
    without any record (killed, cancelled, timed out, or broken before run_job) in `lost`."""

    def __init__(self, total: int, run_dir: Path):
        self.run_dir, self.done, self.failed, self.lost = run_dir, 0, 0, {}
        self.bar = tqdm(total=total, desc="jobs", unit="job", dynamic_ncols=True)

    def finished(self, spec: JobSpec, job, state: str) -> None:
        if records.record_path(self.run_dir, spec.key).exists():
            self.done += 1
        else:
            self.failed += 1
            if not records.error_path(self.run_dir, spec.key).exists():
                self.lost[spec.key] = lost_reason(job, state)
        self.bar.update(1)

    def show(self, running: int, pending: int) -> None:
        self.bar.set_postfix(dict(done=self.done, running=running, pending=pending, failed=self.failed))

    def close(self) -> None:
        self.bar.close()
