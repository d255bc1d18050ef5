"""The run folder's disk fails mid-run (full, or remounted read-only): one line naming the path and the
errno, every finished record kept, no temp file left behind; and files that colleagues can read.

Faults are injected at the system calls the writers use (`os.replace`, `os.write`, `open`), counted
per file of the run folder, so the N-th record (or grid.json, or a report file) is the one that fails.
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import run_all
from bench import records
from bench.report.__main__ import main as report_main
from tests.test_faults import FLOPS_GRID, GRID_SIZE, assert_clean, grid_keys, record_files

REPO = Path(__file__).resolve().parents[1]
ERRNOS = {"ENOSPC": errno.ENOSPC, "EROFS": errno.EROFS}


def _under(path, folder: Path) -> bool:
    try:
        return Path(os.fsdecode(path)).resolve().is_relative_to(folder.resolve())
    except (TypeError, ValueError, OSError):
        return False


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class DiskFault:
    """From the `at`-th matching write on, every matching write into `folder` fails with `code`, as a
    full or read-only file system does. `call` is the system call that fails: replace (the rename that
    publishes a file), write (its bytes) or open (files written without a rename: the report)."""

    def __init__(self, monkeypatch, folder: Path, code: int, call: str, at: int = 1, match=lambda p: True):
        self.folder, self.code, self.at, self.match, self.seen, self.failed = folder, code, at, match, 0, 0
        if call == "replace":
            real = os.replace
            monkeypatch.setattr(os, "replace", lambda src, dst, **kw: self._maybe(dst) or real(src, dst, **kw))
        elif call == "write":
            real_write = os.write
            monkeypatch.setattr(os, "write", lambda fd, data: self._maybe(_fd_path(fd)) or real_write(fd, data))
        else:
            real_open = builtins.open

            def failing_open(file, mode="r", *args, **kwargs):
                if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax"):
                    self._maybe(file)
                return real_open(file, mode, *args, **kwargs)

            monkeypatch.setattr(builtins, "open", failing_open)
            monkeypatch.setattr(io, "open", failing_open)

    def _maybe(self, path) -> None:
        target = Path(os.fsdecode(path))
        if target.name.startswith(".") and target.name.endswith(".tmp"):  # a writer's temp file: its target
            target = target.with_name(target.name[1:-len(".tmp")].rsplit(".", 1)[0])
        if not (_under(path, self.folder) and self.match(target)):
            return None
        self.seen += 1
        if self.seen >= self.at:
            self.failed += 1
            raise OSError(self.code, os.strerror(self.code))  # the kernel names no file for a failed write
        return None


def is_record(path: Path) -> bool:
    return path.parent.name == records.RECORDS_DIR and path.name.endswith(".json")


def temp_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tokenbench-probe")]


def error_lines(err: str) -> list[str]:
    """stderr without the per-job progress lines ('[3/6] key: ok (0.1 s)')."""
    return [line for line in err.strip().splitlines() if line and not line.startswith("[")]


@pytest.fixture
def stubbed(monkeypatch):
    from tests.test_faults import cheap_flops, stub_run

    stub_run(monkeypatch, "flops", cheap_flops)


# ---------------------------------------------------------------------------------------------
# In-process, through run_all.main: the N-th record cannot be written

@pytest.mark.parametrize("name", ERRNOS)
@pytest.mark.parametrize("call", ["replace", "write"])
def test_disk_fails_at_the_third_record(tmp_path, capsys, monkeypatch, stubbed, name, call):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        fault = DiskFault(patch, run_dir, ERRNOS[name], call, at=3, match=is_record)
        rc = run_all.main([*FLOPS_GRID, "--out", str(run_dir)])
    out, err = capsys.readouterr()
    assert fault.failed == 1 and rc == 1, err
    assert "Traceback" not in err and "During handling" not in err
    (line,) = error_lines(err)
    assert line.startswith("run_all.py: error: ") and str(records.records_dir(run_dir)) in line, line
    assert os.strerror(ERRNOS[name]) in line and f"errno {ERRNOS[name]}" in line, line
    finished = {name.removesuffix(".json") for name in record_files(run_dir)}
    assert len(finished) == 2  # the two records written before the disk failed
    assert_clean(run_dir, finished)  # valid, and no .tmp or half-written file beside them
    assert temp_files(run_dir) == []
    kept = record_files(run_dir)

    assert run_all.main([*FLOPS_GRID, "--out", str(run_dir)]) == 0  # the disk is back: the rest runs
    assert_clean(run_dir, grid_keys(run_dir))
    assert {k: v for k, v in record_files(run_dir).items() if k in kept} == kept


@pytest.mark.parametrize("name", ERRNOS)
@pytest.mark.parametrize("call", ["replace", "write"])
def test_grid_json_cannot_be_written(tmp_path, capsys, monkeypatch, name, call):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        DiskFault(patch, run_dir, ERRNOS[name], call, match=lambda p: p.name == records.GRID_FILE)
        rc = run_all.main([*FLOPS_GRID, "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert str(run_dir / records.GRID_FILE) in line and f"errno {ERRNOS[name]}" in line, line
    assert not records.records_dir(run_dir).exists() and temp_files(run_dir) == []


def test_lock_folder_on_a_read_only_disk(tmp_path, capsys, monkeypatch, stubbed):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        DiskFault(patch, run_dir, errno.EROFS, "open", match=lambda p: p.suffix == ".lock")
        rc = run_all.main([*FLOPS_GRID, "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert "locks" in line and f"errno {errno.EROFS}" in line, line


# ---------------------------------------------------------------------------------------------
# The report: after the run (run_all) and on its own (python -m bench.report)

def is_report_file(path: Path) -> bool:
    return records.RECORDS_DIR not in path.parts and "launch" not in path.parts and path.name != records.GRID_FILE


@pytest.mark.parametrize("name", ERRNOS)
def test_report_cannot_be_written_after_the_run(tmp_path, capsys, monkeypatch, stubbed, name):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        DiskFault(patch, run_dir, ERRNOS[name], "open", match=is_report_file)
        rc = run_all.main([*FLOPS_GRID, "--out", str(run_dir)])
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert str(run_dir) in line and f"errno {ERRNOS[name]}" in line and "python -m bench.report" in line, line
    assert f"{GRID_SIZE} done" in out
    assert_clean(run_dir, grid_keys(run_dir))  # every record is there


@pytest.mark.parametrize("name", ERRNOS)
def test_report_cli_on_a_full_disk(tmp_path, capsys, monkeypatch, stubbed, name):
    run_dir = tmp_path / "run"
    assert run_all.main([*FLOPS_GRID, "--out", str(run_dir)]) == 0
    capsys.readouterr()
    out_dir = tmp_path / "merged"
    with monkeypatch.context() as patch:
        DiskFault(patch, out_dir, ERRNOS[name], "open", at=2)
        rc = report_main([str(run_dir), "--out", str(out_dir), "--no-figures", "--no-pictures"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert str(out_dir) in line and f"errno {ERRNOS[name]}" in line, line


# ---------------------------------------------------------------------------------------------
# What a user sees: a real process, its stderr as the terminal gets it

FAULTY_RUN = """
import sys
sys.path[:0] = [{repo!r}]
import pytest
from tests.test_faults import cheap_flops, stub_run
from tests.test_hostile_storage import DiskFault, is_record, is_report_file
from pathlib import Path
import errno

