"""The Hydra sweeper ``hydra/sweeper=kbit``: check its settings, plan the grid, launch what is left.

Why a sweeper and not only a callback: a grid of tens of thousands of cells on a cluster where
jobs time out and crash must (1) fail before a single job is queued when any cell is wrong,
(2) never queue a cell that is already done, and (3) never queue two jobs that write the same
cell file. :class:`KbitSweeper` (selected by every overlay in ``sweeps/``) runs, in order:

============  ===========================================================================
check         the sweeper's own settings (:func:`check_sweeper_settings`): an unknown key
              is named with its file and the closest keys
expand        :mod:`harness.sweep.expand`: params x grids x the command line, counted
              before it is listed (``max_cells``), model slowest
compose       :mod:`harness.sweep.compose`: every cell's config as the job will see it
plan          :mod:`harness.sweep.plan`: validate, deduplicate, live jobs, resume; all
              problems in ONE line; the manifest ``kbit-status`` reads
launch        in process (Hydra's launcher interface, batch after batch), or packed into
              scheduler jobs by :mod:`harness.cluster.jobs` (``hydra/launcher=slurm|local``)
outcome       :mod:`harness.sweep.outcome`: what the store says of the launched cells
============  ===========================================================================

It subclasses Hydra's public :class:`hydra.plugins.sweeper.Sweeper` (the launcher comes from
``Plugins.instance().instantiate_launcher`` as in every Hydra sweeper); the grid expansion
that Hydra's basic sweeper keeps internal is :func:`harness.sweep.expand.product`.

Layers: the sweep sits above :mod:`harness.cluster` (it hands planned cells to
:mod:`harness.cluster.jobs`, which never imports the sweep); the outcome and the sweep's
errors are handled here, after the cluster layer returns.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from harness.config.identity import LOCAL, Target
from harness.sweep import plan as planning
from harness.sweep.compose import CellComposer
from harness.sweep.errors import SweepError
from harness.sweep.expand import expand_union
from harness.sweep.outcome import report_outcome
from harness.sweep.plan import Cell

log = logging.getLogger(__name__)

# A grid above this many cells is refused before it is expanded (hydra.sweeper.max_cells):
# planning is ~1 ms per cell, and a grid of millions is a typo more often than a plan.
DEFAULT_MAX_CELLS = 100_000
# hydra.sweeper's settings (conf/hydra/sweeper/kbit.yaml); anything else is a typo
SWEEPER_KEYS = ("max_batch_size", "params", "grids", "jobs", "resources", "dry_run", "max_cells")


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
    from harness.cluster.packing import JobsConf
    from harness.cluster.resources import ResourceConf

    for name, allowed in (("jobs", _field_names(JobsConf)),
                          ("resources", _field_names(ResourceConf))):  # fmt: skip
        value = getattr(sweeper, name, None)
        if isinstance(value, dict):
            for key in value:
                if str(key) not in allowed:
                    refuse(f"{name}.{key}", allowed)
    params, grids = plain_setting(getattr(sweeper, "params", None)), getattr(sweeper, "grids", None)
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
    size = getattr(sweeper, "max_batch_size", None)
    if (
        size is not None
        and size != -1
        and (isinstance(size, bool) or not isinstance(size, int) or size < 1)
    ):
        problems.append(f"hydra.sweeper.max_batch_size={size!r}; allowed: an integer >= 1, or "
                        "null (all cells at once)")  # fmt: skip
    if problems:
        key = problems[0].split("=")[0].removeprefix("hydra.sweeper.")
        raise SweepError(
            f"Sweep not launched (nothing was queued or written): {problems[0]} "
            f"({setting_source(config, key)})",
            refused=True,
        )


def _field_names(schema: type) -> tuple[str, ...]:
    import dataclasses

    return tuple(f.name for f in dataclasses.fields(schema))


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


class KbitSweeper(Sweeper):
    """Hydra's sweeper interface with the planning step above (``hydra/sweeper=kbit``).

    ``params`` is the grid (as Hydra's basic sweeper takes it); ``grids`` (optional) a list of
    further parameter dicts: the sweep is the union of product(params x grid) over them.
    ``jobs`` sets how a packing launcher (``hydra/launcher=slurm|local``) chunks cells into
    jobs, ``resources`` the per-model resource rule (null: the launcher's settings for every
    job); ``dry_run`` plans and prints the plan without launching anything;
    ``max_batch_size`` how many cells an in-process launch hands Hydra's launcher at once.
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
        super().__init__()
        self.max_batch_size = max_batch_size
        self.params = params if params is not None else {}
        grids = plain_setting(grids)
        well_formed = isinstance(grids, list) and all(isinstance(g, dict) for g in grids)
        self.grids = [dict(g) for g in grids] if grids and well_formed else grids or None
        self.jobs = plain_setting(jobs)
        self.resources = plain_setting(resources)
        self.dry_run = dry_run
        self.max_cells = max_cells
        # refused in setup() (one line naming the key, its file and the closest keys): Hydra
        # reports an exception raised while instantiating as a multi-line traceback
        self.unknown = dict(unknown)
        self.hydra_context: Any = None
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        """Check the sweeper's own settings (unknown keys, types, ``max_cells``): a sweep
        file's typo is refused before anything is planned; then take the launcher as every
        Hydra sweeper does."""
        from hydra.core.plugins import Plugins

        check_sweeper_settings(self, config)
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

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
        with _refused_as_sweep_error():  # a plugin that does not load: one line, exit 2
            load_sweep_plugins(self.config, grid)
        target = launch_target(self.config.hydra.get("launcher"), self.resources)
        compose = CellComposer(loader, self.config).compose
        plan = planning.plan_sweep(grid, compose, target=target, live=packed.held_by_live_jobs)
        log.info(plan.summary())
        planning.raise_on_problems(plan, len(grid))
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
        done = plan.counts()["done"]
        if not todo:
            planning.write_manifest(plan)
            log.info(
                "nothing to run: every cell of the grid has an ok record%s",
                f" or is held by a live job ({len(held)})" if held else "",
            )
            return []
        if is_packed:
            with planning.manifest_unless_refused(plan):  # a refused submission leaves none
                try:
                    errors = packed.launch(self.launcher, jobs, todo, done=done, held=len(held))
                except packed.JobsError as err:  # the scheduler refused (part of) the submission
                    raise SweepError(str(err), refused=err.refused) from None
                if errors is not None:  # the launcher waited for its jobs
                    report_outcome(todo, done_before=done, held=len(held), job_errors=errors)
            return []
        planning.write_manifest(plan)
        return self._launch_in_order(todo, done=done, held=len(held))

    def _launch_in_order(self, todo: list[Cell], done: int = 0, held: int = 0) -> list[Any]:
        """Hydra's launcher interface (basic: in process), batch after batch, then the outcome.

        The progress line counts the whole sweep: ``done`` cells ok before, ``held`` left to
        live jobs of an earlier launch, and ``todo``; it ends on the summary's count."""
        from harness import progress

        batches = in_batches([c.overrides for c in todo], self.max_batch_size)
        returns, start, launcher_error = [], 0, None
        name = ", ".join(sorted({c.sweep for c in todo}))
        progress.start(total=len(todo) + done + held, already_done=done, name=name)
        try:
            for batch in batches:
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


def in_batches(cells: Sequence[list[str]], size: int | None) -> list[list[list[str]]]:
    """``cells`` in consecutive batches of ``size`` (None or -1: one batch), as Hydra's basic
    sweeper hands them to its launcher (``max_batch_size``)."""
    if size is None or size == -1:
        size = max(len(cells), 1)
    return [list(cells[i : i + size]) for i in range(0, len(cells), size)]


def load_sweep_plugins(config: DictConfig, grid: Sequence[Sequence[str]]) -> None:
    """Load the plugins the sweep's cells name (``plugins: [module, ...]`` in the config or
    swept on the command line) in the planning process, before any cell is composed: a
    plugin's data type family, method or schema must be registered for its cells to compose
    and validate here as they will in their jobs (which load them again,
    :mod:`harness.cluster.in_job`)."""
    from harness.config.overrides import plugin_modules
    from harness.plugins import load_plugins

    given = dict.fromkeys(item for cell in grid for item in cell
                          if item.split("=", 1)[0].lstrip("+~") == "plugins")  # fmt: skip
    modules = dict.fromkeys(str(m) for m in (config.get("plugins") or []))
    modules.update(dict.fromkeys(plugin_modules(list(given))))
    load_plugins(list(modules))  # the kbit.plugins entry points too


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
        rule = (
            dict(plain_setting(resources) or {}) if not isinstance(resources, dict) else resources
        )
        asks = str(rule.get("device", "cuda")) != "cpu"
    return Target(cuda_available=asks)


def _positive(count: Any) -> bool:
    """A GPU count as submitit takes it (an int, or a string such as "2")."""
    if isinstance(count, bool) or count is None:
        return False
    if isinstance(count, int):
        return count > 0
    return str(count).strip() not in ("", "0")


def plain_setting(value: Any) -> Any:
    """A sweeper setting as plain Python (Hydra hands DictConfigs)."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value
