"""Plan a sweep: validate every cell before anything is queued, and say what is left to run.

A planned grid (:func:`plan_sweep`) goes through, cell by cell (the expansion and the
composition are :mod:`harness.sweep.expand` and :mod:`harness.sweep.compose`):

============  ===========================================================================
validate      ``harness.run.execute.validate_cell`` on each cell (dtype/bits legal, model and data
              reachable), results folder writable; all problems reported in ONE line
deduplicate   cells with the same ``cell_id`` (e.g. the 16-bit baseline under every data
              type) run once; two jobs never write the same file
live jobs     the scheduler says which cells live jobs of an earlier launch hold, BEFORE the
              store is read: a cell finishing in between is held or done, never re-run
resume        cells whose record says ``ok`` are skipped; ``failed`` ones are queued again
============  ===========================================================================

The plan is logged as ``cells in total, done, failed, to run`` and, once the launch is not
refused, recorded in ``RESULTS_DIR/<sweep>/sweep_manifest.json`` (so ``kbit-status`` can count
pending cells). A refused sweep is one line (:class:`SweepError` with ``refused``), exit 2,
and writes nothing. The sweeper that runs these steps is :mod:`harness.sweep.sweeper`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness.cluster.cells import cell_meta
from harness.config.identity import LOCAL, Target
from harness.files import atomic_write, user_path, writable_dir_problem
from harness.records import STATUS_FAILED, STATUS_OK, cell_path, cell_status
from harness.store_cli import MANIFEST_NAME as MANIFEST
from harness.store_cli import read_manifest
from harness.sweep.compose import CellComposer
from harness.sweep.errors import SweepError

log = logging.getLogger(__name__)

MAX_PROBLEMS_SHOWN = 12  # problems logged one per line (stdout) when a grid is refused
PROBLEMS_IN_LINE = 3  # of which the refusal's one line (stderr) names the first ones
# read_manifest and MANIFEST are this module's names too: the manifest's writer and its
# readers (kbit-status) share one definition (harness.store_cli)
__all__ = [
    "MANIFEST",
    "MAX_PROBLEMS_SHOWN",
    "PROBLEMS_IN_LINE",
    "Cell",
    "SweepError",
    "SweepPlan",
    "manifest_unless_refused",
    "pinned_numerics",
    "plan_sweep",
    "raise_on_problems",
    "read_manifest",
    "read_statuses",
    "results_dir_problem",
    "write_manifest",
]


@dataclass
class Cell:
    """One planned grid cell: the overrides its job gets, and what the store knows about it."""

    overrides: list[str]
    cell_id: str = ""
    sweep: str = ""
    results_dir: str = ""
    status: str | None = None  # ok | failed | None (no record yet)
    # what packing needs without composing again: model, zoo_dir, trust_remote_code,
    # device_class, compute_dtype, tokens (see harness.cluster.cells.cell_meta)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepPlan:
    """The validated grid: unique cells, problems found, and duplicates dropped."""

    cells: list[Cell] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    duplicates: int = 0
    invalid: int = 0  # cells with a problem (not in ``cells``)
    # (results_dir, sweep, cell_id) -> the live job of an earlier launch holding the cell (cells
    # without an ok record; asked before the store was read: see plan_sweep's ``live``)
    held: dict[tuple[str, str, str], Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Cells in total, done, failed and to run: the summary printed before launching."""
        done = sum(c.status == STATUS_OK for c in self.cells)
        failed = sum(c.status == STATUS_FAILED for c in self.cells)
        return {
            "total": len(self.cells),
            "done": done,
            "failed": failed,
            "to_run": len(self.cells) - done,
        }

    def to_run(self) -> list[Cell]:
        """Cells without an ok record, in grid order (failed ones are retried)."""
        return [c for c in self.cells if c.status != STATUS_OK]

    def summary(self) -> str:
        names = sorted({c.sweep for c in self.cells}) or ["?"]
        n = self.counts()
        dup = f" ({self.duplicates} duplicate cells merged)" if self.duplicates else ""
        bad = f", {self.invalid} invalid" if self.invalid else ""
        return (
            f"sweep {', '.join(names)}: {n['total'] + self.invalid} cells in total{dup}: "
            f"{n['done']} done, {n['failed']} failed, {n['to_run']} to run{bad}"
        )


def results_dir_problem(folder: str | os.PathLike) -> str | None:
    """Why cell files cannot be written under ``folder`` (None when they can); creates nothing."""
    return writable_dir_problem(folder)


