"""From a sweep's planned cells to submitted jobs: holds, packing, resources, the printed plan.

Called by the sweeper (:class:`harness.sweep.plan.KbitSweeper`) after every cell is validated:

1. cells held by live jobs of an earlier launch are left out (:mod:`harness.cluster.leases`);
2. the remaining cells are packed into jobs of one model each (:mod:`harness.cluster.packing`),
   with each cell's expected cost from the store or an estimate;
3. each job gets its resources from the per-model rule (:mod:`harness.cluster.resources`) when
   ``hydra.sweeper.resources`` is set, else the launcher's settings;
4. the plan is logged (cells, jobs, arrays, resources per class, and a total of job-hours and
   GPU-hours, expected and at the time limits) and the launcher submits it; on Slurm the
   command then returns, unless ``hydra.launcher.wait=true``. A dry run logs, instead of
   submitting, the first job's sbatch script as submitit writes it (:func:`sbatch_preview`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.cluster.leases import Hold, SchedulerUnavailable, held_cells, read_claims
from harness.cluster.packing import (
    JobsConf,
    cell_tokens,
    check_jobs_conf,
    estimate_cell_seconds,
    measured_cell_seconds,
    pack,
)

log = logging.getLogger(__name__)


class JobsError(ValueError):
    """A sweep that cannot be submitted as configured (``refused``: nothing was queued)."""

    def __init__(self, message: str, refused: bool = True) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass
class Settings:
    """The sweeper's packing and resource settings, checked."""

    jobs: JobsConf
    resources: Any = None  # harness.cluster.resources.ResourceConf, or None (launcher settings)


def check_settings(jobs: Any, resources: Any) -> Settings:
    """``hydra.sweeper.jobs`` and ``hydra.sweeper.resources`` checked before any work."""
    conf = check_jobs_conf(jobs)
    if resources is None:
        return Settings(conf)
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from harness.cluster.resources import ResourceConf, check_resource_conf

    check_resource_conf(resources)  # unknown keys with the closest name, bad values
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ResourceConf), resources)
        rule = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        first = (str(err).splitlines() or [""])[0]
        raise JobsError(f"hydra.sweeper.resources.{key}: {first}") from None
    check_resource_conf(rule)
    return Settings(conf, rule)


def check_launcher(launcher: Any) -> None:
    """kbit's own launcher settings (Hydra checks their types; kbit their range)."""
    poll = launcher.params.get("poll_s")
    if poll is not None and not poll > 0:
        raise JobsError(f"hydra.launcher.poll_s={poll!r}: allowed: a number of seconds > 0")


def cell_meta(cfg: Any, resolved: Any) -> dict[str, Any]:
    """What packing needs of a cell, taken while the planner has its composed config, and
    what a failed record written in its job says of it when the cell cannot start there
    (``record``: :data:`harness.cluster.launcher.RECORD_FIELDS`)."""
    device_class = str(getattr(resolved, "device_class", None) or "cpu")
    compute_dtype = str(getattr(resolved, "compute_dtype", None) or "float32")
    return {
        "model": str(cfg.model),
        "zoo_dir": str(cfg.get("zoo_dir") or ""),
        "trust_remote_code": bool(cfg.get("trust_remote_code", False)),
        "device": str(cfg.get("device") or "auto"),  # as configured: "auto" or explicit
        "device_class": device_class,
        "compute_dtype": compute_dtype,
        "tokens": cell_tokens(cfg),
        "record": _record_fields(cfg, device_class, compute_dtype),
    }