patch = pytest.MonkeyPatch()
stub_run(patch, "flops", cheap_flops)
run_dir, code, call, target = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
match = {{"record": is_record, "grid": lambda p: p.name == "grid.json", "report": is_report_file}}[target]
DiskFault(patch, run_dir, code, call, at=3 if target == "record" else 1, match=match)
if target == "report":
    from bench.report.__main__ import main
    sys.exit(main([str(run_dir), "--no-figures", "--no-pictures"]))
import run_all
sys.exit(run_all.main([*{grid!r}, "--out", str(run_dir)]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name, call, target", [
    ("ENOSPC", "replace", "record"), ("EROFS", "write", "record"), ("ENOSPC", "write", "grid"),
    ("EROFS", "open", "report"),
])
def test_subprocess_sees_one_line(tmp_path, capsys, stubbed, name, call, target):
    run_dir = tmp_path / "run"
    script = tmp_path / "faulty_run.py"
    script.write_text(FAULTY_RUN.format(repo=str(REPO), grid=FLOPS_GRID))
    if target == "report":  # a finished run whose report is rebuilt on a failing disk
        assert run_all.main([*FLOPS_GRID, "--out", str(run_dir)]) == 0
    proc = subprocess.run([sys.executable, str(script), str(run_dir), str(ERRNOS[name]), call, target],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert str(run_dir) in line and f"errno {ERRNOS[name]}" in line, line
    assert temp_files(run_dir) == []


# ---------------------------------------------------------------------------------------------
# Item 16: every file of a run folder follows the umask, like any other tool's files

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_run_folder_files_follow_the_umask(tmp_path, capsys, stubbed, umask, mode):
    run_dir = tmp_path / "run"
    old = os.umask(umask)
    try:
        assert run_all.main([*FLOPS_GRID, "--out", str(run_dir), "--methods", "evit", "--ratios", "0.5"]) == 0
        records.atomic_write_bytes(run_dir / "records" / "x.preds.npz", b"npz")  # the accuracy job's writer
    finally:
        os.umask(old)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"grid.json", "report.md", "summary.csv", "x.preds.npz"}
    assert len([p for p in files if p.parent.name == "records"]) == 3
    wrong = {str(p.relative_to(run_dir)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != mode}
    assert wrong == {}, wrong
