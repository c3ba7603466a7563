"""Provenance of a record: versions, the harness commit, the host and the device by name.

Why its own module: every record carries these fields, and they are the same for every cell of
a process except the time; the versions and the commit are computed once per process.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=1)
def _static_provenance() -> dict[str, str]:
    import lm_eval
    import torch
    import transformers

    import harness

    root = Path(harness.__file__).resolve().parents[1]
    commit = ""
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return dict(
        version_harness=harness.__version__, version_torch=torch.__version__,
        version_transformers=transformers.__version__,
        version_lm_eval=getattr(lm_eval, "__version__", ""), git_commit=commit,
        hostname=socket.gethostname(),
    )  # fmt: skip


def provenance_fields() -> dict[str, str]:
    """Versions, git commit, host, scheduler job and creation time (UTC) for a record."""
    return {
        **_static_provenance(),
        "job_id": job_identity(),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }


def device_name(device: Any) -> str:
    """e.g. ``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def job_identity() -> str | None:
    """The scheduler job this process runs in, or None in-process.

    Slurm array tasks are ``<array job id>_<task id>`` (what ``squeue -r`` and ``sacct`` show),
    plain Slurm jobs their job id, submitit's local processes ``local:<pid>``. Records carry
    it so a sweep's cost (jobs, model loads) can be counted from the store alone.
    """
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return env["SLURM_JOB_ID"]
    if env.get("SUBMITIT_LOCAL_JOB_ID"):
        return f"local:{env['SUBMITIT_LOCAL_JOB_ID']}"
    return None