def _record_fields(cfg: Any, device_class: str, compute_dtype: str) -> dict[str, Any]:
    """The identity fields of a cell's record, as plain values (best effort: a field the
    config does not have is left out, and the record keeps its default)."""

    def name_of(value: Any) -> Any:
        return value.get("name") if hasattr(value, "get") else value

    fields: dict[str, Any] = {"device_class": device_class, "compute_dtype": compute_dtype}
    try:
        bits = int(cfg.get("bits"))
        baseline = bits == 16
        dtype, method = cfg.get("dtype"), cfg.get("method")
        fields.update(
            model=str(cfg.get("model")), bits=bits, centering=bool(cfg.get("centering")),
            scale_format=str(cfg.get("scale_format") or "fp16"),
            method="none" if baseline else str(name_of(method) or ""),
            dtype="none" if baseline else str(name_of(dtype) or ""),
            dtype_family="none" if baseline else str(
                (dtype.get("family") if hasattr(dtype, "get") else "") or ""),
            block_size=None if baseline else cfg.get("block_size"),
        )  # fmt: skip
        if cfg.get("model_family"):
            fields["model_family"] = str(cfg.get("model_family"))
    except (TypeError, ValueError, AttributeError, KeyError):
        pass
    return fields


def planned_cell(cell: Any) -> dict[str, Any]:
    """Where a planned cell's record goes, and what its job writes there if the cell cannot
    start (:func:`harness.cluster.launcher.record_unrun_cell`)."""
    return {
        **dict(cell.meta.get("record") or {}),
        "results_dir": str(cell.results_dir),
        "sweep": str(cell.sweep),
        "cell_id": str(cell.cell_id),
    }


def held_by_live_jobs(cells: Sequence[Any]) -> dict[tuple[str, str, str], Hold]:
    """(results_dir, sweep, cell_id) -> the live array task holding it, for ``cells``' folders.

    A cell held by a pending or running job of an earlier launch is not launched again.
    """
    held: dict[tuple[str, str, str], Hold] = {}
    folders = OrderedDict(((c.results_dir, c.sweep), None) for c in cells)
    states: dict[str, str] | None = None
    for results_dir, sweep in folders:
        if not read_claims(results_dir, sweep):
            continue
        if states is None:
            from harness.cluster.leases import scheduler_states

            try:
                states = scheduler_states()
            except SchedulerUnavailable as err:
                where = Path(results_dir) / sweep / ".jobs"
                raise JobsError(
                    f"{where} names jobs of an earlier launch, and the scheduler cannot be asked "
                    f"whether they still run ({err}); nothing was launched. Run this where squeue "
                    f"works, or remove {where} if those jobs are gone"
                ) from None
        for cid, hold in held_cells(results_dir, sweep, states).items():
            held[results_dir, sweep, cid] = hold
    wanted = {(c.results_dir, c.sweep, c.cell_id) for c in cells}
    held = {k: v for k, v in held.items() if k in wanted}
    if held:
        running = sum(h.running for h in held.values())
        log.info(
            "%d cell(s) held by live jobs of an earlier launch (%d running, %d queued): not "
            "launched again",
            len(held),
            running,
            len(held) - running,
        )
    return held


def is_packed(launcher: Any) -> bool:
    """Whether ``launcher`` takes packed jobs (kbit's slurm and local launchers)."""
    from harness.cluster.launcher import is_packed as packed

    return packed(launcher)


