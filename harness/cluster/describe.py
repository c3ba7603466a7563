"""The plan printed before a sweep's jobs are submitted: jobs, arrays, resource classes, and
the GPU-hours it costs; and a dry run's sbatch script.

Why its own module: what the user reads before spending GPU-hours is one concern, apart from
building the jobs (:mod:`harness.cluster.jobs`, which re-exports these names for the sweeper).
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any


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
    nodes = unit_count(params.get("nodes"), 1)
    if unit_count(params.get("gpus_per_node"), 0):
        return unit_count(params.get("gpus_per_node"), 0) * nodes
    if unit_count(params.get("gpus_per_task"), 0):
        return (
            unit_count(params.get("gpus_per_task"), 0)
            * unit_count(params.get("tasks_per_node"), 1)
            * nodes
        )
    for item in str(params.get("gres") or "").split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu":
            return (unit_count(parts[-1], 1) if len(parts) > 1 else 1) * nodes
    return 0


def unit_count(value: Any, default: int) -> int:
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
