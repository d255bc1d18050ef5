"""Dispatch: options -> submitit parameters, array chunking, GPU slots, code snapshot, job dependencies,
locks, the local launcher end to end, and the checks that run before anything is written."""
from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import types
from pathlib import Path

import pytest
import submitit
from submitit.slurm.slurm import _make_sbatch_string

import run_all
from bench import dispatch, jobs, records
from bench.dispatch import local, slurm
from bench.dispatch.runner import run_job
from bench.dispatch.snapshot import code_snapshot
from bench.records import save_grid
from bench.request import DispatchOptions, LaunchError, parse_time_min
from bench.spec import JobSpec, Plan

EMBEDDED = "tokenbench_vit_fmnist"


def parse(*argv: str) -> DispatchOptions:
    """The dispatch options of a command line, as run_all builds them."""
    return run_all.parse(list(argv))[0].dispatch


def spec(kind="flops", device="cpu", ratio=1.0, **kw) -> JobSpec:
    return JobSpec(kind=kind, model=EMBEDDED, keep_ratio=ratio, device=device, **kw)


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("30:00", 30), ("30:01", 31), ("1:30:00", 90), ("2-0", 2880), ("1-2:30", 1590),
    ("1-00:00:30", 1441), (45, 45),
])
def test_time_limits_in_slurm_syntax(text, minutes):
    assert parse_time_min(text) == minutes


@pytest.mark.parametrize("text", ["", "0", "1h", "1:2:3:4", "-5", "1-"])
def test_bad_time_limit_names_the_value(text):
    with pytest.raises(LaunchError, match="--time"):
        parse_time_min(text)


def test_cli_to_slurm_parameters():
    args = parse("--partition", "gpu", "--account", "proj", "--qos", "high", "--time", "1:30:00",
                 "--cpus-per-task", "8", "--mem", "32G", "--constraint", "a100",
                 "--slurm-setup", "module load cuda; source venv/bin/activate", "--array-parallelism", "16")
    expected = dict(time=90, partition="gpu", account="proj", qos="high", constraint="a100", cpus_per_task=8,
                    mem="32G", setup=["module load cuda; source venv/bin/activate"], array_parallelism=16)
    assert slurm.slurm_parameters(args, gpu=False, timing=False) == expected
    assert slurm.slurm_parameters(args, gpu=True, timing=False) == dict(expected, gpus_per_node=1)
    assert slurm.slurm_parameters(args, gpu=True, timing=True)["exclusive"] is True  # the default
    assert "exclusive" not in slurm.slurm_parameters(parse("--no-throughput-exclusive"), gpu=True, timing=True)


def test_exclusive_flags():
    args = parse()
    assert slurm.slurm_parameters(args, gpu=False, timing=True)["exclusive"] is True
    assert "exclusive" not in slurm.slurm_parameters(args, gpu=False, timing=False)
    assert slurm.slurm_parameters(parse("--exclusive"), gpu=False, timing=False)["exclusive"] is True
    assert slurm.slurm_parameters(parse("--gpus-per-node", "2"), gpu=False, timing=False)["gpus_per_node"] == 2


