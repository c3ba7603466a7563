"""Packed sweeps on a real single-node Slurm with a small ``MaxArraySize`` (20, as CI sets it).

- packing: 2 models x 5 cells in jobs of 2 cells load each model ceil(5/2) = 3 times (counted
  from the store) and give the in-process launch's values, value for value;
- a grid of more jobs than ``MaxArraySize`` is split into arrays and submitted completely; the
  command returns right after submitting; running it again while the jobs are queued or
  running submits nothing; a job ``scancel``-ed in the middle of its chunk loses only its
  remaining cells, which the next launch runs (no cell runs twice);
- a submission the scheduler refuses says what it refused and that nothing was queued.

Brings the cluster up through ``python -m harness.cluster.slurm up --max-array-size 20`` when it
can (root; apt-get for missing packages) and skips with the reason only when it truly cannot.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import test_sweep_e2e as e2e
from test_sweep_e2e import grid_args, run_to_end

from harness.cluster import slurm
from harness.records import cell_files, read_store

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
MAX_ARRAY_SIZE = 20


@pytest.fixture(scope="module")
def cluster() -> None:
    if not slurm.is_up():
        if os.geteuid() != 0:
            pytest.skip("Slurm is not up and bringing it up needs root: sudo python -m "
                        "harness.cluster.slurm up --max-array-size 20")  # fmt: skip
        if not shutil.which("apt-get") and not shutil.which("slurmctld"):
            pytest.skip("Slurm is not installed and apt-get is not available to install it")
    if slurm.effective_max_array_size() != MAX_ARRAY_SIZE and os.geteuid() != 0:
        pytest.skip(f"the test needs MaxArraySize={MAX_ARRAY_SIZE}: sudo python -m "
                    f"harness.cluster.slurm up --max-array-size {MAX_ARRAY_SIZE}")  # fmt: skip
    slurm.up(max_array_size=MAX_ARRAY_SIZE)  # raises (an error, not a skip) if it cannot
    assert slurm.effective_max_array_size() == MAX_ARRAY_SIZE


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> list[Path]:
    return e2e.make_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("eval") / "text.txt"
    path.write_text(" ".join(rng.choice(e2e.WORDS) for _ in range(400)))
    return path


def _squeue(name: str) -> list[tuple[str, str]]:
    out = subprocess.run(
        ["squeue", "-h", "-r", "-n", name, "-o", "%i %T"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [tuple(line.split()) for line in out.stdout.splitlines() if line.strip()]


def _array_ids(name: str) -> set[str]:
    out = subprocess.run(
        ["sacct", "-n", "-X", "--name", name, "-o", "JobID%40"], capture_output=True, text=True
    )
    return {line.split("_")[0].strip() for line in out.stdout.split() if line.strip()}


def _wait_drained(name: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while _squeue(name) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert not _squeue(name), f"jobs of {name} still queued after {timeout}s"


def _slurm_args(name: str, *extra: str, partition: str = "debug") -> list[str]:
    return [
        "hydra/launcher=slurm",
        f"hydra.launcher.partition={partition}",
        f"hydra.launcher.name={name}",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=20",
        "hydra.launcher.array_parallelism=64",
        "hydra.launcher.poll_s=2",
        *extra,
    ]


def _rows(results: Path, sweep: str) -> list[dict]:
    return read_store(results, sweep).to_pylist()


def _values(rows: list[dict]) -> dict[tuple, float]:
    keys = [(r["cell_id"], r["task"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]][:3]
    return {(r["cell_id"], r["task"], r["metric"]): r["value"] for r in rows}


def test_packed_jobs_load_each_model_once_per_job_and_equal_in_process(
    cluster,
    tiny_models,
    eval_text,
    tmp_path,
):
    name = f"kbit-pack-{uuid.uuid4().hex[:8]}"
    packed, inproc = tmp_path / "packed", tmp_path / "inproc"
    cells_per_job, n_per_model = 2, 5  # {int, float} x {3, 4} + the baseline
    args = grid_args(tiny_models, eval_text, packed, sweep="pack")
    extra = [f"hydra.sweeper.jobs.cells_per_job={cells_per_job}", "hydra.launcher.wait=true"]
    rc, out = run_to_end([*args, *_slurm_args(name, *extra)], timeout=900)
    assert rc == 0, out[-3000:]
    assert "plan: 10 cells in 6 jobs (1-2 cells per job" in out, out[-3000:]
    rows = _rows(packed, "pack")
    per_cell = {r["cell_id"]: r for r in rows}
    assert len(per_cell) == 2 * n_per_model
    for model in {r["model"] for r in rows}:
        cells = [r for r in per_cell.values() if r["model"] == model]
        loads = sum(not r["model_reused"] for r in cells)
        assert loads == math.ceil(n_per_model / cells_per_job), (model, loads)
        jobs = {r["job_id"] for r in cells}
        assert len(jobs) == loads and all(j and "_" in j for j in jobs)  # "<array>_<task>"

    rc, out = run_to_end(grid_args(tiny_models, eval_text, inproc, sweep="pack"))
    assert rc == 0, out[-3000:]
    assert _values(rows) == _values(_rows(inproc, "pack"))  # value for value
    assert all(r["job_id"] is None for r in _rows(inproc, "pack"))


def _big_grid(model: Path, text: Path, results: Path) -> list[str]:
    """One tiny model: 3 data types x bits 3..8 x 4 block sizes x centering + the baseline."""
    return [
        "hydra/sweeper=kbit",
        f"model={model}",
        "dtype=int,float,dynamic",
        "bits=3,4,5,6,7,8,16",
        "block_size=8,16,32,64",
        "centering=false,true",
        "sweep=big",
        f"results_dir={results}",
        "eval=ppl",
        f"eval.perplexity=[{{name:tiny,path:'{text}',seqlen:32,max_tokens:64}}]",
        "device=cpu",
    ]


N_BIG = 3 * 6 * 4 * 2 + 1  # 145 cells
C_BIG = 7  # -> 21 jobs: more than MaxArraySize


def _created(results: Path, sweep: str) -> dict[str, tuple[str, str]]:
    return {r["cell_id"]: (r["created_at"], r["job_id"]) for r in _rows(results, sweep)}


def _claims(results: Path, sweep: str) -> dict[str, list[list[str]]]:
    folder = results / sweep / ".jobs"
    return {p.stem: json.loads(p.read_text())["tasks"] for p in folder.glob("*.json")}


def _status(results: Path) -> tuple[int, dict[str, int]]:
    """``kbit-status RESULTS --sweep big``: exit status and the sweep's row by column."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "kbit-status"), str(results), "--sweep", "big"],
        capture_output=True,
        text=True,
    )
    head, row = out.stdout.splitlines()[:2]
    return out.returncode, dict(zip(head.split()[1:], map(int, row.split()[1:]), strict=True))


