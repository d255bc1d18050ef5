"""The code queued jobs run: a copy of the checkout taken at submission.

Submitted jobs start in the submitter's working directory and import from it first, so they run the
copy, whatever happens to the repository while they wait in a queue.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..provenance import REPO_ROOT


def repo_files(root: Path) -> list[str] | None:
    """Tracked plus new, not ignored files of the git repository at `root` (None if it is not one)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=root, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return [name for name in out.stdout.decode().split("\0") if name] if out.returncode == 0 else None


@contextlib.contextmanager
def code_snapshot(dest_parent: Path, root: Path = REPO_ROOT):
    """Copy the code under `root` to a new folder in `dest_parent` and work from there while submitting.

    A copy rather than submitit's RsyncSnapshot: that needs rsync and takes tracked files only, so a new,
    not yet committed module would be missing from the jobs."""
    Path(dest_parent).mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=dest_parent))
    files = repo_files(root)
    if files is None:  # an installed package: copy the packages themselves
        files = [str(p.relative_to(root)) for pkg in ("bench", "methods") for p in (root / pkg).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts]
    for name in files:
        source = root / name
        if source.is_file() and not name.startswith("results/"):  # a deleted tracked file is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    previous = Path.cwd()
    os.chdir(dest)
    try:
        yield dest
    finally:
        os.chdir(previous)
