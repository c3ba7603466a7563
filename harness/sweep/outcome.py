"""After a launch: what the store says about the launched cells, and the sweep's exit status.

Why the store and not the launcher's return values: on a cluster a job can vanish without a
Python exception, and a cell's record is the one truth about it. Called by the sweeper after
an in-process launch and after a packed launch that waited for its jobs.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from harness.records import STATUS_FAILED, STATUS_OK, cell_path, cell_status
from harness.sweep.errors import SweepError

log = logging.getLogger(__name__)


def report_outcome(
    launched: Sequence[Any],
    launcher_error: str | None = None,
    done_before: int = 0,
    held: int = 0,
    job_errors: Counter[str] | None = None,
) -> None:
    """After launching: what the store now says about the launched cells (the truth on a
    cluster, where a job can vanish without a Python exception).

    Two lines: the launched cells, and the whole sweep as the progress line counts it
    (``done_before`` ok before this launch + the launched cells that finished, of all cells
    including ``held`` ones left to live jobs of an earlier launch). ``job_errors`` (error
    line -> cells) are the errors of jobs that left cells without a record of their own.
    Before them, the launched cells' results table on stdout (``harness.run.report``: a row per
    task when few, a line per cell when many, at most 40 lines).
    """
    from harness.run.report import print_results

    paths = [cell_path(c.results_dir, c.sweep, c.cell_id) for c in launched]
    statuses = [cell_status(p) for p in paths]
    print_results(paths)  # the launched cells' results table, on stdout
    outcome = Counter(statuses)
    ok, failed = outcome[STATUS_OK], outcome[STATUS_FAILED]
    missing = len(launched) - ok - failed
    log.info(
        "launched %d cells: %d ok, %d failed, %d without a record",
        len(launched),
        ok,
        failed,
        missing,
    )
    names = ", ".join(sorted({c.sweep for c in launched})) or "?"
    total = len(launched) + done_before + held
    log.info(
        "sweep %s: %d/%d cells finished: %d ok (%d before this launch), %d failed%s",
        names,
        done_before + ok + failed,
        total,
        done_before + ok,
        done_before,
        failed,
        f", {held} held by live jobs of an earlier launch" if held else "",
    )
    if launcher_error:
        raise SweepError(
            f"the launcher stopped waiting after a job ended abnormally ({launcher_error}); jobs "
            "still queued keep running. `kbit-status RESULTS_DIR` shows the outcome; re-running "
            "the same command runs exactly the cells without an ok record"
        )
    if failed or missing:
        why = ""
        if job_errors:
            first, n = job_errors.most_common(1)[0]
            why = f"; a job's error ({n} cell(s)): {first}"
        elif failed:
            example = _first_error(
                [c for c, st in zip(launched, statuses, strict=True) if st == STATUS_FAILED]
            )
            why = f"; e.g. {example}" if example else ""
        raise SweepError(
            f"{failed + missing} of {len(launched)} launched cells did not finish ok ({failed} "
            f"failed, {missing} without a record){why}; `kbit-status RESULTS_DIR --errors` shows "
            "why, and re-running the same command retries exactly these cells"
        )


def _first_error(cells: Sequence[Any], tries: int = 5) -> str | None:
    """The first error line of the first failed record among ``cells`` (reads a few files)."""
    from harness.records import read_cell

    for cell in cells[:tries]:
        try:
            path = cell_path(cell.results_dir, cell.sweep, cell.cell_id)
            errors = read_cell(path).column("error")
        except Exception:  # no file, unreadable: try the next one
            continue
        for error in errors.to_pylist():
            if error:
                return (str(error).strip().splitlines() or [""])[0][:300]
    return None
