"""What runs inside a packed job, around each cell: its plugins loaded first, its threads, and a
``failed`` record for a cell that could not start (written by the job, or by a launcher that
waited and read the job's error line).

Why its own module: these run in the job's process (:meth:`harness.cluster.launcher.
_PackedMixin.__call__` calls them), apart from submitting; and the packer and the planner
name :data:`PLUGIN_MODULES` without importing the launcher.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.cluster.leases import trace_error_line

log = logging.getLogger(__name__)

# The key of a planned cell (harness.cluster.cells.planned_cell) that lists the plugin modules
# its job loads before composing it: the cell's ``plugins``, as the planner composed them.
PLUGIN_MODULES = "plugin_modules"


def cell_plugins(overrides: Sequence[str], planned: dict[str, Any] | None) -> list[str]:
    """The plugin modules a cell's job loads before composing it: the cell's ``plugins`` as
    the planner composed them (``planned``), else as its overrides give them (Hydra's plain
    ``launch``, which has no plan: a ``plugins=[...]`` override, read as ``kbit-run`` reads
    its command line; a sweep file's list reaches such a job only through the planner)."""
    if planned is not None and PLUGIN_MODULES in planned:
        return [str(m) for m in planned[PLUGIN_MODULES] or []]
    from harness.config.overrides import plugin_modules

    return plugin_modules([o for o in overrides if o.split("=", 1)[0].lstrip("+~") == "plugins"])


def load_cell_plugins(overrides: Sequence[str], planned: dict[str, Any] | None) -> None:
    """Load the cell's plugins (:func:`cell_plugins`) in this job's process, so a data type
    family, method or figure a user's module registers exists here as it did where the
    sweep was planned (:func:`harness.plugins.load_plugins`: each module once per process)."""
    from harness.plugins import load_plugins

    load_plugins(cell_plugins(overrides, planned))  # the kbit.plugins entry points too


def limit_threads(cpus: Any) -> int | None:
    """Run torch (and OpenMP/MKL) on as many threads as the job has CPUs; returns the count.

    Why: torch starts one thread per core of the machine, not per CPU the scheduler gave the
    job; jobs side by side on one node (submitit's local processes always, Slurm without CPU
    binding) would each use every core and slow each other down. The job's CPUs are
    ``SLURM_CPUS_PER_TASK`` (the resource rule's value on Slurm), else the launcher's
    ``cpus_per_task``. A user's ``OMP_NUM_THREADS`` wins.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    raw = os.environ.get("SLURM_CPUS_PER_TASK") or cpus
    try:
        n = int(raw)
    except (TypeError, ValueError):
        return None
    if n < 1:
        return None
    os.environ["OMP_NUM_THREADS"] = str(n)  # before torch is imported: every pool follows it
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


def record_inode(planned: dict[str, Any] | None) -> int | None:
    """The inode of a planned cell's record file (None: no file, or no plan)."""
    if planned is None:
        return None
    try:
        from harness.records import cell_path

        return cell_path(planned["results_dir"], planned["sweep"], planned["cell_id"]).stat().st_ino
    except Exception:  # no file, or a path that cannot be built: no record to keep
        return None


def process_age(now: float) -> float:
    """Seconds this process ran before ``now`` (a ``time.monotonic`` value); 0 if unknown."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start / ticks - (time.monotonic() - now))
    except (OSError, ValueError, IndexError):
        return 0.0


class UnrunCells(RuntimeError):
    """Raised by a job after its chunk when some of its cells could not run (the job fails)."""


def error_line(err: BaseException) -> str:
    """``Type: first line`` of an exception, as a failed record's first line shows it."""
    try:
        from harness.config.refusals import input_error_line

        line = input_error_line(err)
    except Exception:  # the import itself may be what fails in a broken job
        line = None
    if line is None:
        text = (str(err).strip().splitlines() or [""])[0] or type(err).__name__
        line = f"{type(err).__name__}: {text}"
    return line if len(line) <= 500 else line[:497] + "..."


# record fields a planned cell may carry into a failed record written without its config
RECORD_FIELDS = (
    "model", "model_family", "method", "dtype", "dtype_family", "bits", "block_size",
    "scale_format", "centering", "device_class", "compute_dtype",
)  # fmt: skip


def record_unrun_cell(
    planned: dict[str, Any], line: str, err: Any = None, job_id: str | None = None
) -> Path | None:
    """Write the ``failed`` record of a planned cell that has none (never over an ok one).

    Why here and not in the cell: the cell never got far enough to write its own (its
    config, its validation or an import failed in this process). The record holds the
    planned id, what the plan knew of the cell, and the error line first. Returns the path,
    or None when nothing could be written (the reason is logged).
    """
    try:
        import socket
        import traceback
        from datetime import datetime, timezone

        from harness.provenance import job_identity
        from harness.records import STATUS_FAILED, STATUS_OK, Record, cell_path, cell_status
        from harness.records import write_cell as write

        path = cell_path(planned["results_dir"], planned["sweep"], planned["cell_id"])
        if cell_status(path) == STATUS_OK:
            return path
        detail = ""
        if isinstance(err, BaseException):
            tb = traceback.format_exception(type(err), err, err.__traceback__)[-6:]
            detail = "\n" + "".join(tb)
        elif err:
            detail = "\n" + str(err)[-3000:]
        fields = {k: planned[k] for k in RECORD_FIELDS if planned.get(k) is not None}
        record = Record(
            **fields, sweep=str(planned["sweep"]), cell_id=str(planned["cell_id"]),
            status=STATUS_FAILED, error=f"{line}{detail}", job_id=job_id or job_identity(),
            hostname=socket.gethostname(), created_at=datetime.now(timezone.utc).isoformat(),
        )  # fmt: skip
        return write([record], path)
    except Exception as exc:  # the caller reports the cell as unrecorded
        log.error("no failed record could be written for cell %s: %s",
                  planned.get("cell_id"), error_line(exc))  # fmt: skip
        return None


def job_error_line(job: Any) -> str:
    """Why a submitit job left cells without a record: its error, from its result pickle, else
    from its error log; a short reason when neither says (e.g. killed by the scheduler)."""
    try:
        paths = job.paths
        if paths.result_pickle.exists():
            from submitit.core import utils

            outcome, value = utils.pickle_load(paths.result_pickle)
            if outcome == "error":
                return trace_error_line(value) or (str(value).strip().splitlines() or ["?"])[-1]
            return "the job ended without an error, but wrote no record for these cells"
        for log_path in (paths.stderr, paths.stdout):
            if log_path.exists():
                text = log_path.read_text(errors="replace")[-20000:]
                line = trace_error_line(text)
                if line:
                    return line
        state = getattr(job, "state", "UNKNOWN")
        return f"the job ended ({state}) without a result or an error line in {paths.stderr}"
    except Exception as exc:  # reading a job's files must not stop the report
        return f"the job's result could not be read ({error_line(exc)})"