def _kill_task_processes(task: str) -> None:
    """SIGKILL the processes of array task ``task``, as slurmd does KillWait after a scancel.

    Why here: on this single-node test cluster (proctrack/linuxproc in a container) slurmd
    marks a cancelled step CANCELLED but its processes run on; on a real cluster they die
    within KillWait. The task is found by the SLURM_ARRAY_* variables of its processes.
    """
    array, _, index = task.partition("_")
    want = {f"SLURM_ARRAY_JOB_ID={array}", f"SLURM_ARRAY_TASK_ID={index}"}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = set((proc / "environ").read_bytes().decode(errors="replace").split("\0"))
        except OSError:
            continue
        if want <= env:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def _cancel_mid_chunk(name: str, results: Path, timeout: float = 600) -> str:
    """scancel a running task that has written some but not all of its cells; its id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        claims = {}
        for array, tasks in _claims(results, "big").items():
            claims.update({f"{array}_{i}": cells for i, cells in enumerate(tasks)})
        done = {p.stem for p in cell_files(results, "big")}
        for task, state in _squeue(name):
            cells = claims.get(task, [])
            written = sum(c in done for c in cells)
            if state == "RUNNING" and 0 < written < len(cells) - 2:  # >= 3 cells to go: no race
                subprocess.run(["scancel", task], check=True)
                _kill_task_processes(task)
                return task
        time.sleep(0.05)
    raise AssertionError("no running task was seen in the middle of its chunk")


def test_grid_over_max_array_size_submit_return_hold_cancel_resume(
    cluster,
    tiny_models,
    eval_text,
    tmp_path,
):
    name = f"kbit-big-{uuid.uuid4().hex[:8]}"
    results = tmp_path / "results"
    args = [
        *_big_grid(tiny_models[0], eval_text, results),
        *_slurm_args(name, f"hydra.sweeper.jobs.cells_per_job={C_BIG}"),
    ]
    n_jobs = math.ceil(N_BIG / C_BIG)
    tic = time.monotonic()
    rc, out = run_to_end(args, timeout=300)
    returned_s = time.monotonic() - tic
    assert rc == 0, out[-3000:]
    assert f"plan: {N_BIG} cells in {n_jobs} jobs" in out, out[-3000:]
    assert f"2 array(s) of at most {MAX_ARRAY_SIZE} tasks (MaxArraySize)" in out, out[-3000:]
    assert "kbit-status" in out and f"submitted {n_jobs} jobs" in out
    claims = _claims(results, "big")
    assert sorted(len(t) for t in claims.values()) == [n_jobs - MAX_ARRAY_SIZE, MAX_ARRAY_SIZE]
    claimed = [c for tasks in claims.values() for cells in tasks for c in cells]
    assert len(claimed) == len(set(claimed)) == N_BIG  # every cell in exactly one task
    assert len(cell_files(results, "big")) < N_BIG, "the command waited for the jobs"
    print(f"submit-and-return took {returned_s:.1f}s")

    # Running the same command while the jobs are queued or running submits nothing.
    rc, out = run_to_end(args, timeout=300)
    assert rc == 0, out[-3000:]
    assert "held by live jobs" in out and "submitted" not in out, out[-3000:]
    assert set(_claims(results, "big")) == set(claims)  # no new array
    rc, counts = _status(results)  # the live state, read from the scheduler
    assert rc == 1 and counts["cells"] == N_BIG and counts["queued"] + counts["running"] > 0, counts

    victim = _cancel_mid_chunk(name, results)
    _wait_drained(name)
    assert _array_ids(name) == set(claims)  # the second command queued nothing
    first = _created(results, "big")
    assert 0 < len(first) < N_BIG
    rc, counts = _status(results)
    assert rc == 1 and counts["queued"] == counts["running"] == 0, counts
    assert counts["done"] == len(first) and counts["pending"] == N_BIG - len(first), counts

    rc, out = run_to_end([*args, "hydra.launcher.wait=true"], timeout=900)
    _wait_drained(name)
    assert rc == 0, out[-3000:]
    assert f"{len(first)} done, 0 failed, {N_BIG - len(first)} to run" in out, out[-3000:]
    second = _created(results, "big")
    assert len(second) == N_BIG and len(cell_files(results, "big")) == N_BIG
    assert {k: second[k] for k in first} == first  # cells done before did not run again
    assert any(job == victim for _, job in first.values())  # it was cancelled mid-chunk
    state = subprocess.run(
        ["sacct", "-n", "-X", "-j", victim, "-o", "State%30"], capture_output=True, text=True
    ).stdout.split()
    assert state and state[0].rstrip("+") in {"CANCELLED", "FAILED"}, state  # real job states


def test_refused_submission_queues_nothing(cluster, tiny_models, eval_text, tmp_path):
    name = f"kbit-bad-{uuid.uuid4().hex[:8]}"
    results = tmp_path / "results"
    args = [
        *grid_args(tiny_models[:1], eval_text, results, sweep="bad"),
        *_slurm_args(name, partition="no_such_partition"),
    ]
    rc, out = run_to_end(args, timeout=300)
    assert rc == 2, out[-3000:]
    assert "submission failed" in out and "nothing was queued" in out, out[-3000:]
    assert "partition" in out.lower()  # what the scheduler refused
    assert not _squeue(name) and not _claims(results, "bad")
