"""A sweep on a real single-node Slurm: every record lands; a job cancelled mid-run is the only
cell the re-launch runs.

Brings the cluster up through ``python -m harness.cluster.slurm up`` when it can (root; apt-get
for missing packages), and skips with the reason only when it truly cannot. CI runs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import pytest
from test_sweep_e2e import eval_text, grid_args, kbit_run, tiny_models  # noqa: F401 (fixtures)

from harness.cluster import slurm
from harness.records import cell_files, read_store

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster() -> None:
    if slurm.is_up():
        return
    if os.geteuid() != 0:
        pytest.skip(
            "Slurm is not up and bringing it up needs root: sudo python -m harness.cluster.slurm up"
        )
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    slurm.up()  # raises (the test errors, not skips) if a root machine with apt cannot bring it up


def _squeue(name: str) -> list[tuple[str, str]]:
    out = subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, check=True
    )
    return [tuple(line.split()) for line in out.stdout.splitlines() if line.strip()]


def _wait_drained(name: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while _squeue(name) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _squeue(name), f"jobs of {name} still queued after {timeout}s"


def _created(results, sweep) -> dict[str, str]:
    return {r["cell_id"]: r["created_at"] for r in read_store(results, sweep).to_pylist()}


def test_slurm_sweep_cancel_and_resume(cluster, tiny_models, eval_text, tmp_path):  # noqa: F811
    name = f"kbit-test-{uuid.uuid4().hex[:8]}"
    results = tmp_path / "results"
    args = [
        *grid_args(tiny_models[:1], eval_text, results, sweep="slurm"),
        "hydra/launcher=slurm",
        "hydra.launcher.partition=debug",
        f"hydra.launcher.name={name}",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.array_parallelism=2",
    ]
    n_cells = 5  # one model: {int, float} x {3, 4} + the baseline
    proc = kbit_run(args)
    # Cancel one array task as soon as it runs (python is still importing: mid-cell, no record).
    victim, deadline = None, time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:
        running = [job for job, state in _squeue(name) if state == "RUNNING"]
        victim = running[-1] if running else None
        time.sleep(0.1)
    assert victim, "no array task reached RUNNING"
    subprocess.run(["scancel", "--signal=KILL", victim], check=True)
    out, _ = proc.communicate(timeout=300)
    _wait_drained(name)
    assert proc.returncode == 1, out[-3000:]  # the sweep says a cell is missing
    assert "the launcher stopped waiting after a job ended abnormally" in out, out[-3000:]
    first = _created(results, "slurm")
    assert len(first) == n_cells - 1
    state = subprocess.run(
        ["sacct", "-n", "-X", "-j", victim, "-o", "State%30"], capture_output=True, text=True
    ).stdout.split()
    assert state and state[0].rstrip("+") in {"CANCELLED", "FAILED"}, state  # real job states

    rc_proc = kbit_run(args)
    out, _ = rc_proc.communicate(timeout=300)
    _wait_drained(name)
    assert rc_proc.returncode == 0, out[-3000:]
    assert f"{n_cells - 1} done, 0 failed, 1 to run" in out
    second = _created(results, "slurm")
    assert len(second) == n_cells and len(cell_files(results, "slurm")) == n_cells
    assert {k: second[k] for k in first} == first  # the cells that were done did not run again