class _ParamCounts:
    """Parameter counts per model, read from config.json once per plan (no weights)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, bool], int] = {}

    def __call__(self, meta: dict[str, Any]) -> int:
        key = (meta["model"], meta["zoo_dir"], meta["trust_remote_code"])
        if key not in self.counts:
            from harness.cluster.resources import model_param_count

            self.counts[key] = int(model_param_count(key[0], key[1] or None, key[2]))
        return self.counts[key]


def _is_hub_model(spec: str) -> bool:
    """A hub id (not a ``zoo:`` model, not a local folder): planning validated that a local
    spec exists, so a spec that is no path here names a hub model."""
    if spec.startswith("zoo:"):
        return False
    return not Path(os.path.expanduser(os.path.expandvars(spec))).exists()


def cpu_plan_problem(cells: Sequence[Any], settings: Settings, launcher: Any) -> str | None:
    """Why Slurm jobs would run hub models on CPUs without anyone asking for it, or None.

    Why: a GPU sweep launched without GPU resources (no ``hydra.launcher.gpus_per_node``, no
    ``hydra.sweeper.resources``) resolves ``device=auto`` to ``cpu`` and plans thousands of
    float32 CPU jobs that ask for the model's size in host memory and run for days: the plan
    looks valid and is useless. A hub model on CPUs is fine when asked for: ``device=cpu``
    set for the cells, or ``hydra.sweeper.resources.device=cpu``.
    """
    if getattr(launcher, "_EXECUTOR", "") != "slurm":
        return None
    if settings.resources is not None and settings.resources.device == "cpu":
        return None
    hub: dict[str, bool] = {}
    affected: Counter[str] = Counter()
    for cell in cells:
        meta = cell.meta
        if meta.get("device_class") != "cpu" or meta.get("device", "auto") != "auto":
            continue
        model = str(meta["model"])
        if model not in hub:
            hub[model] = _is_hub_model(model)
        if hub[model]:
            affected[model] += 1
    if not affected:
        return None
    first = next(iter(affected))
    return (
        f"model={first} (a hub model; {len(affected)} model(s), {sum(affected.values())} cells) "
        "would run on CPUs in float32 Slurm jobs: device=auto resolved to cpu because neither "
        "hydra.launcher.gpus_per_node nor hydra.sweeper.resources asks for GPUs; allowed: GPU "
        "jobs (hydra.launcher.gpus_per_node=1, or a hydra.sweeper.resources rule), or CPUs on "
        "purpose (device=cpu, or hydra.sweeper.resources.device=cpu)"
    )


def gpu_flags_problem(settings: Settings, launcher: Any) -> str | None:
    """Why a resource rule and the launcher's own GPU request would both ask for GPUs, or None.

    Why: the rule (``hydra.sweeper.resources``) sets each job's ``--gpus-per-node`` from its
    model; a ``gres: gpu:...`` or ``gpus_per_task`` in the launcher profile would add a second,
    fixed request to the same sbatch script, which Slurm refuses or honours over the rule (a
    176B model on one GPU). ``gpus_per_node`` is fine: the rule's value replaces it per job.
    """
    rule = settings.resources
    if rule is None or rule.device == "cpu":
        return None
    params = getattr(launcher, "params", {}) or {}
    asks = {
        "gres": "gpu" in str(params.get("gres") or ""),
        "gpus_per_task": _count(params.get("gpus_per_task"), 0) > 0,
    }
    for key, set_too in asks.items():
        if set_too:
            return (
                f"hydra.launcher.{key}={params[key]!r} asks for GPUs beside the resource rule "
                "(hydra.sweeper.resources), which sets --gpus-per-node per model; allowed: "
                f"hydra.launcher.{key}=null with a rule (choose the GPU type with "
                "hydra.sweeper.resources.gpu_type or hydra.launcher.constraint), or "
                "hydra.sweeper.resources=null to use the launcher's GPUs for every job"
            )
    return None


def plan_jobs(cells: Sequence[Any], settings: Settings, launcher: Any) -> list[Any]:
    """Pack ``cells`` into :class:`harness.cluster.launcher.JobSpec`, with their resources.

    Raises :class:`JobsError` for a plan nobody asked for (:func:`cpu_plan_problem`)."""
    from harness.cluster.launcher import JobSpec

    problem = cpu_plan_problem(cells, settings, launcher) or gpu_flags_problem(settings, launcher)
    if problem:
        raise JobsError(problem)

    measured: dict[tuple[str, str], dict[str, float]] = {}
    params_of = _ParamCounts()

    def seconds_of(cell: Any) -> float:
        folder = (cell.results_dir, cell.sweep)
        if folder not in measured:
            measured[folder] = measured_cell_seconds(*folder)
        known = measured[folder].get(cell.meta["model"])
        if known is not None:
            return known
        meta = cell.meta
        return estimate_cell_seconds(params_of(meta), meta["tokens"], meta["device_class"])

    packed = pack(cells, lambda c: c.meta["model"], seconds_of, settings.jobs)
    longest: dict[str, float] = {}
    for job in packed:
        longest[job.model] = max(longest.get(job.model, 0.0), job.minutes)
    per_model: dict[str, tuple[dict[str, Any], str]] = {}
    specs = []
    for job in packed:
        if job.model not in per_model:  # one class per model: its longest job sets the time
            per_model[job.model] = _resources(
                job, longest[job.model], settings, launcher, params_of
            )
        params, label = per_model[job.model]
        specs.append(
            JobSpec(
                cells=[c.overrides for c in job.cells],
                claims=[(c.results_dir, c.sweep, c.cell_id) for c in job.cells],
                resources=params,
                label=label,
                minutes=job.minutes,
                model=job.model,
                planned=[planned_cell(c) for c in job.cells],
            )
        )
    return specs


TIME_STEP_MIN = 30  # time limits are rounded up to this: models alike share a class (an array)


def _resources(
    job: Any, minutes: float, settings: Settings, launcher: Any, params_of: _ParamCounts
) -> tuple[dict[str, Any], str]:
    """The launcher parameters of ``job``'s model (jobs up to ``minutes`` long), and their label.

    Why one class per model, with time limits rounded up to :data:`TIME_STEP_MIN`: every class
    is its own array; a per-job time limit would make an array of every odd-sized last chunk.
    """
    if settings.resources is None:
        return {}, _launcher_label(launcher)
    from harness.cluster.resources import resources_for

    meta = job.cells[0].meta
    rule = settings.resources
    if meta["device_class"] == "cpu" and rule.device != "cpu":
        rule = dataclasses.replace(rule, device="cpu")
    try:
        res = resources_for(
            job.model, params_of(meta), meta["compute_dtype"], rule, job_minutes=minutes
        )
    except ValueError as err:
        raise JobsError(str(err)) from None
    rounded = math.ceil(res.timeout_min / TIME_STEP_MIN) * TIME_STEP_MIN
    res = dataclasses.replace(
        res, timeout_min=max(res.timeout_min, min(rounded, rule.max_timeout_min))
    )
    return res.launcher_params(), res.label()


def _launcher_label(launcher: Any) -> str:
    p = getattr(launcher, "params", {}) or {}
    gpus = p.get("gpus_per_node") or 0
    return (
        f"{gpus} GPU, {p.get('mem_gb') or '?'} GB, {p.get('cpus_per_task') or 1} CPU, "
        f"{p.get('timeout_min') or '?'} min (the launcher's settings)"
    )


def _array_limit(launcher: Any) -> int | None:
    limit = getattr(launcher, "_array_limit", None)
    return limit() if callable(limit) else None


def describe_jobs(specs: Sequence[Any], launcher: Any) -> str:
    """The plan printed before submitting: cells, jobs, arrays, and each resource class."""
    classes: OrderedDict[tuple, list[Any]] = OrderedDict()
    for spec in specs:
        classes.setdefault(tuple(sorted(spec.resources.items())), []).append(spec)
    limit = _array_limit(launcher)
    arrays = sum(max(1, math.ceil(len(g) / limit)) if limit else 1 for g in classes.values())
    cells = sum(len(s.cells) for s in specs)
    sizes = [len(s.cells) for s in specs]
    lines = [
        f"plan: {cells} cells in {len(specs)} jobs ({min(sizes)}-{max(sizes)} cells per job, "
        f"one model each), {arrays} array(s)"
        + (f" of at most {limit} tasks (MaxArraySize)" if limit else "")
        + f", {len(classes)} resource class(es):"
    ]
    for group in classes.values():
        models = Counter(s.model for s in group)
        hours = sum(s.minutes for s in group) / 60.0
        numerics = Counter(
            f"{p.get('device_class', '?')}/{p.get('compute_dtype', '?')}"
            for s in group
            for p in s.planned
        )
        lines.append(
            f"  - {group[0].label}: {len(group)} jobs, {sum(len(s.cells) for s in group)} cells, "
            f"~{hours:.1f} job-hours expected; numerics: {_short_list(numerics)}; "
            f"models: {_short_list(models)}"
        )
    lines.append(_total_line(specs, launcher))
    return "\n".join(lines)


def job_gpus(params: dict[str, Any]) -> int:
    """GPUs one job holds, from submitit's Slurm settings: ``gpus_per_node`` x ``nodes``, else
    ``gpus_per_task`` x tasks, else a ``gpu[:type]:N`` gres (0 when none asks for GPUs)."""
    nodes = _count(params.get("nodes"), 1)
    if _count(params.get("gpus_per_node"), 0):
        return _count(params.get("gpus_per_node"), 0) * nodes
    if _count(params.get("gpus_per_task"), 0):
        return (
            _count(params.get("gpus_per_task"), 0) * _count(params.get("tasks_per_node"), 1) * nodes
        )
    for item in str(params.get("gres") or "").split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu":
            return (_count(parts[-1], 1) if len(parts) > 1 else 1) * nodes
    return 0


def _count(value: Any, default: int) -> int:
    """A count as submitit takes it (an int, or a string such as "2" or "a100:2")."""
    if value is None or isinstance(value, bool):
        return default
    try:
        return int(str(value).rsplit(":", 1)[-1])
    except ValueError:
        return default


def _total_line(specs: Sequence[Any], launcher: Any) -> str:
    """The plan's bottom line: what the grid costs in GPU-hours.

    Why two numbers: the expected GPU-hours (each job's expected hours x its GPUs) are what
    the grid should use; the reserved ones (each job's time limit x its GPUs) are what Slurm
    holds while the jobs run and what an allocation is checked against before they start.
    """
    base = dict(getattr(launcher, "params", {}) or {})
    expected = reserved = job_hours = 0.0
    for spec in specs:
        params = {**base, **spec.resources}
        gpus = job_gpus(params)
        hours = spec.minutes / 60.0
        limit = float(params.get("timeout_min") or 0) / 60.0
        job_hours += hours
        expected += hours * gpus
        reserved += limit * gpus
    cells = sum(len(s.cells) for s in specs)
    return (
        f"  total: {len(specs)} jobs, {cells} cells, ~{_hours(job_hours)} job-hours, "
        f"~{_hours(expected)} GPU-hours expected (each job's expected hours x its GPUs); "
        f"{_hours(reserved)} GPU-hours at the time limits (each job's limit x its GPUs: what "
        "Slurm reserves)"
    )


def _hours(value: float) -> str:
    """Hours with one decimal, two below 1 h (a small test grid is not all ``0.0``)."""
    return f"{value:.1f}" if value >= 1 or value == 0 else f"{value:.2f}"


def sbatch_preview(launcher: Any, specs: Sequence[Any]) -> str | None:
    """The sbatch script of the first job of the first array, as submitit would submit it,
    with a header line; None for a launcher that submits no batch script (local processes).

    A launcher that cannot build its executor here (no ``srun`` on this machine) gives a
    one-line note instead: the plan is still valid, only the script cannot be shown.
    """
    script = getattr(launcher, "sbatch_script", None)
    if not specs or not callable(script):
        return None
    try:
        text = script(specs)
    except Exception as err:  # submitit's executor needs Slurm's commands on this machine
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"sbatch script: not shown ({type(err).__name__}: {first})"
    if text is None:
        return None
    first = specs[0]
    return (
        f"sbatch script of the first array ({first.label}; its first job: {first.model}, "
        f"{len(first.cells)} cells), as submitit submits it:\n{text.rstrip()}"
    )


def _short_list(counts: Counter, shown: int = 4) -> str:
    names = list(counts)
    text = ", ".join(names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def launch(
    launcher: Any, specs: Sequence[Any], todo: Sequence[Any], done: int = 0, held: int = 0
) -> None:
    """Submit ``specs``; wait with a progress line when the launcher waits, else return.

    ``done`` cells of the sweep were ok before this launch and ``held`` are left to live jobs
    of an earlier launch: the progress line counts the whole sweep (``done + held + todo``)
    and ends on the same count as the summary. After the jobs ended, a cell without a new
    record gets a ``failed`` record holding its job's error line (its result, else its log),
    so a job that died before its cells could write anything is visible in the store.
    """
    from harness import progress
    from harness.cluster.launcher import SubmissionError
    from harness.sweep.plan import SweepError, report_outcome

    keys = [(c.results_dir, c.sweep, c.cell_id) for c in todo]
    baseline = progress.store_snapshot(keys) if launcher.waits else None
    try:
        submission = launcher.launch_packed(specs)
    except SubmissionError as err:
        raise SweepError(f"submission failed: {err}", refused=not err.queued) from None
    arrays = ", ".join(f"{a} ({n} tasks)" for a, n, _ in submission.arrays)
    per_job = [len(s.cells) for s in specs]
    log.info(
        "submitted %d jobs (%d cells, %d-%d per job) in %d array(s): %s",
        len(specs),
        sum(per_job),
        min(per_job),
        max(per_job),
        len(submission.arrays),
        arrays,
    )
    folders = sorted({(c.results_dir, c.sweep) for c in todo})
    status = "; ".join(f"kbit-status {rd} --sweep {sw}" for rd, sw in folders)
    if not launcher.waits:
        log.info(
            "the jobs run on their own: this command is done. Watch them with `%s`; running the "
            "same command again submits only cells that have no ok record and no live job holds",
            status,
        )
        return
    name = ", ".join(sorted({c.sweep for c in todo}))
    line = progress.start(total=len(todo) + done + held, already_done=done, name=name)
    try:
        until = launcher.finished(submission)
        progress.watch_store(keys, line, launcher.poll_s, until=until, baseline=baseline)
        missing = set(keys) - progress.new_records(keys, baseline or {})
        errors = record_job_errors(specs, submission, missing, line) if missing else Counter()
    finally:
        progress.finish()
    report_outcome(todo, done_before=done, held=held, job_errors=errors)


def record_job_errors(
    specs: Sequence[Any], submission: Any, missing: set[tuple[str, str, str]], line: Any = None
) -> Counter[str]:
    """For every ended job that left cells without a new record: its error line (logged once
    per job), and a ``failed`` record holding it for each such cell (counted on ``line``).

    Why the launcher: a job that could not start (an import error before kbit's code ran, a
    node failure) or could not write (a full disk) has no other way to be seen; its error is
    in its result or log, which the store's readers (``kbit-status --errors``) do not read.
    Returns error line -> cells.
    """
    from harness.cluster.launcher import job_error_line, record_unrun_cell

    errors: Counter[str] = Counter()
    for spec, job in zip(specs, submission.jobs, strict=True):
        cells = [p for p in spec.planned if (p["results_dir"], p["sweep"], p["cell_id"]) in missing]
        if not cells or job is None:
            continue
        why = job_error_line(job)
        job_id = getattr(job, "job_id", "?")
        where = getattr(getattr(job, "paths", None), "stderr", "")
        written = 0
        for planned in cells:
            text = f"{why} (job {job_id} ended without this cell's record)"
            if record_unrun_cell(planned, text, f"job log: {where}", str(job_id)) is not None:
                written += 1
                if line is not None:
                    line.cell_finished("failed")
        log.error("job %s: %d cell(s) without a record (%d failed record(s) written now): %s",
                  job_id, len(cells), written, why)  # fmt: skip
        errors[why] += len(cells)
    return errors
