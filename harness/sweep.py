"""Sweeps: expand a grid, validate every cell before anything is queued, launch only what is left.

Why a sweeper and not only a callback: a grid of tens of thousands of cells on a cluster where
jobs time out and crash must (1) fail before a single job is queued when any cell is wrong,
(2) never queue a cell that is already done, and (3) never queue two jobs that write the same
cell file. Hydra's basic sweeper launches every combination as given; :class:`KbitSweeper`
(``hydra/sweeper=kbit``, selected by every overlay in ``sweeps/``) is the basic sweeper plus a
planning step:

============  ===========================================================================
expand        cartesian product of ``hydra.sweeper.params`` and the command line, with the
              model as the slowest-varying dimension (in-process launches reuse the model)
compose       every cell's config, as the job will see it (composed once per combination of
              config-group choices, then value overrides applied: fast for 35,000 cells)
validate      ``harness.run.validate_cell`` on each cell (dtype/bits legal, model and data
              reachable), results folder writable; all problems reported in ONE error
deduplicate   cells with the same ``cell_id`` (e.g. the 16-bit baseline under every data
              type) run once; two jobs never write the same file
resume        cells whose record says ``ok`` are skipped; ``failed`` ones are queued again
============  ===========================================================================

The plan is logged as ``cells in total, done, failed, to run`` and recorded in
``RESULTS_DIR/<sweep>/sweep_manifest.json`` (so ``kbit-status`` can count pending cells).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from harness.cluster.jobs import cell_meta
from harness.files import atomic_write, writable_dir_problem
from harness.identity import LOCAL, Target
from harness.records import STATUS_FAILED, STATUS_OK, cell_path, cell_status

log = logging.getLogger(__name__)

MANIFEST = "sweep_manifest.json"
MAX_PROBLEMS_SHOWN = 12


class SweepError(CompactHydraException):
    """A sweep that cannot run as declared (``refused``: nothing was queued or written, exit 2),
    or whose launched cells did not all finish ok (exit 1)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


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
        # (group choices, value override) -> its effect (see _one_effect)
        self._bases: dict[tuple[str, ...], tuple[bool, Any]] = {}
        self._effects: dict[tuple[tuple[str, ...], str], tuple[Any, str, Any]] = {}

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
        cfg = copy.deepcopy(self._composed[groups])
        values = [o for o in parsed if not self._group(o)]
        with read_write(cfg):
            ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        return cfg

    def plain(self, overrides: Sequence[str]) -> dict[str, Any] | None:
        """``OmegaConf.to_container(self.compose(overrides), resolve=True, enum_to_str=True)``
        without composing, or None where that shortcut does not apply (then compose).

        Raises what :meth:`compose` raises. Why it is the same: the group composition is
        resolved to plain data once; each value override (``bits=4``) is applied once, alone,
        to a copy of the group composition, and its effect is the new value of the one
        top-level field it names (an override that changes any other field, or whose value
        is an interpolation, is not used). Overrides of distinct top-level fields are
        independent, so a cell is the composition's plain data with each effect put in;
        cells where two overrides name one top-level field are composed.
        """
        parsed = [self._parse(o) for o in overrides]
        groups = tuple(o.input_line for o in parsed if self._group(o))
        base = self._plain_base(groups)
        if base is None:
            return None
        effects = [self._effect(groups, o) for o in parsed if not self._group(o)]
        tops = [e[1] for e in effects]
        if any(e[0] is None for e in effects) or len(set(tops)) != len(tops):
            return None
        for ok, _top, value in effects:  # the first failing override, as compose raises it
            if not ok:
                raise value.with_traceback(None)
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

    def _effect(self, groups: tuple[str, ...], override: Override) -> tuple[Any, str, Any]:
        """(ok | False | None, top-level field, new plain value | _DELETED | the error)."""
        key = (groups, override.input_line)
        if key not in self._effects:
            self._effects[key] = self._one_effect(groups, override)
        return self._effects[key]

    def _one_effect(self, groups: tuple[str, ...], override: Override) -> tuple[Any, str, Any]:
        top = override.key_or_group.split(".")[0]
        if "$" in str(override.input_line):  # an interpolation: resolved in its cell's context
            return None, top, None
        cfg = copy.deepcopy(self._composed[groups])
        try:
            with read_write(cfg):
                ConfigLoaderImpl._apply_overrides_to_config([override], cfg)
        except Exception as exc:
            return False, top, exc
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


