"""Where a record comes from: the checkout the run started from, and the machine a job ran on.

The commit is read once, when the run is planned, from the repository the user ran `run_all.py` in,
not from the code snapshot queued jobs import (which is no git checkout). `dirty` says whether tracked
files differed from that commit, so a number is never attributed to a commit that did not produce it.
"""
from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def checkout(root: Path = REPO_ROOT) -> dict:
    """{"git_commit": sha or None, "git_dirty": bool or None, "code_root": path} of `root`."""
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no") if commit else None
    return dict(git_commit=commit or None, git_dirty=None if status is None else bool(status.strip()),
                code_root=str(root))


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


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
        device=device, dtype=dtype,
        slurm_job_id=os.environ.get("SLURM_JOB_ID"), slurm_array_task_id=os.environ.get("SLURM_ARRAY_TASK_ID"),
    )
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = cpu_name()
    from timm.layers import use_fused_attn

    env["fused_attn"] = bool(use_fused_attn())
    return env