def test_slurm_parameters_are_valid_sbatch_options(tmp_path):
    """submitit itself turns them into the sbatch lines a user would write by hand."""
    args = parse("--partition", "gpu", "--time", "2-00:00:00", "--mem", "32G", "--qos", "high",
                 "--slurm-setup", "module load cuda")
    params = slurm.slurm_parameters(args, gpu=True, timing=True)
    sbatch = _make_sbatch_string(command="python job.py", folder=tmp_path, **params)
    for line in ["#SBATCH --partition=gpu", "#SBATCH --time=2880", "#SBATCH --mem=32G", "#SBATCH --qos=high",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --exclusive", "module load cuda"]:
        assert line in sbatch.splitlines(), line


def test_grid_is_split_into_arrays_of_at_most_max_size():
    flops = [spec(ratio=i / 10000) for i in range(1, 2501)]
    timing = [spec("throughput", ratio=0.5, batch_size=b) for b in (1, 8, 64)]
    gpu = [spec(device="cuda", ratio=0.5)]
    arrays = slurm.array_plan(flops + timing + gpu, parse(), max_size=1000)
    assert [len(chunk) for _, chunk in arrays] == [1000, 1000, 500, 3, 1]
    assert [s for _, chunk in arrays for s in chunk] == flops + timing + gpu  # each job exactly once, in order
    assert [params.get("exclusive", False) for params, _ in arrays] == [False, False, False, True, False]
    assert [params.get("gpus_per_node") for params, _ in arrays] == [None, None, None, None, 1]


def test_max_array_size_from_scontrol():
    config = "MaxArraySize            = 1001\nMaxJobCount             = 10000\n"
    assert slurm.parse_max_array_size(config) == 1001
    assert slurm.parse_max_array_size("MaxJobCount = 5\n") is None
    assert slurm.max_array_size(override=7) == 7


def test_auto_launcher():
    no_sbatch, sbatch = (lambda name: None), (lambda name: "/usr/bin/" + name)
    assert dispatch.resolve_launcher("auto", which=sbatch, gpus=lambda: []) == "slurm"
    assert dispatch.resolve_launcher("auto", which=no_sbatch, gpus=lambda: [0, 1]) == "local"
    assert dispatch.resolve_launcher("auto", which=no_sbatch, gpus=lambda: []) == "inline"
    assert dispatch.resolve_launcher(None, which=sbatch, gpus=lambda: [0]) == "inline"
    assert dispatch.resolve_launcher("local", which=sbatch, gpus=lambda: []) == "local"
    with pytest.raises(LaunchError, match="valid: inline, local, slurm, auto"):
        dispatch.resolve_launcher("pbs")


def test_gpu_slots_follow_cuda_visible_devices():
    assert local.gpu_slots(None, 2) == [0, 1]
    assert local.gpu_slots("2,3", 2) == [2, 3]
    assert local.gpu_slots("", 0) == []
    with pytest.raises(LaunchError, match="CUDA_VISIBLE_DEVICES"):
        local.gpu_slots("GPU-5f1c", 1)


def test_slot_scheduler_one_job_per_gpu():
    scheduler = local.SlotScheduler([0, 1, 2])
    held = [scheduler.acquire(spec(device="cuda", ratio=r)) for r in (0.5, 0.6, 0.7)]
    assert sorted(h[0] for h in held) == [0, 1, 2] and all(len(h) == 1 for h in held)
    assert scheduler.acquire(spec(device="cuda", ratio=0.8)) is None
    scheduler.release(held[1])
    assert scheduler.acquire(spec("throughput", device="cuda")) == held[1]
    # A CPU timing shares the CPU with every other job: it waits for the whole machine.
    scheduler = local.SlotScheduler([0, 1])
    first = scheduler.acquire(spec())
    assert scheduler.acquire(spec("throughput")) is None
    scheduler.release(first)
    assert sorted(scheduler.acquire(spec("throughput"))) == [0, 1]


def test_cpu_machine_runs_one_job_at_a_time():
    scheduler = local.SlotScheduler([])
    held = scheduler.acquire(spec())
    assert held == [local.CPU] and scheduler.acquire(spec(ratio=0.5)) is None
    assert local.local_parameters(parse("--time", "3"), held) == dict(timeout_min=3, gpus_per_node=0,
                                                                        visible_gpus=())
    assert local.local_parameters(parse(), [2]) == dict(timeout_min=120, gpus_per_node=1, visible_gpus=(2,))


class FakeJob:
    """Ends after two polls without writing a record, like a job killed before run_job."""

    state = "FINISHED"

    def __init__(self, job_id: str, folder: Path, params: dict):
        self.job_id, self.params, self.polls = job_id, params, 0
        self.paths = types.SimpleNamespace(folder=folder)

    def done(self) -> bool:
        self.polls += 1
        return self.polls >= 2

    def stderr(self) -> str:
        return "boom"


class FakeExecutor:
    """Stands in for submitit.LocalExecutor and checks that no two running jobs share a GPU."""

    def __init__(self, folder: Path):
        self.folder, self.params, self.jobs = folder, {}, []

    def update_parameters(self, **params):
        self.params.update(params)

    def submit(self, fn, spec, run_dir, force, origin):
        busy = {gpu for job in self.jobs if job.polls < 2 for gpu in job.params["visible_gpus"]}
        assert not busy & set(self.params["visible_gpus"]), "two running jobs share a GPU"
        self.jobs.append(FakeJob(str(len(self.jobs)), self.folder, dict(self.params, spec=spec)))
        return self.jobs[-1]


def test_local_launcher_keeps_one_job_per_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "POLL_S", 0)
    executor = FakeExecutor(tmp_path)
    todo = [spec(device="cuda", ratio=r / 10) for r in range(1, 8)]
    lost = local.run_local(todo, tmp_path, parse("--time", "7"), gpus=[3, 5], origin={}, executor=executor)
    assert [job.params["spec"] for job in executor.jobs] == todo
    assert {job.params["visible_gpus"] for job in executor.jobs} == {(3,), (5,)}
    assert all(job.params["timeout_min"] == 7 and job.params["gpus_per_node"] == 1 for job in executor.jobs)
    # No job wrote a record: each is reported as lost, with its stderr tail.
    assert set(lost) == {s.key for s in todo} and all("without a record (boom)" in r for r in lost.values())
    assert set(json.loads((tmp_path / "launch" / "jobs.json").read_text())) == {s.key for s in todo}


