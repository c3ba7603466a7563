"""``kbit-status RESULTS_DIR``: done / failed / queued / running / pending cells per sweep.

Why: on a cluster, jobs die without telling anyone (timeouts, preemption, OOM kills). The
store itself is the truth for what finished: a cell is *done* when its record says ok, *failed*
when its record holds an error. For what did not finish, the scheduler is asked: a cell held by
a live job of a launch (its claim file, :mod:`harness.cluster.claims`) is *running* or *queued*
as ``squeue`` says of that job; a cell the sweep planned (``sweep_manifest.json``, written by
:mod:`harness.sweep` at launch) that has no record and no live job is *pending*. Re-launching
the same command runs exactly the failed and pending cells (queued and running ones are left
to their jobs).

A cell file that cannot be read (truncated, corrupt, or a parquet of another schema) is
counted as *failed* (the next launch runs that cell again and its new file replaces the bad
one) and named, one line each, under "problems"; nothing in the store stops the report.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from harness.records import STATUS_FAILED, STATUS_OK, cell_files, scan_store
from harness.sweep import MANIFEST, read_manifest


@dataclass
class SweepStatus:
    """Counts of one sweep folder, and the failed cells with their errors."""

    sweep: str
    done: int = 0
    failed: int = 0
    pending: int = 0
    queued: int = 0  # held by a pending job of the scheduler
    running: int = 0  # held by a running job
    scheduler_note: str = ""  # why queued/running could not be read, "" when they could
    errors: dict[str, str] = field(default_factory=dict)  # cell_id -> error (first line)
    pending_ids: list[str] = field(default_factory=list)
    # unreadable or foreign cell files (counted in ``failed``): file name -> reason
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def cells(self) -> int:
        return self.done + self.failed + self.queued + self.running + self.pending


def sweep_status(folder: Path) -> SweepStatus:
    """Status of the sweep stored in ``folder`` (RESULTS_DIR/<sweep>)."""
    result = SweepStatus(folder.name)
    scan = scan_store(folder.parent, folder.name)
    recorded = {p.stem for p in scan.files} | {p.stem for p, _ in scan.problems}
    for path, reason in scan.problems:
        _count_problem(result, path, reason)
    for path in scan.files:
        try:
            table = pq.read_table(path, columns=["status", "error"])
        except Exception as err:  # a footer that reads but data that does not
            _count_problem(result, path, f"unreadable data: {type(err).__name__}: {err}")
            continue
        statuses = table.column("status").to_pylist()
        if STATUS_FAILED in statuses or not statuses:
            result.failed += 1
            errors = [e for e in table.column("error").to_pylist() if e]
            result.errors[path.stem] = (errors[0].strip().splitlines() or [""])[0] if errors else ""
        elif all(s == STATUS_OK for s in statuses):
            result.done += 1
    result.pending_ids = sorted(set(read_manifest(folder / MANIFEST)) - recorded)
    result.pending = len(result.pending_ids)
    _count_live(result, folder)
    return result


def _count_live(result: SweepStatus, folder: Path) -> None:
    """Move cells held by live jobs from failed / pending to running / queued."""
    from harness.cluster.claims import SchedulerUnavailable, held_cells

    try:
        held = held_cells(folder.parent, folder.name, forget=False)
    except SchedulerUnavailable as err:
        result.scheduler_note = f"{result.sweep}: queued/running unknown ({err})"
        return
    pending = set(result.pending_ids)
    for cid, hold in held.items():
        if cid in result.errors:
            result.failed -= 1
            del result.errors[cid]
        elif cid in pending:
            result.pending -= 1
            pending.discard(cid)
        else:
            continue  # done (a job still finishing after its cell was written)
        if hold.running:
            result.running += 1
        else:
            result.queued += 1
    result.pending_ids = sorted(pending)


def _count_problem(result: SweepStatus, path: Path, reason: str) -> None:
    """A problem file is a failed cell: the next launch runs it again."""
    result.failed += 1
    result.problems[path.name] = (reason.strip().splitlines() or [""])[0]


def store_status(results_dir: str | Path, sweep: str | None = None) -> list[SweepStatus]:
    """Status of every sweep under ``results_dir`` (folders starting with '.' are logs)."""
    root = Path(results_dir)
    folders = [root / sweep] if sweep else sorted(p for p in root.iterdir() if p.is_dir())
    return [
        sweep_status(p)
        for p in folders
        if not p.name.startswith(".") and ((p / MANIFEST).exists() or cell_files(root, p.name))
    ]


COLUMNS = ("cells", "done", "failed", "queued", "running", "pending")


def format_table(rows: list[SweepStatus]) -> str:
    """A fixed-width table, one line per sweep plus a total."""
    width = max([len(r.sweep) for r in rows] + [5])
    lines = [f"{'sweep':<{width}}  " + "  ".join(f"{c:>7}" for c in COLUMNS)]
    for r in rows:
        lines.append(f"{r.sweep:<{width}}  " + "  ".join(f"{getattr(r, c):>7}" for c in COLUMNS))
    if len(rows) > 1:
        total = [sum(getattr(r, k) for r in rows) for k in COLUMNS]
        lines.append(f"{'total':<{width}}  " + "  ".join(f"{n:>7}" for n in total))
    notes = [r.scheduler_note for r in rows if r.scheduler_note]
    return "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kbit-status``; exit 0 when every cell is done, 1 otherwise (failed,
    queued, running or pending cells), 2 on bad input."""
    parser = argparse.ArgumentParser(prog="kbit-status", description=__doc__.splitlines()[0])
    parser.add_argument(
        "results_dir", metavar="RESULTS_DIR", help="the store (kbit-run's results_dir)"
    )
    parser.add_argument("--sweep", help="only this sweep (a subfolder of RESULTS_DIR)")
    parser.add_argument("--errors", action="store_true", help="list failed cells with their errors")
    args = parser.parse_args(argv)
    root = Path(args.results_dir)
    if not root.is_dir():
        print(f"kbit-status: RESULTS_DIR={str(root)!r} is not a folder", file=sys.stderr)
        return 2
    if args.sweep and not (root / args.sweep).is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        print(
            f"kbit-status: no sweep {args.sweep!r} in {str(root)!r}; sweeps there: {known}",
            file=sys.stderr,
        )
        return 2
    rows = store_status(root, args.sweep)
    if not rows:
        print(f"no sweeps in {str(root)!r}")
        return 0
    print(format_table(rows))
    problems = format_problems(rows)
    if problems:
        print(problems)
    for row in rows if args.errors else []:
        for cid, err in sorted(row.errors.items()):
            print(f"{row.sweep}/{cid}: {err}")
    return 0 if all(r.done == r.cells for r in rows) else 1


def format_problems(rows: list[SweepStatus]) -> str:
    """The unreadable cell files, one line each ("" when there are none); always shown,
    since a person has to see them (a re-launch runs their cells again)."""
    lines = [
        f"{row.sweep}/{name}: {reason}"
        for row in rows
        for name, reason in sorted(row.problems.items())
    ]
    if not lines:
        return ""
    head = (
        f"problems: {len(lines)} unreadable cell file(s), counted as failed "
        "(re-launching the sweep runs these cells again):"
    )
    return "\n".join([head, *lines])


if __name__ == "__main__":
    sys.exit(main())