def pinned_numerics(cfg: DictConfig, resolved: Any) -> list[str]:
    """Overrides that pin ``auto`` numerics to what the plan resolved, so the job computes
    the same cell id (and fails loudly, not silently on a CPU, if its node has no GPU)."""
    pins = []
    if str(cfg.get("device", "")) == "auto" and getattr(resolved, "device_class", None):
        pins.append(f"device={resolved.device_class}")
    if str(cfg.get("compute_dtype", "")) == "auto" and getattr(resolved, "compute_dtype", None):
        pins.append(f"compute_dtype={resolved.compute_dtype}")
    return pins


def _default_hooks(target: Target) -> tuple[Callable[..., str], Callable[[DictConfig], Any]]:
    """``harness.config.identity.cell_id`` and ``harness.run.execute.validate_cell`` for ``target``
    (imported late: heavy imports)."""
    from harness.config.identity import cell_id
    from harness.run.execute import validate_cell

    return cell_id, lambda cfg: validate_cell(cfg, target)


def plan_sweep(
    grid: Sequence[Sequence[str]],
    compose: Callable[[Sequence[str]], DictConfig],
    cell_id: Callable[..., str] | None = None,
    validate: Callable[[DictConfig], Any] | None = None,
    target: Target = LOCAL,
    live: Callable[[Sequence[Cell]], dict[tuple[str, str, str], Any]] | None = None,
) -> SweepPlan:
    """Compose, validate, deduplicate and look up every cell of ``grid``.

    ``validate(cfg)`` raises for a bad cell and may return the cell's resolved numerics and
    data sources, which are then passed to ``cell_id(cfg, resolved)`` and pinned into the
    job's overrides. Problems are collected (grouped by message, with a count and one example
    cell) so the user fixes them all in one round instead of one per launch.

    With the default hooks and a :class:`CellComposer`, cells are planned by
    :func:`_fast_outcome` (the same ids, problems and pins, a few hundred times faster).

    ``live(cells)`` (e.g. :func:`harness.cluster.jobs.held_by_live_jobs`) says which cells
    live jobs of an earlier launch hold; it is asked BEFORE the store is read (when the grid
    has no problem), so a cell whose job finishes between the two reads is either held or
    done, never planned to run again. Its holds of cells without an ok record are
    ``plan.held``. It alone may raise: a :class:`SweepError` (refused) when the scheduler
    cannot say what its live jobs hold.
    """
    outcome = None
    if cell_id is None and validate is None:
        outcome = _fast_outcome(compose, target)
    if outcome is None:
        if cell_id is None or validate is None:
            default_id, default_validate = _default_hooks(target)
            cell_id, validate = cell_id or default_id, validate or default_validate
        outcome = _outcome(compose, cell_id, validate)
    plan, seen = SweepPlan(), set()
    problems: OrderedDict[str, list[Sequence[str]]] = OrderedDict()
    described: dict[int, tuple[BaseException, str]] = {}
    dirs: dict[tuple[str, str], str | None] = {}
    for overrides in _progress(grid):
        try:
            cid, results_dir, sweep, pins, meta = outcome(overrides)
        except Exception as err:  # every problem is reported, not only the first
            if described.get(id(err), (None,))[0] is not err:  # a kept refusal: described once
                described[id(err)] = (err, _describe(err))
            problems.setdefault(described[id(err)][1], []).append(overrides)
            continue
        if (results_dir, sweep) not in dirs:
            dirs[results_dir, sweep] = results_dir_problem(Path(results_dir) / sweep)
        if dirs[results_dir, sweep]:
            problems.setdefault(str(dirs[results_dir, sweep]), []).append(overrides)
            continue
        if (sweep, cid) in seen:
            plan.duplicates += 1
            continue
        seen.add((sweep, cid))
        plan.cells.append(Cell([*overrides, *pins], cid, sweep, results_dir, None, meta()))
    plan.invalid = sum(len(cells) for cells in problems.values())
    plan.problems = [
        f"{msg}  [{len(cells)} cell(s), e.g. {' '.join(cells[0])}]"
        for msg, cells in problems.items()
    ]
    held: dict[tuple[str, str, str], Any] = {}
    if live is not None and plan.cells and not plan.problems:
        try:  # the scheduler first ...
            held = dict(live(plan.cells))
        except ValueError as err:  # harness.cluster.jobs.JobsError: whether they run is unknown
            raise SweepError(
                f"Sweep not launched (nothing was queued or written): {err}", refused=True
            ) from None
    read_statuses(plan.cells)  # ... then the store
    ok = {(c.results_dir, c.sweep, c.cell_id) for c in plan.cells if c.status == STATUS_OK}
    plan.held = {k: v for k, v in held.items() if k not in ok}
    return plan


