"""Against a real SLURM (start one with `sudo scripts/slurm_up.sh`): a grid as one job array, a failed
job recorded and retried with --retry-failed, a cancelled job reported as such. Skipped without a cluster."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time

import pytest

from bench import launch, records
from bench.spec import JobSpec, save_grid

EMBEDDED = "tokenbench_vit_fmnist"


def _cluster_problem() -> str | None:
    if not shutil.which("sbatch"):
        return "sbatch is not on PATH (start a local cluster with scripts/slurm_up.sh)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the SLURM cluster does not answer ({exc})"
    if not any(state.startswith(("idle", "mixed", "alloc")) for state in states.split()):
        return f"the SLURM cluster has no usable node (sinfo: {states.strip() or 'nothing'})"
    return None


def _accounting() -> bool:
    try:
        return subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


PROBLEM = _cluster_problem()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))]


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    monkeypatch.setattr(launch, "POLL_S", 0.5)
    monkeypatch.setattr(launch, "SLURM_REFRESH_S", 1.0)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--retry-failed", action="store_true")
    launch.add_arguments(parser)
    return parser.parse_args(["--time", "10", *argv])


def index(run_dir) -> dict:
    return json.loads((run_dir / "launch" / "jobs.json").read_text())


def test_grid_runs_as_one_job_array(tmp_path):
    grid = [JobSpec("flops", EMBEDDED), JobSpec("flops", EMBEDDED, method="idle", keep_ratio=0.5),
            JobSpec("flops", EMBEDDED, method="idle", keep_ratio=0.7)]
    save_grid(tmp_path, grid)
    started = time.perf_counter()
    summary = launch.dispatch(grid, tmp_path, parse("--launcher", "slurm"))
    print(f"\n{len(grid)}-job grid through SLURM: {time.perf_counter() - started:.1f} s")
    assert sorted(summary.done) == sorted(s.key for s in grid), summary.errors
    array_ids = {entry["job_id"].split("_")[0] for entry in index(tmp_path).values()}
    assert len(array_ids) == 1 and all("_" in entry["job_id"] for entry in index(tmp_path).values())
    done, _, _ = records.scan(tmp_path)
    # The records say where they were measured: tasks of that array, not this process.
    assert {rec.data["env"]["slurm_job_id"] is not None for rec in done.values()} == {True}
    assert sorted(rec.data["env"]["slurm_array_task_id"] for rec in done.values()) == ["0", "1", "2"]
    report = pytest.importorskip("bench.report")
    report.write_report(tmp_path, figures=False, pictures=False)
    assert (tmp_path / "report.md").exists()


def test_failed_job_is_recorded_and_retried(tmp_path):
    weights = tmp_path / "weights.safetensors"  # missing at first: the job fails
    job = JobSpec("acc", EMBEDDED, checkpoint=str(weights), limit=8, batch_size=4)
    save_grid(tmp_path, [job])
    summary = launch.dispatch([job], tmp_path, parse("--launcher", "slurm"))
    assert summary.failed == [job.key] and "weights.safetensors" in summary.errors[job.key]
    assert records.error_path(tmp_path, job.key).exists()
    first_id = index(tmp_path)[job.key]["job_id"]

    import timm
    from safetensors.torch import save_file

    from bench import models  # noqa: F401  (registers the embedded model)

    save_file(timm.create_model(EMBEDDED).state_dict(), str(weights))
    summary = launch.collect(tmp_path, parse("--retry-failed"))  # back to SLURM: the launcher the run used
    assert summary.done == [job.key] and not summary.failed, summary.errors
    assert index(tmp_path)[job.key]["job_id"] != first_id
    record = records.read_record(records.record_path(tmp_path, job.key))
    assert record.data["env"]["slurm_job_id"] == index(tmp_path)[job.key]["job_id"]
    assert not records.error_path(tmp_path, job.key).exists()


@pytest.mark.skipif(PROBLEM is None and not _accounting(), reason="job states need SLURM accounting (slurmdbd; SLURM_CI_ACCOUNTING=1)")
def test_cancelled_job_is_reported(tmp_path):
    job = JobSpec("flops", EMBEDDED, seed=7)
    save_grid(tmp_path, [job])
    summary = launch.dispatch([job], tmp_path, parse("--launcher", "slurm", "--no-wait"))
    assert summary.pending == [job.key]
    subprocess.run(["scancel", index(tmp_path)[job.key]["job_id"]], check=True)
    deadline = time.time() + 60
    while True:
        summary = launch.collect(tmp_path, parse())
        if summary.failed or time.time() > deadline:
            break
        time.sleep(1)
    assert summary.failed == [job.key] and "CANCELLED" in summary.errors[job.key]
    assert not records.record_path(tmp_path, job.key).exists()
