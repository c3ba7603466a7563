"""Which cells live scheduler jobs hold, so a re-launched sweep never runs a cell twice at once.

Why: ``kbit-run --multirun ... hydra/launcher=slurm`` submits and returns. Running the same
command again while its jobs are still pending or running must not submit their cells again.
At submission, the launcher writes one *claim file* per array into the sweep folder::

    RESULTS_DIR/<sweep>/.jobs/<array job id>.json
    {"job_id": "1234", "launcher": "slurm", "submitted_at": "...",
     "tasks": [["<cell id>", ...], ...]}          # index = array task id

A cell is *held* while the array task that claims it is pending or running in the
scheduler's view (``squeue``); a task that ended (done, failed, cancelled, timed out) holds
nothing, and its cells without an ok record are run by the next launch. The scheduler is the
truth, not a lease file a killed job could leave behind.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from harness.files import atomic_write

log = logging.getLogger(__name__)

CLAIMS_DIR = ".jobs"
# squeue states of a task that will still run (or is running) a cell it holds
LIVE_STATES = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
}
RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT"}


class SchedulerUnavailable(RuntimeError):
    """``squeue`` could not be asked: whether claimed cells are held is unknown."""


def claims_dir(results_dir: str | os.PathLike, sweep: str) -> Path:
    return Path(results_dir) / sweep / CLAIMS_DIR


def write_claims(
    results_dir: str | os.PathLike,
    sweep: str,
    job_id: str,
    tasks: Sequence[Sequence[str]],
    launcher: str = "slurm",
) -> Path:
    """Record that array ``job_id``'s task i holds the cells ``tasks[i]`` (atomically)."""
    path = claims_dir(results_dir, sweep) / f"{job_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "job_id": str(job_id),
        "launcher": launcher,
        "submitted_at": datetime.now(timezone.utc).isoformat(),
        "tasks": [list(cells) for cells in tasks],
    }
    atomic_write(path, json.dumps(body))
    return path


def read_claims(results_dir: str | os.PathLike, sweep: str) -> dict[str, list[list[str]]]:
    """array job id -> cells per task, for every claim file of the sweep (unreadable: skipped)."""
    folder = claims_dir(results_dir, sweep)
    claims: dict[str, list[list[str]]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            body = json.loads(path.read_text())
            claims[str(body["job_id"])] = [list(map(str, t)) for t in body["tasks"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("claim file %s skipped: %s", path, err)
    return claims


def scheduler_states(timeout: float = 30) -> dict[str, str]:
    """``"<job>_<task>"`` (array tasks) or ``"<job>"`` -> state, for the user's jobs in squeue.

    Raises :class:`SchedulerUnavailable` when squeue cannot answer: a caller must then not
    assume that claimed cells are free.
    """
    user = os.environ.get("USER") or getpass.getuser()
    cmd = ["squeue", "-h", "-r", "-u", user, "-o", "%F %K %T"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SchedulerUnavailable(f"`{' '.join(cmd)}` failed: {err}") from err
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or ["no message"])[0]
        raise SchedulerUnavailable(f"`{' '.join(cmd)}` exited {out.returncode}: {first}")
    return parse_squeue(out.stdout)


def parse_squeue(text: str) -> dict[str, str]:
    """Lines ``<array job id> <task id or N/A> <state>`` -> {"<job>_<task>" | "<job>": state}."""
    states: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        job, task, state = parts
        key = job if task in ("N/A", "4294967294") else f"{job}_{task}"
        states[key] = state
    return states


@dataclass(frozen=True)
class Hold:
    """A cell held by a live array task."""

    task: str  # "<array job id>_<task id>"
    state: str  # the scheduler's state, e.g. PENDING, RUNNING

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES


def held_cells(
    results_dir: str | os.PathLike,
    sweep: str,
    states: dict[str, str] | None = None,
    forget: bool = True,
) -> dict[str, Hold]:
    """cell id -> the live task holding it; with ``forget``, claim files of arrays with no
    live task are removed (a launch does; ``kbit-status`` only reads).

    ``states`` is :func:`scheduler_states` (asked here when None: raises
    :class:`SchedulerUnavailable` if the scheduler cannot answer and claims exist).
    """
    claims = read_claims(results_dir, sweep)
    if not claims:
        return {}
    if states is None:
        states = scheduler_states()
    held: dict[str, Hold] = {}
    for job_id, tasks in claims.items():
        live = False
        for index, cells in enumerate(tasks):
            task = f"{job_id}_{index}"
            state = states.get(task)
            if state is None and len(tasks) == 1:  # submitit queues a one-job array as a job
                task, state = job_id, states.get(job_id)
            if state is None or state.rstrip("+") not in LIVE_STATES:
                continue
            live = True
            for cid in cells:
                held[cid] = Hold(task, state)
        if not live and forget:
            _forget(claims_dir(results_dir, sweep) / f"{job_id}.json")
    return held


def _forget(path: Path) -> None:
    """A claim file whose array has no live task holds nothing any more: remove it."""
    path.unlink(missing_ok=True)


def live_tasks(job_ids: Iterable[str], states: dict[str, str]) -> list[str]:
    """The tasks of the given array jobs that are still pending or running."""
    ids = {str(j) for j in job_ids}
    return sorted(
        key
        for key, state in states.items()
        if key.split("_")[0] in ids and state.rstrip("+") in LIVE_STATES
    )