def results_dir_problem(folder: str | os.PathLike) -> str | None:
    """Why cell files cannot be written under ``folder`` (None when they can); creates nothing."""
    return writable_dir_problem(folder)


def launch_target(launcher: DictConfig | None) -> Target:
    """The machine class the launcher's jobs run on, for resolving ``device=auto``.

    Why: a sweep is planned on a login node without a GPU, and its cell ids must be the ones
    the jobs compute on GPU nodes. A submitit launcher (Slurm or local processes) runs on
    GPUs when it asks for them (``gpus_per_node``, ``gpus_per_task`` or a ``gpu`` gres);
    the in-process launcher runs here.
    """
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    if not any(name in target for name in ("submitit", "kbit_launcher")):
        return LOCAL
    gpus = [launcher.get(k) for k in ("gpus_per_node", "gpus_per_task")]
    asks = any(_positive(g) for g in gpus) or "gpu" in str(launcher.get("gres") or "")
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
    """``harness.identity.cell_id`` and ``harness.run.validate_cell`` for ``target``
    (imported late: heavy imports)."""
    from harness.identity import cell_id
    from harness.run import validate_cell

    return cell_id, lambda cfg: validate_cell(cfg, target)


def plan_sweep(
    grid: Sequence[Sequence[str]],
    compose: Callable[[Sequence[str]], DictConfig],
    cell_id: Callable[..., str] | None = None,
    validate: Callable[[DictConfig], Any] | None = None,
    target: Target = LOCAL,
) -> SweepPlan:
    """Compose, validate, deduplicate and look up every cell of ``grid``; raises nothing.

    ``validate(cfg)`` raises for a bad cell and may return the cell's resolved numerics and
    data sources, which are then passed to ``cell_id(cfg, resolved)`` and pinned into the
    job's overrides. Problems are collected (grouped by message, with a count and one example
    cell) so the user fixes them all in one round instead of one per launch.

    With the default hooks and a :class:`CellComposer`, cells are planned by
    :func:`_fast_outcome` (the same ids, problems and pins, a few hundred times faster).
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
    listings: dict[tuple[str, str], frozenset[str]] = {}
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
        status = _status(results_dir, sweep, cid, listings)
        plan.cells.append(Cell([*overrides, *pins], cid, sweep, results_dir, status, meta()))
    plan.invalid = sum(len(cells) for cells in problems.values())
    plan.problems = [
        f"{msg}  [{len(cells)} cell(s), e.g. {' '.join(cells[0])}]"
        for msg, cells in problems.items()
    ]
    return plan


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
        results_dir, sweep = str(cfg.results_dir), str(cfg.sweep)
        pins = pinned_numerics(cfg, resolved)
        return cid, results_dir, sweep, pins, lambda: cell_meta(cfg, resolved)

    return outcome


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
    :class:`harness.run.CellValidator` for the whole plan (each check once per distinct
    input, on the real config); a cell the shortcut does not cover is composed and validated
    as :func:`_outcome` does. None when ``compose`` is not a CellComposer's.
    """
    composer = getattr(compose, "__self__", None)
    if not isinstance(composer, CellComposer) or compose.__func__ is not CellComposer.compose:
        return None
    from harness.identity import cell_id
    from harness.run import CellValidator, validate_cell

    validator = CellValidator(target)
    slow = _outcome(compose, cell_id, lambda cfg: validate_cell(cfg, target))

    def outcome(overrides: Sequence[str]) -> _Outcome:
        cell = composer.plain(overrides)
        if cell is None:
            return slow(overrides)
        resolved, cid = validator(cell, lambda: composer.compose(overrides))
        results_dir, sweep = str(cell["results_dir"]), str(cell["sweep"])
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
    from harness.refusals import input_error_line

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
    """One error naming every distinct problem; nothing has been queued or written yet."""
    if not plan.problems:
        return
    shown = plan.problems[:MAX_PROBLEMS_SHOWN]
    more = len(plan.problems) - len(shown)
    lines = [f"Sweep not launched: {len(plan.problems)} problem(s) in a grid of {n_cells} cells "
             "(nothing was queued or written):"]  # fmt: skip
    lines += [f"  - {p}" for p in shown]
    if more:
        lines.append(f"  ... and {more} more")
    raise SweepError("\n".join(lines), refused=True)


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


def read_manifest(path: str | os.PathLike) -> dict[str, str]:
    """cell_id -> overrides of every cell ever planned for a sweep ({} if none)."""
    try:
        return dict(json.loads(Path(path).read_text())["cells"])
    except (OSError, ValueError, KeyError):
        return {}


