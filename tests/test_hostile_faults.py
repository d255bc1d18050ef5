"""The hostile suite, part 2: faults during a run, damaged run folders, the report CLI, and real processes.
Every case checks: no traceback on stderr and the exit code (2 user error, 1 failed job or unwritable disk,
130 interrupt, 0 otherwise); pre-flight errors write nothing.

Measurements are the cheap analytic stand-in of test_faults.py: the harness is under test, not the FLOPs.
"""
from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

import run_all
from bench import records
from bench.report.__main__ import main as report_main
from tests.test_bad_input import tree
from tests.test_faults import FLOPS_GRID, GRID_SIZE, cheap_flops, grid_keys, record_files, stub_run
from tests.test_hostile_storage import DiskFault, is_record, is_report_file, temp_files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def flops_with(monkeypatch):
    """Make the flops job raise `exc` at its `at`-th measurement (1-based) and measure cheaply otherwise."""
    def install(exc: BaseException | None = None, at: int = 3):
        count = []

        def run(spec, context):
            count.append(spec.key)
            if exc is not None and len(count) == at:
                raise exc
            return cheap_flops(spec, context)

        stub_run(monkeypatch, "flops", run)
    install()
    return install


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    rc = run_all.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "During handling" not in err, err
    return rc, out, err


def finished(run_dir: Path) -> set[str]:
    return set(records.scan(run_dir)[0])


# ---------------------------------------------------------------------------------------------
# A job that raises: a failure is its error record, rc 1; Ctrl-C stops the run, rc 130

JOB_ERRORS = {
    "runtime": RuntimeError("injected"), "value": ValueError("bad value"), "memory": MemoryError(),
    "cuda-oom": RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "zero": ZeroDivisionError("x/0"),
    "assert": AssertionError("shape mismatch"), "recursion": RecursionError("deep"), "key": KeyError("blocks"),
    "type": TypeError("NoneType"), "not-implemented": NotImplementedError("fp8"), "import": ImportError("no fvcore"),
    "os-enoent": FileNotFoundError(errno.ENOENT, "No such file", "/data/x"), "multi-line": RuntimeError("one\ntwo\nthree"),
    "unicode": UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "empty": RuntimeError(),
}


@pytest.mark.parametrize("name", JOB_ERRORS)
def test_a_failing_job_costs_only_itself(tmp_path, capsys, flops_with, name):
    flops_with(JOB_ERRORS[name], at=3)
    run_dir = tmp_path / "run"
    rc, out, err = run_main(capsys, *FLOPS_GRID, "--out", str(run_dir))
    assert rc == 1 and f"{GRID_SIZE - 1} done" in out and "1 failed" in out
    done, failed, problems = records.scan(run_dir)
    assert len(done) == GRID_SIZE - 1 and len(failed) == 1 and not problems
    assert type(JOB_ERRORS[name]).__name__ in next(iter(failed.values())).data["error"]


@pytest.mark.parametrize("at", [1, 3, GRID_SIZE])
def test_ctrl_c_in_a_job_keeps_what_finished(tmp_path, capsys, flops_with, at):
    flops_with(KeyboardInterrupt(), at=at)
    run_dir = tmp_path / "run"
    rc, _, err = run_main(capsys, *FLOPS_GRID, "--out", str(run_dir))
    assert rc == 130 and [line for line in err.splitlines() if "interrupted" in line]
    assert len(finished(run_dir)) == at - 1 and temp_files(run_dir) == []
    flops_with(None)
    assert run_main(capsys, *FLOPS_GRID, "--out", str(run_dir))[0] == 0  # the same command continues
    assert finished(run_dir) == grid_keys(run_dir)


def test_ctrl_c_while_the_report_is_written(tmp_path, capsys, monkeypatch, flops_with):
    from bench import report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", interrupted)
    run_dir = tmp_path / "run"
    rc, _, err = run_main(capsys, *FLOPS_GRID, "--out", str(run_dir))
    assert rc == 130 and "python -m bench.report" in err, err
    assert finished(run_dir) == grid_keys(run_dir)


