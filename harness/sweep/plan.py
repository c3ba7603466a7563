"""Sweeps: expand a grid, validate every cell before anything is queued, launch only what is left.

Why a sweeper and not only a callback: a grid of tens of thousands of cells on a cluster where
jobs time out and crash must (1) fail before a single job is queued when any cell is wrong,
(2) never queue a cell that is already done, and (3) never queue two jobs that write the same
cell file. Hydra's basic sweeper launches every combination as given; :class:`KbitSweeper`
(``hydra/sweeper=kbit``, selected by every overlay in ``sweeps/``) is the basic sweeper plus a
planning step:

============  ===========================================================================
check         the sweeper's own settings: an unknown key (``params`` misspelt, a
              ``jobs``/``resources`` key) is named with its file and the closest keys
count         the grid's size from its dimensions, without expanding it: a grid with no
              cells, or above ``hydra.sweeper.max_cells``, is refused at once
expand        cartesian product of ``hydra.sweeper.params`` and the command line, with the
              model as the slowest-varying dimension (in-process launches reuse the model)
compose       every cell's config, as the job will see it (composed once per combination of
              config-group choices, then value overrides applied: fast for 35,000 cells)
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
and writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, RangeSweep
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from harness.cluster.jobs import cell_meta
from harness.config.identity import LOCAL, Target
from harness.config.overrides import check_overrides
from harness.config.schema import ConfigError
from harness.files import atomic_write, user_path, writable_dir_problem
from harness.records import STATUS_FAILED, STATUS_OK, cell_path, cell_status
from harness.store_cli import MANIFEST_NAME as MANIFEST
from harness.store_cli import read_manifest

log = logging.getLogger(__name__)

MAX_PROBLEMS_SHOWN = 12  # problems logged one per line (stdout) when a grid is refused
PROBLEMS_IN_LINE = 3  # of which the refusal's one line (stderr) names the first ones
# A grid above this many cells is refused before it is expanded (hydra.sweeper.max_cells):
# planning is ~1 ms per cell, and a grid of millions is a typo more often than a plan.
DEFAULT_MAX_CELLS = 100_000
# hydra.sweeper's settings (conf/hydra/sweeper/kbit.yaml); anything else is a typo
SWEEPER_KEYS = ("max_batch_size", "params", "grids", "jobs", "resources", "dry_run", "max_cells")


class SweepError(CompactHydraException):
    """A sweep that cannot run as declared (``refused``: nothing was queued or written, exit 2),
    or whose launched cells did not all finish ok (exit 1)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        if refused:  # a refusal is one line on stderr (README "What a cell guarantees")
            message = one_line(message)
        super().__init__(message)
        self.refused = refused


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined with "; " (e.g. a scheduler's multi-line error)."""
    parts = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(p.rstrip(";") for p in parts) if parts else str(text).strip()


@dataclass
class Cell:
    """One planned grid cell: the overrides its job gets, and what the store knows about it."""

    overrides: list[str]
    cell_id: str = ""
    sweep: str = ""
    results_dir: str = ""
    status: str | None = None  # ok | failed | None (no record yet)
    # what packing needs without composing again: model, zoo_dir, trust_remote_code,
    # device_class, compute_dtype, tokens (see harness.cluster.jobs.cell_meta)
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


def expand_grid(overrides: Sequence[Override]) -> list[list[str]]:
    """Cartesian product of the overrides, as ``key=value`` lists, model varying slowest.

    Hydra's basic sweeper varies the first-given key slowest; the model may come from the
    command line (after the overlay's params), so it is moved to the front explicitly:
    consecutive cells of one model then share its loaded weights in an in-process launch.
    """
    return expand_grid_order(BasicSweeper.split_arguments(list(overrides), max_batch_size=None)[0])


def _value_of(cell: Sequence[str], key: str) -> str | None:
    for item in cell:
        k, _, v = item.partition("=")
        if k.lstrip("+~") == key:
            return v
    return None


_DELETED = object()  # an override's effect: the field is gone (``~key``)


def _frozen(value: Any) -> Any:
    """Plain config data as a hashable value that tells 1, 1.0 and True apart."""
    if isinstance(value, dict):
        return ("dict", tuple((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("list", tuple(_frozen(v) for v in value))
    plain = isinstance(value, str | int | float | bool | None)
    return (type(value), value if plain else repr(value))


class CellComposer:
    """Compose cell configs exactly as each job will, but fast.

    Composing a full Hydra config takes tens of milliseconds; a 35,000-cell grid would take
    minutes. Config-group choices (``dtype=nf4``, ``+sweeps=demo``) need real composition;
    plain values (``bits=4``) are applied to a copy of the composed config the same way Hydra
    applies command-line overrides after composition. Cells are composed once per distinct
    combination of group choices.
    """

    def __init__(self, config_loader: Any, master_config: DictConfig) -> None:
        self.loader = config_loader
        self.master = master_config
        self.parser = OverridesParser.create(config_loader=config_loader)
        self._parsed: dict[str, Override] = {}
        self._composed: dict[tuple[str, ...], DictConfig] = {}
        self._is_group: dict[str, bool] = {}
        # for plain(): group choices -> (composed?, plain data | the error), and
        # (group choices, value overrides of one top-level field) -> their effect (_one_effect)
        self._bases: dict[tuple[str, ...], tuple[bool, Any]] = {}
        self._effects: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[Any, str, Any]] = {}

    def _parse(self, item: str) -> Override:
        if item not in self._parsed:
            self._parsed[item] = self.parser.parse_override(item)
        return self._parsed[item]

    def _group(self, override: Override) -> bool:
        key = override.key_or_group
        if key not in self._is_group:
            repo = getattr(self.loader, "repository", None)
            exists = repo.group_exists(key) if repo is not None else True
            self._is_group[key] = bool(exists) or key.startswith("hydra/")
        return self._is_group[key]

    def compose(self, overrides: Sequence[str]) -> DictConfig:
        """The cell config a job launched with ``overrides`` receives (without ``hydra``)."""
        parsed = [self._parse(o) for o in overrides]
        groups = tuple(o.input_line for o in parsed if self._group(o))
        if groups not in self._composed:
            cfg = self.loader.load_sweep_config(self.master, list(groups))
            with read_write(cfg), open_dict(cfg):
                cfg.pop("hydra", None)
            self._composed[groups] = cfg
        cfg = copy_config(self._composed[groups])
        values = [o for o in parsed if not self._group(o)]
        with read_write(cfg):
            ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        return cfg

    def plain(self, overrides: Sequence[str]) -> dict[str, Any] | None:
        """``OmegaConf.to_container(self.compose(overrides), resolve=True, enum_to_str=True)``
        without composing, or None where that shortcut does not apply (then compose).

        Raises what :meth:`compose` raises. Why it is the same: the group composition is
        resolved to plain data once; the value overrides (``bits=4``, ``eval.limit=5``) of one
        top-level field are applied together, in their order, to a copy of the group
        composition, once per distinct combination, and their effect is the new value of that
        one field (overrides that change any other field, or whose value is an interpolation,
        are not used). Overrides of distinct top-level fields are independent, so a cell is
        the composition's plain data with each field's effect put in.
        """
        parsed = [self._parse(o) for o in overrides]
        groups = tuple(o.input_line for o in parsed if self._group(o))
        base = self._plain_base(groups)
        if base is None:
            return None
        by_top: dict[str, list[Override]] = {}
        for o in parsed:
            if not self._group(o):
                by_top.setdefault(o.key_or_group.split(".")[0], []).append(o)
        effects = [self._effect(groups, top, tuple(os)) for top, os in by_top.items()]
        if any(e[0] is None for e in effects):
            return None
        failed = [e for e in effects if not e[0]]
        if failed:  # the first failing override in the cell's order, as compose raises it
            position = {o.input_line: i for i, o in enumerate(parsed)}
            first = min(failed, key=lambda e: position.get(e[2][0], 0))
            raise first[2][1].with_traceback(None)
        cell = dict(base)
        for _ok, top, value in effects:
            if value is _DELETED:
                cell.pop(top, None)
            else:
                cell[top] = value
        return cell

    def _plain_base(self, groups: tuple[str, ...]) -> dict[str, Any] | None:
        if groups not in self._bases:
            try:
                self.compose(groups)  # composes the group choices (raises as compose does)
            except Exception as exc:
                self._bases[groups] = (False, exc)
            else:
                cfg = self._composed[groups]
                try:
                    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
                except Exception:  # e.g. an unset environment variable: cells find out
                    plain = None
                self._bases[groups] = (True, plain)
        ok, value = self._bases[groups]
        if not ok:
            raise value.with_traceback(None)
        return value

    def _effect(
        self, groups: tuple[str, ...], top: str, overrides: tuple[Override, ...]
    ) -> tuple[Any, str, Any]:
        """(True | False | None, top-level field, new plain value | _DELETED |
        (failing override's input line, its error))."""
        key = (groups, tuple(o.input_line for o in overrides))
        if key not in self._effects:
            self._effects[key] = self._one_effect(groups, top, overrides)
        return self._effects[key]

    def _one_effect(
        self, groups: tuple[str, ...], top: str, overrides: tuple[Override, ...]
    ) -> tuple[Any, str, Any]:
        if any("$" in str(o.input_line) for o in overrides):  # resolved in its cell's context
            return None, top, None
        cfg = copy_config(self._composed[groups])
        for override in overrides:  # one at a time: the failing one is the one compose names
            try:
                with read_write(cfg):
                    ConfigLoaderImpl._apply_overrides_to_config([override], cfg)
            except Exception as exc:
                return False, top, (override.input_line, exc)
        try:
            after = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        except Exception:
            return None, top, None
        before = self._bases[groups][1]
        changed = {k for k in {*before, *after} if k not in before or k not in after
                   or _frozen(before[k]) != _frozen(after[k])}  # fmt: skip
        order = [k for k in after if k != top] == [k for k in before if k != top]
        if not changed <= {top} or not order:
            return None, top, None  # it changed another field, or the order of the fields
        return True, top, after.get(top, _DELETED)


def copy_config(cfg: DictConfig) -> DictConfig:
    """A deep copy of a composed config, node for node (types, flags, interpolations).

    Why not ``copy.deepcopy``: OmegaConf's deepcopy walks every node in Python (~5 ms for a
    cell config); a pickle round trip gives the same nodes in less than half the time, and a
    plan copies the composition once per distinct group choices and check.
    """
    return pickle.loads(pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL))


def results_dir_problem(folder: str | os.PathLike) -> str | None:
    """Why cell files cannot be written under ``folder`` (None when they can); creates nothing."""
    return writable_dir_problem(folder)


def launch_target(launcher: DictConfig | None, resources: Any = None) -> Target:
    """The machine class the launcher's jobs run on, for resolving ``device=auto``.

    Why: a sweep is planned on a login node without a GPU, and its cell ids must be the ones
    the jobs compute on GPU nodes. A submitit launcher (Slurm or local processes) runs on
    GPUs when it asks for them (``gpus_per_node``, ``gpus_per_task`` or a ``gpu`` gres) or
    when the sweep's per-model resource rule (``hydra.sweeper.resources``, ``resources``
    here) gives its jobs GPUs: the rule asks for at least one GPU per job unless its
    ``device`` is ``cpu``. The in-process launcher runs here.
    """
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    if not any(name in target for name in ("submitit", "kbit_launcher")):
        return LOCAL
    gpus = [launcher.get(k) for k in ("gpus_per_node", "gpus_per_task")]
    asks = any(_positive(g) for g in gpus) or "gpu" in str(launcher.get("gres") or "")
    if resources is not None and not asks:
        rule = dict(_plain(resources) or {}) if not isinstance(resources, dict) else resources
        asks = str(rule.get("device", "cuda")) != "cpu"
    return Target(cuda_available=asks)


def _positive(count: Any) -> bool:
    """A GPU count as submitit takes it (an int, or a string such as "2")."""
    if isinstance(count, bool) or count is None:
        return False
    if isinstance(count, int):
        return count > 0
    return str(count).strip() not in ("", "0")


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
    expects (:func:`harness.cluster.jobs.cell_meta`)."""

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


def expand_union(
    parser: OverridesParser,
    params: dict[str, str],
    grids: Sequence[dict[str, str]] | None,
    arguments: Sequence[str],
    max_cells: int | None = None,
) -> list[list[str]]:
    """The union over ``grids`` of product(params x grid x command line), model slowest.

    Why: a grid of every data type at every bit width contains illegal cells (nf4 exists only
    at 4 bits), and the baselines are one bit width for all types; a union of products says
    exactly what to run. Command-line overrides apply to every part (and win over both).

    Refused (:class:`SweepError`, one line) before anything is expanded: a value that does not
    parse, a grid part with no cells (a swept field with no values), and a grid of more than
    ``max_cells`` cells (counted from its dimensions: a grid of millions is refused at once).
    """
    parts = _grid_parts(parser, params, grids, arguments)
    total = 0
    for where, overrides in parts:
        size, empty = _part_size(overrides)
        if empty:
            origin = "the command line" if empty[0].input_line in arguments else where
            raise SweepError(
                f"Sweep not launched (nothing was queued or written): the grid has no cells: "
                f"{empty[0].input_line} ({origin}) has no values; allowed: at least one value "
                "for every swept field",
                refused=True,
            )
        total += size
    if max_cells is not None and total > max_cells:
        raise SweepError(
            f"Sweep not launched (nothing was queued or written): the grid has {total:,} cells, "
            f"above hydra.sweeper.max_cells={max_cells}; allowed: at most {max_cells:,} cells per "
            "launch: split the sweep (e.g. one launch per model), or raise "
            "hydra.sweeper.max_cells (null: no cap)",
            refused=True,
        )
    cells: list[list[str]] = []
    for _where, overrides in parts:
        cells += expand_grid(overrides)
    return expand_grid_order(cells)


def _grid_parts(
    parser: OverridesParser,
    params: dict[str, str],
    grids: Sequence[dict[str, str]] | None,
    arguments: Sequence[str],
) -> list[tuple[str, list[Override]]]:
    """Each part of the union as parsed overrides, and where it comes from (for messages)."""
    parts: list[tuple[str, list[Override]]] = []
    for i, part in enumerate(grids or [{}]):
        merged = {**params, **{str(k): str(v) for k, v in dict(part).items()}}
        listed = [f"{k}={v}" for k, v in merged.items()]
        where = f"hydra.sweeper.grids[{i}] with params" if grids else "hydra.sweeper.params"
        try:
            overrides = parser.parse_overrides([*listed, *arguments])
        except Exception as err:  # Hydra's override grammar: one line naming the value
            raise SweepError(
                f"Sweep not launched (nothing was queued or written): {where} or the command "
                f"line: {err}",
                refused=True,
            ) from None
        for o in overrides:
            if o.is_sweep_override() and not o.is_discrete_sweep():
                raise SweepError(
                    f"Sweep not launched (nothing was queued or written): {o.input_line}: an "
                    "interval is not a grid; allowed: a list a,b,c, range(...), choice(...) or "
                    "glob(...)",
                    refused=True,
                )
        try:  # the rules kbit-run applies to its command line, for values a sweep file sets
            check_overrides([o.input_line for o in overrides])
        except ConfigError as err:
            raise SweepError(
                f"Sweep not launched (nothing was queued or written): {where}: {err}",
                refused=True,
            ) from None
        parts.append((where if grids or params else "the command line", overrides))
    return parts


def _part_size(overrides: Sequence[Override]) -> tuple[int, list[Override]]:
    """Cells of product(overrides) as Hydra's basic sweeper expands it (a key given twice:
    the last wins), counted without expanding; and the sweeps that have no value."""
    dims: dict[str, tuple[int, Override]] = {}
    for o in overrides:
        dims[o.get_key_element()] = (_values_count(o), o)
    size = math.prod(n for n, _ in dims.values())
    return size, [o for n, o in dims.values() if n == 0]


def _values_count(override: Override) -> int:
    """How many values a (discrete) override sweeps: a range arithmetically (a range of a
    billion values is counted, not listed), anything else by listing it."""
    if not override.is_sweep_override():
        return 1
    value = override.value()
    if isinstance(value, RangeSweep) and not all(
        isinstance(x, int) for x in (value.start, value.stop, value.step)
    ):
        n = math.ceil((value.stop - value.start) / value.step) if value.step else 0
        if n > 1_000_000:  # float steps: listing a million values would stall the check
            return n
    elif isinstance(value, RangeSweep):
        return len(range(int(value.start), int(value.stop), int(value.step or 1)))
    return sum(1 for _ in override.sweep_string_iterator())


def expand_grid_order(cells: list[list[str]]) -> list[list[str]]:
    """Stable re-ordering of cells so each model's cells are contiguous (first-seen order)."""
    models: OrderedDict[str, int] = OrderedDict()
    for cell in cells:
        models.setdefault(_value_of(cell, "model") or "", len(models))
    return sorted(cells, key=lambda cell: models[_value_of(cell, "model") or ""])


def check_sweeper_settings(sweeper: Any, config: DictConfig) -> None:
    """Refuse (one line) a ``hydra.sweeper`` key that is not a setting, in the sweeper or in
    its ``jobs``/``resources`` dicts, naming the key, where it was given (the sweep file or
    the command line) and the closest allowed keys; and settings of the wrong type."""
    from harness.names import did_you_mean

    def refuse(key: str, allowed: Sequence[str]) -> None:
        raise SweepError(
            f"Sweep not launched (nothing was queued or written): hydra.sweeper.{key} "
            f"({setting_source(config, key)}) is not a setting; allowed: {', '.join(allowed)}"
            f"{did_you_mean(key.rpartition('.')[2], allowed)}",
            refused=True,
        )

    for key in getattr(sweeper, "unknown", {}):
        refuse(str(key), SWEEPER_KEYS)
    for name, allowed in (("jobs", _dataclass_keys("harness.cluster.packing", "JobsConf")),
                          ("resources", _dataclass_keys("harness.cluster.resources",
                                                        "ResourceConf"))):  # fmt: skip
        value = getattr(sweeper, name, None)
        if isinstance(value, dict):
            for key in value:
                if str(key) not in allowed:
                    refuse(f"{name}.{key}", allowed)
    params, grids = _plain(getattr(sweeper, "params", None)), getattr(sweeper, "grids", None)
    problems = []
    if params is not None and not isinstance(params, dict):
        problems.append(f"hydra.sweeper.params={params!r}; allowed: a dict of field: values")
    if grids is not None and not (
        isinstance(grids, list) and all(isinstance(g, dict) for g in grids)
    ):
        problems.append(f"hydra.sweeper.grids={grids!r}; allowed: a list of dicts of field: values")
    cap = getattr(sweeper, "max_cells", None)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        problems.append(f"hydra.sweeper.max_cells={cap!r}; allowed: an integer >= 1, or null "
                        "(no cap)")  # fmt: skip
    if problems:
        key = problems[0].split("=")[0].removeprefix("hydra.sweeper.")
        raise SweepError(
            f"Sweep not launched (nothing was queued or written): {problems[0]} "
            f"({setting_source(config, key)})",
            refused=True,
        )


def _dataclass_keys(module: str, name: str) -> tuple[str, ...]:
    import dataclasses
    import importlib

    return tuple(f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name)))


