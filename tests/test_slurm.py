"""Against a real SLURM (start one with `sudo scripts/slurm_up.sh`): a grid as one job array, a failed
job recorded and retried with --retry-failed, a cancelled job reported as such. Skipped without a cluster."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run_all
from bench import dispatch, records
from bench.dispatch import slurm
from bench.spec import JobSpec, Plan

REPO = Path(__file__).resolve().parents[1]

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
# One xdist worker runs them all, one after another: the localhost cluster has one node, and the timing
# test needs it to itself.
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm"),
              pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))]


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    monkeypatch.setattr(slurm, "POLL_S", 0.5)
    monkeypatch.setattr(slurm, "SLURM_REFRESH_S", 1.0)


def parse(*argv: str):
    return run_all.parse(["--time", "10", *argv])[0].dispatch


def plan_of(specs, run_dir) -> Plan:
    return Plan(run_dir, tuple(specs), tuple(specs), {"git_commit": "abc", "git_dirty": True})


def index(run_dir) -> dict:
    return json.loads((run_dir / "launch" / "jobs.json").read_text())


def test_grid_runs_as_one_job_array(tmp_path):
    grid = [JobSpec("flops", EMBEDDED), JobSpec("flops", EMBEDDED, method="idle", keep_ratio=0.5),
            JobSpec("flops", EMBEDDED, method="idle", keep_ratio=0.7)]
    started = time.perf_counter()
    summary = dispatch.dispatch(plan_of(grid, tmp_path), parse("--launcher", "slurm"))
    print(f"\n{len(grid)}-job grid through SLURM: {time.perf_counter() - started:.1f} s")
    assert sorted(summary.done) == sorted(s.key for s in grid), summary.errors
    array_ids = {entry["job_id"].split("_")[0] for entry in index(tmp_path).values()}
    assert len(array_ids) == 1 and all("_" in entry["job_id"] for entry in index(tmp_path).values())
    done, _, _ = records.scan(tmp_path)
    # The records say where they were measured: tasks of that array, not this process.
    assert {rec.data["env"]["slurm_job_id"] is not None for rec in done.values()} == {True}
    assert sorted(rec.data["env"]["slurm_array_task_id"] for rec in done.values()) == ["0", "1", "2"]
    assert {rec.data["env"]["git_commit"] for rec in done.values()} == {"abc"}  # the planning checkout's
    from bench import report

    report.write_report(tmp_path, figures=False, pictures=False)
    assert (tmp_path / "report.md").exists()


def test_failed_job_is_recorded_and_retried(tmp_path):
    weights = tmp_path / "weights.safetensors"  # missing at first: the job fails
    job = JobSpec("acc", EMBEDDED, checkpoint=str(weights), limit=8, batch_size=4)
    summary = dispatch.dispatch(plan_of([job], tmp_path), parse("--launcher", "slurm"))
    assert summary.failed == [job.key] and "weights.safetensors" in summary.errors[job.key]
    assert records.error_path(tmp_path, job.key).exists()
    first_id = index(tmp_path)[job.key]["job_id"]

    import timm
    from safetensors.torch import save_file

    from bench import models  # noqa: F401  (registers the embedded model with timm)

    save_file(timm.create_model(EMBEDDED).state_dict(), str(weights))
    summary = dispatch.collect(tmp_path, parse("--retry-failed"))  # back to SLURM: the launcher the run used
    assert summary.done == [job.key] and not summary.failed, summary.errors
    assert index(tmp_path)[job.key]["job_id"] != first_id
    record = records.read_record(records.record_path(tmp_path, job.key))
    assert record.data["env"]["slurm_job_id"] == index(tmp_path)[job.key]["job_id"]
    assert not records.error_path(tmp_path, job.key).exists()


@pytest.mark.skipif(PROBLEM is None and not _accounting(), reason="job states need SLURM accounting (slurmdbd; SLURM_CI_ACCOUNTING=1)")
def test_cancelled_job_is_reported(tmp_path):
    job = JobSpec("flops", EMBEDDED, method="evit", keep_ratio=0.3)
    summary = dispatch.dispatch(plan_of([job], tmp_path), parse("--launcher", "slurm", "--no-wait"))
    assert summary.pending == [job.key]
    subprocess.run(["scancel", index(tmp_path)[job.key]["job_id"]], check=True)
    deadline = time.time() + 60
    while True:
        summary = dispatch.collect(tmp_path, parse())
        if summary.failed or time.time() > deadline:
            break
        time.sleep(1)
    assert summary.failed == [job.key] and "CANCELLED" in summary.errors[job.key]
    assert not records.record_path(tmp_path, job.key).exists()


def test_ctrl_c_then_the_advised_rerun_submits_no_duplicate(tmp_path):
    """Ctrl-C while the driver waits on SLURM: the jobs stay queued, the message points to --collect, and
    running the same command again finds them in the queue instead of submitting them a second time."""
    out = tmp_path / "run"
    argv = [sys.executable, "run_all.py", "--launcher", "slurm", "--methods", "evit", "--ratios", "0.5",
            "--metrics", "flops", "--out", str(out), "--time", "10",
            "--slurm-setup", "sleep 20"]  # each job waits a while: the driver is interrupted meanwhile
    # default SIGINT in the child even when this test runs in a background job that ignores it
    driver = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "launch" / "jobs.json").exists() or len(index(out)) < 2:
        assert driver.poll() is None and time.time() < deadline, driver.communicate()
        time.sleep(0.2)
    first = index(out)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 130 and "--collect" in err and "Traceback" not in err, err
    queue = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert {entry["job_id"] for entry in first.values()} <= set(queue)  # still queued or running

    rerun = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert index(out) == first  # the same jobs, none submitted again
    done, failed, _ = records.scan(out)
    assert set(done) == set(first) and not failed


def test_finetune_then_accuracy_as_afterok_jobs(tmp_path):
    """The accuracy job of a finetuned configuration goes in with --dependency=afterok on its finetune job:
    SLURM starts it only after that one succeeded, and it evaluates the finetuned weights."""
    out = tmp_path / "run"
    argv = ["--launcher", "slurm", "--time", "10", "--methods", "evit", "--ratios", "0.7", "--metrics", "acc",
            "--limit", "32", "--finetune-epochs", "0.05", "--finetune-opt", "train_limit=96",
            "--finetune-opt", "batch_size=16", "--out", str(out)]
    assert run_all.main(argv) == 0
    done, failed, _ = records.scan(out)
    assert not failed
    by_kind = {(r.spec.kind, r.spec.method): r for r in done.values()}
    tuned, evaluated = by_kind[("finetune", "evit")], by_kind[("acc", "evit")]
    jobs = index(out)
    script = next(Path(jobs[evaluated.key]["folder"]).glob("*_submission.sh")).read_text()
    assert f"--dependency=afterok:{jobs[tuned.key]['job_id']}" in script
    assert "--kill-on-invalid-dep=yes" in script
    assert tuned.data["finished"] <= evaluated.data["started"] and evaluated.metrics["weights"] == "finetuned"


def test_a_failed_finetune_cancels_its_accuracy_job_and_blocks_it(tmp_path):
    """The weights vanish between planning and the finetune job: it fails in SLURM, SLURM cancels the
    afterok accuracy job (--kill-on-invalid-dep), and the run reports that job blocked by its dependency."""
    import timm
    from safetensors.torch import save_file

    from bench import grid, models  # noqa: F401  (models registers the embedded model with timm)

    weights = tmp_path / "weights.safetensors"
    save_file(timm.create_model(EMBEDDED).state_dict(), str(weights))
    out = tmp_path / "run"
    argv = ["--launcher", "slurm", "--time", "10", "--methods", "evit", "--ratios", "0.7", "--metrics", "acc",
            "--limit", "32", "--checkpoint", str(weights), "--finetune-epochs", "0.05",
            "--finetune-opt", "train_limit=96", "--out", str(out)]
    request, _ = run_all.parse(argv)
    plan = grid.plan(request)
    weights.unlink()
    summary = dispatch.dispatch(plan, request.dispatch)
    tuned = next(s for s in plan.jobs if s.kind == "finetune")
    assert tuned.key in summary.failed and "weights.safetensors" in summary.errors[tuned.key]
    blocked = [key for key in summary.blocked if key.startswith("acc-evit")]
    assert len(blocked) == 1 and tuned.key in summary.blocked[blocked[0]]
    queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert index(out)[blocked[0]]["job_id"] not in queue  # cancelled, not left pending forever


@pytest.mark.parametrize("flags, exclusive", [((), True), (("--no-throughput-exclusive",), False)])
def test_timing_job_gets_its_node_and_as_many_threads_as_cpus(tmp_path, flags, exclusive):
    """Item 2 of the hostile run: a timing job on SLURM sizes torch's thread pool to the CPUs SLURM gave
    it (not to every core of the node) and, unless told otherwise, has the node to itself."""
    knobs = (("iters", 1), ("max_repeats", 5), ("repeats", 5), ("warmup", 0))
    job = JobSpec("throughput", EMBEDDED, method="evit", keep_ratio=0.5, batch_size=1, extra=knobs)
    summary = dispatch.dispatch(plan_of([job], tmp_path), parse("--launcher", "slurm", "--cpus-per-task", "1", *flags))
    assert summary.done == [job.key], summary.errors
    record = records.read_record(records.record_path(tmp_path, job.key))
    assert record.metrics["threads"] == 1 and record.data["env"]["slurm_job_id"] is not None
    scripts = list((tmp_path / "launch" / "slurm").rglob("*submission.sh"))
    assert scripts and all(("#SBATCH --exclusive" in s.read_text().splitlines()) is exclusive for s in scripts)