# ---------------------------------------------------------------------------------------------
# The disk fails: one line with the path and the errno, rc 1, finished records kept, no temp file

DISK_ERRNOS = ("ENOSPC", "EROFS", "EDQUOT", "EIO", "EACCES")


@pytest.mark.parametrize("name", DISK_ERRNOS)
@pytest.mark.parametrize("call, at", [("replace", 1), ("write", 4)])
def test_disk_fault_at_a_record(tmp_path, capsys, monkeypatch, flops_with, name, call, at):
    run_dir, code = tmp_path / "run", getattr(errno, name)
    with monkeypatch.context() as patch:
        DiskFault(patch, run_dir, code, call, at=at, match=is_record)
        rc, _, err = run_main(capsys, *FLOPS_GRID, "--out", str(run_dir))
    assert rc == 1 and f"errno {code}" in err and str(run_dir) in err, err
    assert len(finished(run_dir)) == at - 1 and temp_files(run_dir) == []


@pytest.mark.parametrize("name", DISK_ERRNOS)
@pytest.mark.parametrize("target", ["grid", "report"])
def test_disk_fault_at_grid_json_or_the_report(tmp_path, capsys, monkeypatch, flops_with, name, target):
    run_dir, code = tmp_path / "run", getattr(errno, name)
    call, match = ("write", lambda p: p.name == "grid.json") if target == "grid" else ("open", is_report_file)
    with monkeypatch.context() as patch:
        DiskFault(patch, run_dir, code, call, match=match)
        rc, _, err = run_main(capsys, *FLOPS_GRID, "--out", str(run_dir))
    assert rc == 1 and f"errno {code}" in err, err
    assert len(finished(run_dir)) == (0 if target == "grid" else GRID_SIZE) and temp_files(run_dir) == []


# ---------------------------------------------------------------------------------------------
# A damaged run folder, then the same command: damage is named, recomputed, never fatal

def _damage(run_dir: Path, how: str) -> None:
    folder = records.records_dir(run_dir)
    first = sorted(folder.glob("*.json"))[0]
    damages = {
        "truncated": lambda: first.write_bytes(first.read_bytes()[:40]),
        "empty": lambda: first.write_bytes(b""),
        "binary": lambda: first.write_bytes(bytes(range(256))),
        "schema-99": lambda: first.write_text(json.dumps(dict(json.loads(first.read_text()), schema=99))),
        "list": lambda: first.write_text("[1, 2]"),
        "no-metrics": lambda: first.write_text(json.dumps(dict(json.loads(first.read_text()), metrics=None))),
        "foreign-key": lambda: first.write_text(json.dumps(dict(json.loads(first.read_text()), key="flops-x-1-0"))),
        "bad-spec": lambda: first.write_text(json.dumps(dict(json.loads(first.read_text()), spec={"kind": 3}))),
        "stale-tmp": lambda: (folder / f".{first.name}.abc.tmp").write_bytes(b"{"),
        "stray-file": lambda: (folder / "notes.txt").write_text("hello"),
        "error-record-garbage": lambda: first.with_name(first.name[:-5] + ".error.json").write_text("{"),
        "records-dir-gone": lambda: [p.unlink() for p in folder.iterdir()],
        "grid-json-gone": lambda: (run_dir / "grid.json").unlink(),
        "lock-files-gone": lambda: [p.unlink() for p in (run_dir / "launch" / "locks").iterdir()],
    }
    damages[how]()


@pytest.mark.parametrize("how", ["truncated", "empty", "binary", "schema-99", "list", "no-metrics", "foreign-key",
                                 "bad-spec", "stale-tmp", "stray-file", "error-record-garbage", "records-dir-gone",
                                 "grid-json-gone", "lock-files-gone"])