def read_statuses(cells: Sequence[Cell]) -> None:
    """Set each cell's ``status`` from the store (ok | failed | None): each sweep folder is
    listed once, and only a cell file that is there is read."""
    listings: dict[tuple[str, str], frozenset[str] | None] = {}
    for cell in cells:
        cell.status = _status(cell.results_dir, cell.sweep, cell.cell_id, listings)


_Outcome = tuple[str, str, str, list[str], Callable[[], dict[str, Any]]]


def _outcome(
    compose: Callable[[Sequence[str]], DictConfig],
    cell_id: Callable[..., str],
    validate: Callable[[DictConfig], Any],
) -> Callable[[Sequence[str]], _Outcome]:
    """One cell at a time: compose, validate, cell id (the reference the fast path matches)."""

    def outcome(overrides: Sequence[str]) -> _Outcome:
        cfg = compose(overrides)
        resolved = validate(cfg)
        cid = cell_id(cfg) if resolved is None else cell_id(cfg, resolved)
        results_dir, sweep = _results_path(cfg.results_dir), str(cfg.sweep)
        pins = pinned_numerics(cfg, resolved)
        return cid, results_dir, sweep, pins, lambda: cell_meta(cfg, resolved)

    return outcome


def _results_path(value: Any) -> str:
    """The results folder a cell's job writes: ``~`` and ``$VAR`` expanded as validation
    expanded them (:func:`harness.files.user_path`), so the store is read where it is written."""
    try:
        return str(user_path(str(value), "results_dir"))
    except ValueError:  # not validated (a test's stub hooks): the value as given
        return str(value)


