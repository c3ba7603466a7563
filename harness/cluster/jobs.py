"""From a sweep's planned cells to submitted jobs: holds, packing, resources, the printed plan.

Called by the sweeper (:class:`harness.sweep.sweeper.KbitSweeper`) after every cell is validated;
this layer sits below the sweep and never imports it (the sweeper reports the outcome):

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

from harness.cluster.cells import cell_meta, planned_cell
from harness.cluster.describe import describe_jobs, job_gpus, sbatch_preview, unit_count
from harness.cluster.leases import Hold, SchedulerUnavailable, held_cells, read_claims
from harness.cluster.packing import (
    JobsConf,
    check_jobs_conf,
    estimate_cell_seconds,
    measured_cell_seconds,
    pack,
)

log = logging.getLogger(__name__)

# What the sweeper (harness.sweep.sweeper) uses of the cluster layer; the printed plan's
# functions live in harness.cluster.describe, what a planned cell carries in harness.cluster.cells.
__all__ = [
    "JobsError",
    "Settings",
    "cell_meta",
    "check_launcher",
    "check_settings",
    "cpu_plan_problem",
    "describe_jobs",
    "gpu_flags_problem",
    "held_by_live_jobs",
    "is_packed",
    "job_gpus",
    "launch",
    "plan_jobs",
    "planned_cell",
    "record_job_errors",
    "sbatch_preview",
]


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
        "gpus_per_task": unit_count(params.get("gpus_per_task"), 0) > 0,
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


def launch(
    launcher: Any, specs: Sequence[Any], todo: Sequence[Any], done: int = 0, held: int = 0
) -> Counter[str] | None:
    """Submit ``specs``; wait with a progress line when the launcher waits, else return None.

    ``done`` cells of the sweep were ok before this launch and ``held`` are left to live jobs
    of an earlier launch: the progress line counts the whole sweep (``done + held + todo``)
    and ends on the same count as the summary. After the jobs ended, a cell without a new
    record gets a ``failed`` record holding its job's error line (its result, else its log),
    so a job that died before its cells could write anything is visible in the store; the
    return value is then those error lines (error line -> cells) for the sweep's outcome
    (:func:`harness.sweep.outcome.report_outcome`, called by the sweeper: this layer does
    not import the sweep). A submission the scheduler refuses raises :class:`JobsError`
    (``refused`` when nothing was queued).
    """
    from harness import progress
    from harness.cluster.launcher import SubmissionError

    keys = [(c.results_dir, c.sweep, c.cell_id) for c in todo]
    baseline = progress.store_snapshot(keys) if launcher.waits else None
    try:
        submission = launcher.launch_packed(specs)
    except SubmissionError as err:
        raise JobsError(f"submission failed: {err}", refused=not err.queued) from None
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
        return None
    name = ", ".join(sorted({c.sweep for c in todo}))
    line = progress.start(total=len(todo) + done + held, already_done=done, name=name)
    try:
        until = launcher.finished(submission)
        progress.watch_store(keys, line, launcher.poll_s, until=until, baseline=baseline)
        missing = set(keys) - progress.new_records(keys, baseline or {})
        errors = record_job_errors(specs, submission, missing, line) if missing else Counter()
    finally:
        progress.finish()
    return errors


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
    from harness.cluster.in_job import job_error_line, record_unrun_cell

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