def setting_source(config: DictConfig | None, key: str) -> str:
    """Where ``hydra.sweeper.<key>`` was given: the command line, or the sweep file (its
    path when found on Hydra's search path), else the sweeper's defaults."""
    hydra_cfg = config.get("hydra") if config is not None else None
    if hydra_cfg is None:
        return "given where the sweep is declared"
    for item in OmegaConf.select(hydra_cfg, "overrides.hydra", default=None) or []:
        given = str(item).split("=", 1)[0].lstrip("+~")
        if given.startswith("hydra.sweeper") and (
            f"hydra.sweeper.{key}".startswith(given) or given.startswith(f"hydra.sweeper.{key}")
        ):
            return f"on the command line: {item}"
    choices = OmegaConf.select(hydra_cfg, "runtime.choices", default=None) or {}
    name = next((str(v) for k, v in choices.items() if str(k).split("@")[0] == "sweeps"), None)
    if name is None:
        return "in conf/hydra/sweeper/kbit.yaml or an overlay"
    for source in OmegaConf.select(hydra_cfg, "runtime.config_sources", default=None) or []:
        if source.get("schema") == "file":
            path = Path(str(source.get("path"))) / "sweeps" / f"{name}.yaml"
            if path.is_file():
                return f"in sweeps/{name}.yaml: {path}"
    return f"in sweeps/{name}.yaml"


