"""``kbit-status RESULTS_DIR``: done / failed / queued / running / pending cells per sweep.

Why: on a cluster, jobs die without telling anyone (timeouts, preemption, OOM kills). The
store itself is the truth for what finished: a cell is *done* when its record says ok, *failed*
when its record holds an error. For what did not finish, the scheduler is asked: a cell held by
a live job of a launch (its claim file, :mod:`harness.cluster.leases`) is *running* or *queued*
as ``squeue`` says of that job; a cell the sweep planned (``sweep_manifest.json``, written by
:mod:`harness.sweep.plan` at launch) that has no record and no live job is *pending*. Re-launching
the same command runs exactly the failed and pending cells (queued and running ones are left
to their jobs).

A cell file that cannot be read (truncated, corrupt, or a parquet of another schema) is
counted as *failed* (the next launch runs that cell again and its new file replaces the bad
one) and named, one line each, under "problems"; nothing in the store stops the report.

Speed: each sweep folder is listed once; a cell file is opened only when the sweep's index
(:mod:`harness.store_index`) has no line matching its current size and mtime (20,000 cells in
under a second; ``benchmarks/status_bench.py``). Bad input (a missing folder, an empty store,
a bad ``--sweep``) is refused in one line, exit 2, by the rule of :mod:`harness.store_cli`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from harness import store_index
from harness.records import (
    STATUS_FAILED,
    STATUS_OK,
    cell_entries,
    cell_stats,
    map_files,
    reason_line,
    schema_problem,
    summarize_cell,
)
from harness.store_cli import MANIFEST_NAME as MANIFEST
from harness.store_cli import (
    OneLineParser,
    StoreRefusal,
    check_store,
    parse_or_exit,
    read_manifest,
    refuse,
)


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
    """Status of the sweep stored in ``folder`` (RESULTS_DIR/<sweep>).

    A cell file is opened only when the sweep's index (:mod:`harness.store_index`) has no
    entry matching its current size and mtime; the rest is one directory listing with a
    ``stat`` per file. Files read here get an index entry (best effort), so the next call
    opens none of them.
    """
    result = SweepStatus(folder.name)
    files, odd = cell_stats(folder)
    for path, reason in odd:
        _count_problem(result, path, reason)
    index = store_index.read(folder)
    unread: list[Path] = []
    for name, st in files:
        cid = name[: -len(".parquet")]
        entry = index.get(cid)
        if entry is not None and entry.matches(st):
            _count(result, cid, entry.state, entry.error)
        else:
            unread.append(folder / name)
    outcomes = map_files(_read_outcome, unread)
    for path, (state, text, problem) in zip(unread, outcomes, strict=True):
        if problem:
            _count_problem(result, path, problem)
        else:
            _count(result, path.stem, state, text)
    recorded = {name[: -len(".parquet")] for name, _ in files} | {p.stem for p, _ in odd}
    result.pending_ids = sorted(set(read_manifest(folder / MANIFEST)) - recorded)
    result.pending = len(result.pending_ids)
    _count_live(result, folder)
    return result


def _count(result: SweepStatus, cell_id: str, state: str, error: str) -> None:
    if state == STATUS_FAILED:
        result.failed += 1
        result.errors[cell_id] = error
    elif state == STATUS_OK:
        result.done += 1


def _read_outcome(path: Path) -> tuple[str, str, str | None]:
    """(state, first error line, problem or None) of one cell file, read through one open
    descriptor whose ``fstat`` goes into the index with the outcome (so the entry describes
    exactly the bytes read)."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            pf = pq.ParquetFile(fh)
            problem = schema_problem(pf.schema_arrow)
            if problem:
                return "", "", problem
            table = pf.read(columns=["status", "error"])
    except Exception as err:  # truncated, empty, random bytes, unreadable: all one outcome
        return "", "", reason_line(f"unreadable parquet: {type(err).__name__}: {err}")
    state, error = summarize_cell(
        table.column("status").to_pylist(), table.column("error").to_pylist()
    )
    store_index.append(path.parent, path.stem, state, error, st.st_size, st.st_mtime_ns)
    return state, error, None


def _count_live(result: SweepStatus, folder: Path) -> None:
    """Move cells held by live jobs from failed / pending to running / queued."""
    from harness.cluster.leases import (
        SchedulerUnavailable,
        ended_task_errors,
        held_cells,
        read_claims,
        scheduler_states,
    )

    try:  # the scheduler is asked once, for the live holds and for the ended tasks' errors
        states = scheduler_states() if read_claims(folder.parent, folder.name) else {}
        held = held_cells(folder.parent, folder.name, states, forget=False)
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
    # a task that died before its cells wrote anything: its log's error line, not "pending" alone
    for cid, line in ended_task_errors(folder.parent, folder.name, states).items():
        if cid in pending:
            result.errors[cid] = f"(no record) {line}"


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
        if not p.name.startswith(".") and ((p / MANIFEST).exists() or _has_entries(p))
    ]


def _has_entries(folder: Path) -> bool:
    """Whether ``folder`` holds anything named like a cell file (FIFOs too: they are named)."""
    files, odd = cell_entries(folder.parent, folder.name)
    return bool(files or odd)


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
    queued, running or pending cells), 2 on bad input (one line: a missing folder, a bad
    ``--sweep``, an empty store; :mod:`harness.store_cli`)."""
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "results_dir", metavar="RESULTS_DIR", help="the store (kbit-run's results_dir)"
    )
    parser.add_argument("--sweep", help="only this sweep (a subfolder of RESULTS_DIR)")
    parser.add_argument("--errors", action="store_true", help="list failed cells with their errors")
    args = parse_or_exit(parser, argv)
    if isinstance(args, int):
        return args
    try:
        root = check_store(args.results_dir, None if args.sweep is None else [args.sweep],
                           planned_counts=True)  # fmt: skip
    except StoreRefusal as err:
        return refuse(PROG, err)
    rows = store_status(root, args.sweep)
    print(format_table(rows))
    problems = format_problems(rows)
    if problems:
        print(problems)
    for row in rows if args.errors else []:
        for cid, err in sorted(row.errors.items()):
            print(f"{row.sweep}/{cid}: {err}")
    return 0 if all(r.done == r.cells for r in rows) else 1


PROG = "kbit-status"


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