def expand_union(
    parser: OverridesParser,
    params: dict[str, str],
    grids: Sequence[dict[str, str]] | None,
    arguments: Sequence[str],
) -> list[list[str]]:
    """The union over ``grids`` of product(params x grid x command line), model slowest.

    Why: a grid of every data type at every bit width contains illegal cells (nf4 exists only
    at 4 bits), and the baselines are one bit width for all types; a union of products says
    exactly what to run. Command-line overrides apply to every part (and win over both).
    """
    parts = grids or [{}]
    cells: list[list[str]] = []
    for part in parts:
        merged = {**params, **{str(k): str(v) for k, v in dict(part).items()}}
        listed = [f"{k}={v}" for k, v in merged.items()]
        cells += expand_grid(parser.parse_overrides([*listed, *arguments]))
    return expand_grid_order(cells)


def expand_grid_order(cells: list[list[str]]) -> list[list[str]]:
    """Stable re-ordering of cells so each model's cells are contiguous (first-seen order)."""
    models: OrderedDict[str, int] = OrderedDict()
    for cell in cells:
        models.setdefault(_value_of(cell, "model") or "", len(models))
    return sorted(cells, key=lambda cell: models[_value_of(cell, "model") or ""])


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
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = [dict(g) for g in grids] if grids else None
        self.jobs = _plain(jobs)
        self.resources = _plain(resources)
        self.dry_run = dry_run

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
        grid = expand_union(parser, params, self.grids, arguments)
        target = launch_target(self.config.hydra.get("launcher"))
        plan = plan_sweep(grid, CellComposer(loader, self.config).compose, target=target)
        log.info(plan.summary())
        raise_on_problems(plan, len(grid))
        with _refused_as_sweep_error():
            held = packed.held_by_live_jobs(plan.to_run())
            todo = [c for c in plan.to_run() if (c.results_dir, c.sweep, c.cell_id) not in held]
            is_packed = packed.is_packed(self.launcher)
            jobs = packed.plan_jobs(todo, settings, self.launcher) if is_packed and todo else []
        if jobs:
            log.info(packed.describe_jobs(jobs, self.launcher))
        if self.dry_run:
            log.info("dry run (hydra.sweeper.dry_run=true): nothing launched or written")
            return []
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        write_manifest(plan)
        if not todo:
            log.info(
                "nothing to run: every cell of the grid has an ok record%s",
                f" or is held by a live job ({len(held)})" if held else "",
            )
            return []
        if is_packed:
            packed.launch(self.launcher, jobs, todo)
            return []
        return self._launch_in_order(todo, done=plan.counts()["done"])

    def _launch_in_order(self, todo: list[Cell], done: int = 0) -> list[Any]:
        """Hydra's launcher interface (basic: in process), batch after batch, then the outcome."""
        from harness import progress

        self.overrides = list(
            self.split_overrides_to_chunks([c.overrides for c in todo], self.max_batch_size)
        )
        returns, start, launcher_error = [], 0, None
        name = ", ".join(sorted({c.sweep for c in todo}))
        progress.start(total=len(todo) + done, already_done=done, name=name)
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
        report_outcome(todo, launcher_error)
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


def report_outcome(launched: Sequence[Cell], launcher_error: str | None = None) -> None:
    """After launching: what the store now says about the launched cells (the truth on a
    cluster, where a job can vanish without a Python exception)."""
    outcome = Counter(cell_status(cell_path(c.results_dir, c.sweep, c.cell_id)) for c in launched)
    ok, failed = outcome[STATUS_OK], outcome[STATUS_FAILED]
    missing = len(launched) - ok - failed
    log.info(
        "launched %d cells: %d ok, %d failed, %d without a record",
        len(launched),
        ok,
        failed,
        missing,
    )
    if launcher_error:
        raise SweepError(
            f"the launcher stopped waiting after a job ended abnormally ({launcher_error}); jobs "
            "still queued keep running. `kbit-status RESULTS_DIR` shows the outcome; re-running "
            "the same command runs exactly the cells without an ok record"
        )
    if failed or missing:
        raise SweepError(
            f"{failed + missing} of {len(launched)} launched cells did not finish ok ({failed} "
            f"failed, {missing} without a record); `kbit-status RESULTS_DIR --errors` shows why, "
            "and re-running the same command retries exactly these cells"
        )