def _git(repo: Path, *argv: str) -> None:
    subprocess.run(["git", "-C", str(repo), *argv], check=True, capture_output=True)


def test_snapshot_freezes_the_code_jobs_run(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text("big.bin\n")
    (repo / "big.bin").write_text("ignored")
    (repo / "snapprobe.py").write_text("def version():\n    return 'v1'\n")
    _git(repo, "add", ".gitignore")  # snapprobe.py stays untracked: new code must reach the jobs too
    monkeypatch.syspath_prepend(str(repo))
    probe = importlib.import_module("snapprobe")
    executor = submitit.LocalExecutor(folder=tmp_path / "logs" / "%j")
    executor.update_parameters(timeout_min=1)
    with code_snapshot(tmp_path / "code", root=repo) as snapshot:
        # The repo changes after the snapshot: the job must still run v1 (it cannot see `repo` at all).
        (repo / "snapprobe.py").write_text("def version():\n    return 'v2'\n")
        job = executor.submit(probe.version)
    assert Path.cwd() != snapshot
    assert job.result() == "v1"
    assert (snapshot / "snapprobe.py").exists() and not (snapshot / "big.bin").exists()


def plan_of(specs, run_dir) -> Plan:
    return Plan(run_dir, tuple(specs), tuple(specs), {"git_commit": "abc", "git_dirty": False})


def test_user_errors_before_anything_runs(tmp_path, monkeypatch):
    """Launch settings that cannot work are refused before grid.json or the code snapshot is written."""
    run_dir = tmp_path / "run"
    with pytest.raises(LaunchError, match="--no-wait"):
        dispatch.dispatch(plan_of([spec()], run_dir), parse("--launcher", "local", "--no-wait"))
    with pytest.raises(LaunchError, match="--no-wait"):
        dispatch.dispatch(plan_of([spec()], run_dir), parse("--no-wait"))  # inline cannot leave jobs behind
    with pytest.raises(LaunchError, match="--device cuda:1 .*valid: --device cuda"):
        dispatch.dispatch(plan_of([spec(device="cuda:1")], run_dir), parse("--launcher", "local"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "abc")
    with pytest.raises(LaunchError, match="CUDA_VISIBLE_DEVICES='abc'"):
        dispatch.dispatch(plan_of([spec()], run_dir), parse("--launcher", "local"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(LaunchError, match="sbatch and srun not on PATH"):
        dispatch.dispatch(plan_of([spec()], run_dir), parse("--launcher", "slurm"))
    assert not run_dir.exists()


def test_collect_reports_lost_jobs_and_retries(tmp_path, monkeypatch):
    """A job that never wrote a record is lost; --retry-failed runs it (inline: the run had no launcher)."""
    monkeypatch.setitem(jobs._KINDS, "flops", dataclasses.replace(jobs.get("flops"), run=lambda s, c: {"gmacs": 1.0}))
    finished, lost = spec(), spec(ratio=0.5, method="evit")
    save_grid(tmp_path, [finished, lost])
    assert run_job(finished, tmp_path) == "ok"
    summary = dispatch.collect(tmp_path, parse())
    assert summary.done == [finished.key] and summary.failed == [lost.key]
    assert summary.errors[lost.key] == "never submitted"
    summary = dispatch.collect(tmp_path, parse("--retry-failed"))
    assert summary.done == [finished.key, lost.key] and not summary.failed
    assert records.record_path(tmp_path, lost.key).exists()


def test_local_launcher_end_to_end(tmp_path):
    """Real submitit subprocesses on CPU: the jobs import the snapshot with this Python and write records,
    with the provenance of the checkout the run was planned from."""
    grid = [spec()]
    summary = dispatch.dispatch(plan_of(grid, tmp_path), parse("--launcher", "local", "--time", "5"))
    assert sorted(summary.done) == sorted(s.key for s in grid) and not summary.failed, summary.errors
    done, failed, _ = records.scan(tmp_path)
    assert set(done) == {s.key for s in grid} and done[grid[0].key].metrics["gmacs"] > 0
    assert done[grid[0].key].data["env"]["git_commit"] == "abc"  # from the plan, not the snapshot
    index = json.loads((tmp_path / "launch" / "jobs.json").read_text())
    assert {entry["launcher"] for entry in index.values()} == {"local"}
    out = Path(index[grid[0].key]["folder"])
    assert any(out.glob("*_result.pkl")) and "%j" not in str(out)
    assert not list((tmp_path / "launch").rglob("*%j*"))  # no folder literally named %j
    # Nothing to do the second time: finished jobs are not resubmitted.
    again = dispatch.dispatch(plan_of(grid, tmp_path), parse("--launcher", "local"))
    assert sorted(again.skipped) == sorted(s.key for s in grid) and not again.done


def fake_slurm_bin(tmp_path: Path, sbatch_body: str, squeue_out: str = "") -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("sbatch", sbatch_body), ("srun", "exit 0"), ("squeue", f"printf '{squeue_out}'")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_sbatch_refusing_the_jobs_is_a_launch_error(tmp_path, monkeypatch):
    """sbatch on PATH but no controller answering (a login node with a broken cluster, or --launcher
    auto on a machine with slurm-client installed): one LaunchError line, not submitit's traceback."""
    bin_dir = fake_slurm_bin(tmp_path, "echo 'sbatch: error: Batch job submission failed: Unable to contact slurm "
                                       "controller (connect failure)' >&2\nexit 1")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    run_dir = tmp_path / "run"
    with pytest.raises(LaunchError, match="Unable to contact slurm controller.*0 of 1 jobs"):
        slurm.submit([spec()], run_dir, parse("--launcher", "slurm", "--max-array-size", "10"), origin={})


def test_jobs_still_queued_are_not_submitted_again(tmp_path, monkeypatch):
    """A driver stopped with Ctrl-C leaves its array queued; the rerun the message advises must find it
    (jobs.json + squeue) and submit only what is not queued, never a duplicate."""
    run_dir = tmp_path / "run"
    queued, fresh = spec(), spec(ratio=0.5, method="evit")
    (run_dir / "launch").mkdir(parents=True)
    (run_dir / "launch" / "jobs.json").write_text(json.dumps(
        {queued.key: dict(launcher="slurm", job_id="41_0", folder=str(run_dir / "launch" / "slurm" / "41_0"))}))
    log = tmp_path / "sbatch.log"
    bin_dir = fake_slurm_bin(tmp_path, f'echo "$@" >> {log}\necho "Submitted batch job 42"',
                             squeue_out="41_0|PENDING\\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    submitted = slurm.submit([queued, fresh], run_dir, parse("--launcher", "slurm", "--max-array-size", "10"), {})
    assert [(s.key, job.job_id) for s, job in submitted] == [(queued.key, "41_0"), (fresh.key, "42")]
    assert len(log.read_text().splitlines()) == 1  # one sbatch call: the fresh job only
    index = json.loads((run_dir / "launch" / "jobs.json").read_text())
    assert index[queued.key]["job_id"] == "41_0" and index[fresh.key]["job_id"] == "42"


def test_interrupting_a_slurm_wait_points_to_collect(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(slurm, "check_available", lambda: None)
    monkeypatch.setattr(slurm, "submit", lambda todo, run_dir, options, origin: [])

    def interrupted(submitted, run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(slurm, "wait", interrupted)
    with pytest.raises(dispatch.Interrupted, match=f"--collect {run_dir.resolve()}"):
        dispatch.dispatch(plan_of([spec()], run_dir), parse("--launcher", "slurm"))


def test_finetune_jobs_get_one_process_per_gpu():
    """--finetune-gpus N: a finetune job is N tasks with N GPUs on SLURM and locally (submitit's distributed
    environment then gives every task its RANK for DDP); other jobs keep one GPU."""
    options = parse("--finetune-gpus", "2", "--partition", "gpu")
    tuned = spec("finetune", device="cuda", method="evit", ratio=0.7, finetune=(("epochs", 1.0),))
    measured = spec("acc", device="cuda", method="evit", ratio=0.7)
    arrays = slurm.array_plan([tuned, measured], options, max_size=10)
    by_kind = {chunk[0].kind: params for params, chunk in arrays}
    assert by_kind["finetune"]["tasks_per_node"] == 2 and by_kind["finetune"]["gpus_per_node"] == 2
    assert "tasks_per_node" not in by_kind["acc"] and by_kind["acc"]["gpus_per_node"] == 1
    scheduler = local.SlotScheduler([0, 1, 2], processes=2)
    held = scheduler.acquire(tuned)
    assert len(held) == 2 and local.local_parameters(options, held, data_parallel=True) == dict(
        timeout_min=120, gpus_per_node=2, visible_gpus=tuple(held), tasks_per_node=2)
    assert scheduler.acquire(tuned) is None and len(scheduler.acquire(measured)) == 1
    with pytest.raises(LaunchError, match="--finetune-gpus 4: only 3 GPU"):
        local.SlotScheduler([0, 1, 2], processes=4).acquire(tuned)