class KbitSweeper(BasicSweeper):
    """Hydra's basic sweeper with the planning step above (``hydra/sweeper=kbit``).

    ``params`` is the basic sweeper's grid; ``grids`` (optional) a list of further parameter
    dicts: the sweep is the union of product(params x grid) over them. ``jobs`` sets how a
    packing launcher (``hydra/launcher=slurm|local``) chunks cells into jobs, ``resources``
    the per-model resource rule (null: the launcher's settings for every job); ``dry_run``
    plans and prints the plan without launching anything.
    """

    def __init__(
        self,
        max_batch_size: int | None = None,
        params: dict[str, str] | None = None,
        grids: list[dict[str, str]] | None = None,
        jobs: dict[str, Any] | None = None,
        resources: dict[str, Any] | None = None,
        dry_run: bool = False,
        max_cells: int | None = DEFAULT_MAX_CELLS,
        **unknown: Any,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        grids = _plain(grids)
        well_formed = isinstance(grids, list) and all(isinstance(g, dict) for g in grids)
        self.grids = [dict(g) for g in grids] if grids and well_formed else grids or None
        self.jobs = _plain(jobs)
        self.resources = _plain(resources)
        self.dry_run = dry_run
        self.max_cells = max_cells
        # refused in setup() (one line naming the key, its file and the closest keys): Hydra
        # reports an exception raised while instantiating as a multi-line traceback
        self.unknown = dict(unknown)

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        """Hydra's setup, after the sweeper's own settings are checked (unknown keys, types,
        ``max_cells``): a sweep file's typo is refused before anything is planned."""
        check_sweeper_settings(self, config)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        assert (
            self.config is not None and self.launcher is not None and self.hydra_context is not None
        )
        from harness.cluster import jobs as packed

        with _refused_as_sweep_error():
            settings = packed.check_settings(self.jobs, self.resources)
            if not isinstance(self.dry_run, bool):
                raise ValueError(f"hydra.sweeper.dry_run={self.dry_run!r}: allowed: true or false")
            if packed.is_packed(self.launcher):
                packed.check_launcher(self.launcher)
        loader = self.hydra_context.config_loader
        parser = OverridesParser.create(config_loader=loader)
        params = {str(k): str(v) for k, v in self.params.items()}
        grid = expand_union(parser, params, self.grids, arguments, max_cells=self.max_cells)
        target = launch_target(self.config.hydra.get("launcher"), self.resources)
        compose = CellComposer(loader, self.config).compose
        plan = plan_sweep(grid, compose, target=target, live=packed.held_by_live_jobs)
        log.info(plan.summary())
        raise_on_problems(plan, len(grid))
        with _refused_as_sweep_error():
            held = plan.held  # asked of the scheduler before the store was read
            todo = [c for c in plan.to_run() if (c.results_dir, c.sweep, c.cell_id) not in held]
            is_packed = packed.is_packed(self.launcher)
            jobs = packed.plan_jobs(todo, settings, self.launcher) if is_packed and todo else []
        if jobs:
            log.info(packed.describe_jobs(jobs, self.launcher))
        if self.dry_run:
            script = packed.sbatch_preview(self.launcher, jobs) if jobs else None
            if script:  # exactly what sbatch would get for the first job (docs/sweeps.md)
                log.info(script)
            log.info("dry run (hydra.sweeper.dry_run=true): nothing launched or written")
            return []
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        if not todo:
            write_manifest(plan)
            log.info(
                "nothing to run: every cell of the grid has an ok record%s",
                f" or is held by a live job ({len(held)})" if held else "",
            )
            return []
        if is_packed:
            with manifest_unless_refused(plan):  # a refused submission leaves no manifest
                packed.launch(self.launcher, jobs, todo, done=plan.counts()["done"], held=len(held))
            return []
        write_manifest(plan)
        return self._launch_in_order(todo, done=plan.counts()["done"], held=len(held))

    def _launch_in_order(self, todo: list[Cell], done: int = 0, held: int = 0) -> list[Any]:
        """Hydra's launcher interface (basic: in process), batch after batch, then the outcome.

        The progress line counts the whole sweep: ``done`` cells ok before, ``held`` left to
        live jobs of an earlier launch, and ``todo``; it ends on the summary's count."""
        from harness import progress

        self.overrides = list(
            self.split_overrides_to_chunks([c.overrides for c in todo], self.max_batch_size)
        )
        returns, start, launcher_error = [], 0, None
        name = ", ".join(sorted({c.sweep for c in todo}))
        progress.start(total=len(todo) + done + held, already_done=done, name=name)
        try:
            while not self.is_done():
                batch = self.get_job_batch()
                try:
                    returns.append(self.launcher.launch(batch, initial_job_idx=start))
                except Exception as err:  # e.g. a job cancelled: the store says what is missing
                    launcher_error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
                    log.error("launcher: %s", launcher_error)
                start += len(batch)
        finally:
            progress.finish()
        report_outcome(todo, launcher_error, done_before=done, held=held)
        return returns


@contextlib.contextmanager
def _refused_as_sweep_error() -> Iterator[None]:
    """A bad packing/resource setting or an unknowable job state refuses the sweep (exit 2,
    one message) before anything is queued."""
    try:
        yield
    except ValueError as err:  # harness.cluster.jobs.JobsError, and the settings' checks
        raise SweepError(
            f"Sweep not launched (nothing was queued or written): {err}", refused=True
        ) from None


def _plain(value: Any) -> Any:
    """A sweeper setting as plain Python (Hydra hands DictConfigs)."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def report_outcome(
    launched: Sequence[Cell],
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


def _first_error(cells: Sequence[Cell], tries: int = 5) -> str | None:
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
