"""Which cells live scheduler jobs hold, so a re-launched sweep never runs a cell twice at once.

Why: ``kbit-run --multirun ... hydra/launcher=slurm`` submits and returns. Running the same
command again while its jobs are still pending or running must not submit their cells again.
At submission, the launcher writes one *claim file* per array into the sweep folder::

    RESULTS_DIR/<sweep>/.jobs/<array job id>.json
    {"job_id": "1234", "launcher": "slurm", "submitted_at": "...",
     "tasks": [["<cell id>", ...], ...],         # index = array task id
     "logs": "<submitit folder, %j = the job id>"}  # where each task's log is

A cell is *held* while the array task that claims it is pending or running in the
scheduler's view (``squeue``); a task that ended (done, failed, cancelled, timed out) holds
nothing, and its cells without an ok record are run by the next launch. The scheduler is the
truth, not a lease file a killed job could leave behind.

A task that ended without writing some of its cells' records (it died before kbit's code ran,
or could not write) left its reason only in its log: :func:`ended_task_errors` reads the
error line from the logs of ended tasks, for ``kbit-status --errors`` (text only; the job's
result pickle is never loaded by a reader of the store).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
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
    logs: str | os.PathLike | None = None,
) -> Path:
    """Record that array ``job_id``'s task i holds the cells ``tasks[i]`` (atomically);
    ``logs`` is the submitit folder of the tasks (``%j`` standing for the task's job id)."""
    path = claims_dir(results_dir, sweep) / f"{job_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "job_id": str(job_id),
        "launcher": launcher,
        "submitted_at": datetime.now(timezone.utc).isoformat(),
        "tasks": [list(cells) for cells in tasks],
    }
    if logs is not None:
        body["logs"] = str(logs)
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


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Refused|Cells)\b.*")
MAX_LOG_CHARS = 20_000  # the tail of a log that is searched for the error line


def trace_error_line(text: str) -> str | None:
    """The error line of a traceback or a job log: its last ``SomethingError: ...`` line."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if _ERROR_LINE.match(ln):
            return ln if len(ln) <= 500 else ln[:497] + "..."
    return None


def task_log(logs: str, job_id: str, index: int, n_tasks: int) -> Path:
    """The stderr log submitit writes for array task ``index`` of ``job_id``."""
    task = job_id if n_tasks == 1 else f"{job_id}_{index}"  # a one-task array is a plain job
    return Path(logs.replace("%j", task)) / f"{task}_0_log.err"


def ended_task_errors(
    results_dir: str | os.PathLike, sweep: str, states: dict[str, str]
) -> dict[str, str]:
    """cell id -> the error line in the log of the ended task that held it (cells of tasks
    still live, or whose log shows no error, are left out). A caller keeps the cells that
    have no record: a cell with a record said what happened itself."""
    errors: dict[str, str] = {}
    for path in sorted(claims_dir(results_dir, sweep).glob("*.json")):
        try:
            body = json.loads(path.read_text())
            job_id, tasks, logs = str(body["job_id"]), list(body["tasks"]), body.get("logs")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not logs:
            continue
        for index, cells in enumerate(tasks):
            state = states.get(f"{job_id}_{index}") or states.get(job_id)
            if state is not None and state.rstrip("+") in LIVE_STATES:
                continue
            log_path = task_log(str(logs), job_id, index, len(tasks))
            try:
                with open(log_path, "rb") as fh:
                    fh.seek(0, os.SEEK_END)
                    fh.seek(max(0, fh.tell() - MAX_LOG_CHARS))
                    text = fh.read().decode(errors="replace")
            except OSError:
                continue
            line = trace_error_line(text)
            if line:
                errors.update({str(cid): f"{line} (job {job_id}_{index}, {log_path})"
                               for cid in cells})  # fmt: skip
    return errors