class _Fields(dict):
    """A cell's plain data with attribute access (``cell.model``), as code reading configs
    expects (:func:`harness.cluster.cells.cell_meta`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _fast_outcome(
    compose: Callable[[Sequence[str]], DictConfig], target: Target
) -> Callable[[Sequence[str]], _Outcome] | None:
    """The default hooks for a :class:`CellComposer`'s cells, without composing each cell.

    A cell is taken as plain data (:meth:`CellComposer.plain`) and validated by one
    :class:`harness.run.execute.CellValidator` for the whole plan (each check once per distinct
    input, on the real config); a cell the shortcut does not cover is composed and validated
    as :func:`_outcome` does. None when ``compose`` is not a CellComposer's.
    """
    composer = getattr(compose, "__self__", None)
    if not isinstance(composer, CellComposer) or compose.__func__ is not CellComposer.compose:
        return None
    from harness.config.identity import cell_id
    from harness.run.execute import CellValidator, validate_cell

    validator = CellValidator(target)
    slow = _outcome(compose, cell_id, lambda cfg: validate_cell(cfg, target))

    def outcome(overrides: Sequence[str]) -> _Outcome:
        cell = composer.plain(overrides)
        if cell is None:
            return slow(overrides)
        resolved, cid = validator(cell, lambda: composer.compose(overrides))
        results_dir, sweep = _results_path(cell["results_dir"]), str(cell["sweep"])
        pins = pinned_numerics(cell, resolved)
        return cid, results_dir, sweep, pins, lambda: cell_meta(_Fields(cell), resolved)

    return outcome


def _status(results_dir: str, sweep: str, cid: str, listings: dict) -> str | None:
    """``cell_status`` of the cell's file; the sweep folder is listed once per plan, and only
    a file that is there is read (a cell without a file has no status)."""
    if (results_dir, sweep) not in listings:
        try:
            listings[results_dir, sweep] = frozenset(os.listdir(Path(results_dir) / sweep))
        except (FileNotFoundError, NotADirectoryError):
            listings[results_dir, sweep] = frozenset()
        except OSError:  # e.g. a folder that can be searched but not listed: ask per file
            listings[results_dir, sweep] = None
    path = cell_path(results_dir, sweep, cid)
    names = listings[results_dir, sweep]
    return cell_status(path) if names is None or path.name in names else None


def _describe(err: BaseException) -> str:
    """One line per problem, the same line a single ``kbit-run`` of that cell would print."""
    from harness.config.refusals import input_error_line

    line = input_error_line(err)
    if line is not None:
        return line
    text = str(err).strip() or type(err).__name__
    if "\n" in text and not isinstance(err, ValueError):
        text = text.splitlines()[0]
    return f"{type(err).__name__}: {text}" if not isinstance(err, ValueError | KeyError) else text


def _progress(items: Sequence[Any]) -> Any:
    if len(items) < 500:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="validating cells", unit="cell", mininterval=2.0)


def raise_on_problems(plan: SweepPlan, n_cells: int) -> None:
    """Refuse a plan with problems (or a grid of no cells) in one line; nothing has been
    queued or written yet.

    The line names the first :data:`PROBLEMS_IN_LINE` problems (field, value, what is allowed,
    how many cells share it, one example cell) and how many more there are; when there are
    several, each is also logged on its own line (stdout), so all can be fixed in one round.
    """
    if n_cells == 0:
        raise SweepError(
            "Sweep not launched (nothing was queued or written): the grid has no cells; allowed: "
            "at least one value for every swept field (hydra.sweeper.params, grids, the command "
            "line)",
            refused=True,
        )
    if not plan.problems:
        return
    for i, problem in enumerate(plan.problems[:MAX_PROBLEMS_SHOWN] if len(plan.problems) > 1
                                else [], 1):  # fmt: skip
        log.error("problem %d of %d: %s", i, len(plan.problems), problem)
    if len(plan.problems) > MAX_PROBLEMS_SHOWN:
        log.error("... and %d more problem(s)", len(plan.problems) - MAX_PROBLEMS_SHOWN)
    shown = plan.problems[:PROBLEMS_IN_LINE]
    more = len(plan.problems) - len(shown)
    rest = f" | and {more} more problem(s), each logged above" if more else ""
    raise SweepError(
        f"Sweep not launched (nothing was queued or written): {len(plan.problems)} problem(s) "
        f"in a grid of {n_cells} cells ({plan.invalid} refused): {' | '.join(shown)}{rest}",
        refused=True,
    )


def write_manifest(plan: SweepPlan) -> list[Path]:
    """Record the planned cell ids per sweep (merged with earlier launches) for kbit-status."""
    written = []
    by_sweep: dict[tuple[str, str], list[Cell]] = {}
    for cell in plan.cells:
        by_sweep.setdefault((cell.results_dir, cell.sweep), []).append(cell)
    for (results_dir, sweep), cells in by_sweep.items():
        path = Path(results_dir) / sweep / MANIFEST
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = read_manifest(path)
        entries.update({c.cell_id: " ".join(c.overrides) for c in cells})
        body = {
            "sweep": sweep,
            "updated_at": datetime.now(timezone.utc).isoformat(),
            "cells": entries,
        }
        atomic_write(path, json.dumps(body, indent=0, sort_keys=True))
        written.append(path)
    return written


@contextlib.contextmanager
def manifest_unless_refused(plan: SweepPlan) -> Iterator[list[Path]]:
    """Write the plan's manifest for a launch, and take it back if the launch is refused.

    Why both: ``kbit-status`` counts a sweep's queued and running cells through the manifest,
    so it is written before the launcher submits and waits; a submission the scheduler
    refuses (:class:`SweepError` with ``refused``: nothing was queued) must leave the store as
    it was, so the manifests (and folders) this wrote are restored. A launch that queued
    anything keeps them.
    """
    before: dict[Path, bytes | None] = {}
    created: list[Path] = []
    for path in _manifest_paths(plan):
        before[path] = path.read_bytes() if path.is_file() else None
        missing = path.parent
        while not missing.exists() and missing != missing.parent:
            created.append(missing)
            missing = missing.parent
    written = write_manifest(plan)
    try:
        yield written
    except SweepError as err:
        if err.refused:
            for path, body in before.items():
                with contextlib.suppress(OSError):
                    if body is None:
                        path.unlink(missing_ok=True)
                    else:
                        atomic_write(path, body.decode())
            for folder in sorted(set(created), key=lambda f: len(f.parts), reverse=True):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty: anything else written there stays
        raise


def _manifest_paths(plan: SweepPlan) -> list[Path]:
    folders = OrderedDict(((c.results_dir, c.sweep), None) for c in plan.cells)
    return [Path(results_dir) / sweep / MANIFEST for results_dir, sweep in folders]
