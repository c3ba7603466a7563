"""The limits a Slurm cluster puts on submissions, read before a sweep submits anything.

Why: Slurm refuses a job array whose largest index is ``MaxArraySize`` or more, refuses jobs past
``MaxJobCount`` (all jobs slurmctld holds) and past the user's ``MaxSubmitJobs`` (pending +
running, every array task counting as one job). A paper-scale grid hits these, and a refusal in
the middle of a submission leaves half a sweep queued. So the launcher reads the limits first,
splits the jobs into arrays the cluster accepts (:func:`array_slices`), and refuses the whole
submission up front with the fix (:func:`submission_problem`) when it cannot fit.

Only the standard library: the module is imported by the launcher on login nodes and in tests
without a cluster; every command it runs may be missing, and then the limit is unknown (None).
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)

# slurm.conf(5): "The value may not exceed 4000001"; 0 disables job arrays.
MAX_ARRAY_SIZE_CEILING = 4_000_001
FIX_HINT = (
    "raise hydra.sweeper.jobs.cells_per_job or hydra.sweeper.jobs.minutes_per_job so fewer, "
    "larger jobs are made, or lower the grid"
)


@dataclass(frozen=True)
class ClusterLimits:
    """What the cluster lets this user submit now; None wherever it could not be read.

    max_array_size: ``MaxArraySize`` from ``scontrol show config`` (Slurm's default 1001): array
        indices must be below it, so an array indexed from 0 holds at most this many tasks. When
        ``SchedulerParameters`` sets a smaller ``max_array_tasks`` (tasks per array), that one.
    max_job_count: ``MaxJobCount`` from ``scontrol show config`` (default 10000): jobs slurmctld
        holds in memory, all users together, each array task counting as one job.
    max_submit_jobs: the user's ``MaxSubmitJobs`` (pending + running jobs), the smallest of the
        user's associations (``sacctmgr show assoc``) and of the per-user limit of their default
        QOS (``sacctmgr show qos``, ``MaxSubmitJobsPerUser``). None when no limit is set, or when
        ``AccountingStorageEnforce`` lacks ``limits`` (Slurm then enforces none of them).
    jobs_queued: the user's jobs already pending or running, array tasks counted one by one
        (``squeue -h -u $USER -r``); they count against both limits above.
    """

    max_array_size: int | None
    max_job_count: int | None
    max_submit_jobs: int | None
    jobs_queued: int | None


def parse_scontrol_config(text: str) -> dict[str, str]:
    """``Key = Value`` lines of ``scontrol show config`` as a dict (values stripped).

    Headers ("Configuration data as of ...", "Cgroup Support Configuration:") and blank lines
    are skipped; a value may itself hold ``=`` (``SchedulerParameters = max_array_tasks=50``). When
    a key appears twice (plugin sections), the first one wins: it is the slurm.conf one.
    """
    config: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"^\s*([A-Za-z_][\w.()/\[\]-]*)\s+=(?:\s(.*))?$", line)
        if match:
            config.setdefault(match.group(1), (match.group(2) or "").strip())
    return config


def _int(value: str | None) -> int | None:
    """A limit as an int; None for empty, "(null)", "UNLIMITED" and other non-numbers."""
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _output(cmd: list[str], timeout: float) -> str | None:
    """stdout of ``cmd``, or None when it is missing, fails or times out (limit unknown)."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        log.debug("cannot read Slurm limits with %s: %s", cmd[0], err)
        return None
    if res.returncode != 0:
        log.debug("%s exited %d: %s", " ".join(cmd), res.returncode, res.stderr.strip())
        return None
    return res.stdout


def array_size_limit(config: dict[str, str]) -> int | None:
    """Most tasks one array indexed from 0 may hold: MaxArraySize, or max_array_tasks if smaller."""
    sizes = [_int(config.get("MaxArraySize"))]
    params = config.get("SchedulerParameters", "")
    match = re.search(r"(?:^|,)max_array_tasks=(\d+)", params)
    if match:
        sizes.append(int(match.group(1)))
    known = [size for size in sizes if size is not None]
    return min(known) if known else None


def limits_enforced(config: dict[str, str]) -> bool:
    """True when slurmctld enforces association/QOS limits such as MaxSubmitJobs.

    slurm.conf(5): limits are enforced only with ``limits`` (or ``safe``, which implies it) in
    AccountingStorageEnforce; otherwise a configured MaxSubmitJobs refuses nothing.
    """
    enforce = config.get("AccountingStorageEnforce", "").lower()
    return bool({"limits", "safe"} & set(re.split(r"[,\s]+", enforce)))


def _user() -> str:
    return os.environ.get("USER") or getpass.getuser()


def _sacctmgr_rows(args: list[str], timeout: float) -> list[list[str]] | None:
    out = _output(["sacctmgr", "-n", "-P", *args], timeout)
    if out is None:
        return None
    return [line.split("|") for line in out.splitlines() if line.strip()]


def read_max_submit_jobs(user: str, timeout: float = 10) -> int | None:
    """The user's MaxSubmitJobs: smallest over their associations and their default QOS.

    Several associations (accounts) may have different limits and we do not know which account a
    job lands in, so the smallest is taken; the QOS is each association's default QOS, else
    ``normal`` (Slurm's usual default), whose ``MaxSubmitJobsPerUser`` also applies.
    """
    assocs = _sacctmgr_rows(
        ["show", "assoc", f"user={user}", "format=MaxSubmitJobs,DefaultQOS"], timeout
    )
    if assocs is None:
        return None
    limits = [_int(row[0]) for row in assocs if row]
    qos_names = {row[1] if len(row) > 1 and row[1] else "normal" for row in assocs} or {"normal"}
    for qos in sorted(qos_names):
        rows = _sacctmgr_rows(["show", "qos", qos, "format=MaxSubmitJobsPerUser"], timeout)
        limits += [_int(row[0]) for row in rows or [] if row]
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def read_jobs_queued(user: str, timeout: float = 10) -> int | None:
    """The user's pending/running jobs, one per array task (``squeue -r``), or None if unknown."""
    out = _output(["squeue", "-h", "-u", user, "-r", "-o", "%i"], timeout)
    return None if out is None else sum(1 for line in out.splitlines() if line.strip())


def read_scontrol_config(timeout: float = 10) -> dict[str, str] | None:
    """``scontrol show config`` parsed, or None when slurmctld cannot be asked."""
    out = _output(["scontrol", "show", "config"], timeout)
    return None if out is None else parse_scontrol_config(out)


def read_limits(timeout: float = 10) -> ClusterLimits:
    """Ask scontrol, sacctmgr and squeue; whatever cannot be read is None. Never raises.

    ``timeout`` bounds each command: a hung slurmctld must not hang the sweep that asks.
    """
    config = read_scontrol_config(timeout) or {}
    user = _user()
    max_submit = read_max_submit_jobs(user, timeout) if limits_enforced(config) else None
    return ClusterLimits(
        max_array_size=array_size_limit(config),
        max_job_count=_int(config.get("MaxJobCount")),
        max_submit_jobs=max_submit,
        jobs_queued=read_jobs_queued(user, timeout),
    )


def array_slices(n_jobs: int, max_array_size: int | None) -> list[range]:
    """Job indices 0..n_jobs-1 as consecutive ranges, each small enough for one array.

    Each range becomes one ``sbatch --array=0-(len-1)`` (indexed from 0), and Slurm accepts
    indices up to MaxArraySize - 1, so a range may hold MaxArraySize jobs. None: one range.
    """
    if n_jobs < 0:
        raise ValueError(f"n_jobs must be >= 0, got {n_jobs}")
    if max_array_size is not None and max_array_size < 1:
        raise ValueError(
            f"MaxArraySize is {max_array_size}: this cluster has job arrays disabled "
            "(MaxArraySize=0 in slurm.conf), so a sweep cannot be submitted as arrays"
        )
    if n_jobs == 0:
        return []
    step = n_jobs if max_array_size is None else max_array_size
    return [range(start, min(start + step, n_jobs)) for start in range(0, n_jobs, step)]


def submission_problem(n_jobs: int, limits: ClusterLimits) -> str | None:
    """Why submitting ``n_jobs`` more jobs would be refused, or None (fits, or limits unknown).

    Checked before anything is queued, so a refusal never leaves half a sweep behind. Jobs the
    user already has queued count against both limits (for MaxJobCount they are a lower bound of
    what slurmctld holds; other users' jobs are not counted).
    """
    queued = limits.jobs_queued or 0
    already = f"{queued} already queued" if limits.jobs_queued is not None else "none known queued"
    checks = [
        ("MaxSubmitJobs", "the jobs this user may have pending or running", limits.max_submit_jobs),
        ("MaxJobCount", "the jobs slurmctld holds at once", limits.max_job_count),
    ]
    for name, meaning, limit in checks:
        if limit is not None and n_jobs + queued > limit:
            return (
                f"Slurm's {name} ({meaning}) is {limit}, and this sweep would submit {n_jobs} "
                f"jobs with {already} ({n_jobs + queued} > {limit}), so nothing "
                f"was queued: {FIX_HINT}."
            )
    return None