def test_rerun_on_a_damaged_run_folder(tmp_path, capsys, flops_with, how):
    run_dir = tmp_path / "run"
    assert run_main(capsys, *FLOPS_GRID, "--out", str(run_dir))[0] == 0
    _damage(run_dir, how)
    rc, out, err = run_main(capsys, *FLOPS_GRID, "--out", str(run_dir))
    assert rc == 0, err
    assert finished(run_dir) == grid_keys(run_dir)
    assert len(temp_files(run_dir)) == (1 if how == "stale-tmp" else 0)  # a dead writer's file is left alone
    assert run_main(capsys, "--collect", str(run_dir))[0] == 0


# ---------------------------------------------------------------------------------------------
# python -m bench.report

@pytest.fixture
def finished_run(tmp_path, capsys, flops_with) -> Path:
    run_dir = tmp_path / "run"
    assert run_main(capsys, *FLOPS_GRID, "--out", str(run_dir))[0] == 0
    return run_dir


REPORT_CASES = [  # argv ({run}: a finished run, {tmp}: a scratch folder), exit code
    ([], 2), (["{tmp}/missing"], 2), (["{run}/grid.json"], 2), (["{run}", "--out", "{run}/grid.json"], 2),
    (["{run}", "--frobnicate"], 2), (["{run}", "{tmp}/missing"], 2), (["--out"], 2), (["--help"], 0),
    (["{run}", "--no-figures", "--no-pictures"], 0), (["{run}", "{run}", "--no-figures"], 0),
    (["{tmp}/empty", "--no-figures"], 0), (["{tmp}/garbage", "--no-figures"], 0),
    (["{run}", "--out", "{tmp}/new/deeper", "--no-figures"], 0),
]


@pytest.mark.parametrize("argv, code", REPORT_CASES, ids=[" ".join(a) or "no-arguments" for a, _ in REPORT_CASES])
def test_report_cli(tmp_path, capsys, finished_run, argv, code):
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage" / "records").mkdir(parents=True)
    (tmp_path / "garbage" / "records" / "x.json").write_text("{")
    (tmp_path / "garbage" / "grid.json").write_text("[]")
    argv = [a.replace("{run}", str(finished_run)).replace("{tmp}", str(tmp_path)) for a in argv]
    before = tree(finished_run)
    rc = report_main(argv)
    out, err = capsys.readouterr()
    assert rc == code and "Traceback" not in err, err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("python -m bench.report: error: "), err
        assert tree(finished_run) == before and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("fault", ["interrupt", "ENOSPC", "EROFS"])
def test_report_cli_interrupted_or_on_a_failing_disk(tmp_path, capsys, monkeypatch, finished_run, fault):
    if fault == "interrupt":
        from bench.report import frame

        monkeypatch.setattr(frame, "summarize", lambda tidy: (_ for _ in ()).throw(KeyboardInterrupt()))
    else:
        DiskFault(monkeypatch, finished_run, getattr(errno, fault), "open", match=is_report_file)
    rc = report_main([str(finished_run), "--no-figures", "--no-pictures"])
    err = capsys.readouterr().err
    assert rc == (130 if fault == "interrupt" else 1) and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert record_files(finished_run)  # the records are untouched


# ---------------------------------------------------------------------------------------------
# Real processes: what a terminal shows

@pytest.mark.slow
@pytest.mark.parametrize("argv, code", [
    (["run_all.py", "--metrics", "flops", "--ratios", "abc"], 2),
    (["run_all.py", "--collect", ""], 2),
    (["run_all.py", "--metrics", "flops", "--out", ""], 2),
    (["-m", "bench.report"], 2),
    (["-m", "bench.report", "results/none-such"], 2),
], ids=["run-all-bad-ratio", "run-all-collect-empty", "run-all-out-empty", "report-no-arguments", "report-missing"])
def test_real_process_shows_one_line(tmp_path, argv, code):
    argv = [str(REPO / arg) if arg == "run_all.py" else arg for arg in argv]
    proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "error:" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # not even results/<timestamp>

