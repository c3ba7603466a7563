"""Packed jobs: one model and a chunk of its cells per scheduler job.

Why: a cell costs a model load (opt-66b: ~132 GB read from disk) plus starting Python and
importing torch; its own work can be seconds. One job per cell would load the paper grid's
largest model ~770 times. A *job* here is one model and a chunk of its planned cells, run one
after the other in one process (the model is loaded once and restored to pristine between
cells; each cell is still validated and written atomically on its own).

Chunk size (``hydra.sweeper.jobs``, docs/sweeps.md):

==================  ===========================================================================
cells_per_job       at most this many cells per job (null: no cap)
minutes_per_job     wall-time target per job: cells are added while the job's expected time
                    stays within it (a single cell longer than the target gets a job of its own)
==================  ===========================================================================

A cell's expected cost comes from the store when cells of the same model already finished
there (their mean ``wall_s`` without the load), else from :func:`estimate_cell_seconds`, a
rough count of forward-pass FLOPs. The estimate only sizes chunks and time limits; a job that
runs over its limit is requeued and resumes at its first cell without an ok record.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Effective throughput of forward passes in FLOP/s (2 x params per token), deliberately low:
# an underestimate makes chunks that time out, an overestimate only makes more jobs.
THROUGHPUT = {"cuda": 5.0e13, "cpu": 2.0e10, "mps": 2.0e12}
OVERHEAD_S = 20.0  # per cell: validation, restore, lm-eval set-up, writing the record
# Forward tokens of a full evaluation when the config does not bound it: wikitext-2 test
# (~290k tokens in the GPT-2/NeoX tokenizers) and the paper's zero-shot tasks at their sizes
# (examples x choices x ~tokens per choice).
PERPLEXITY_TOKENS = 300_000
# A task whose definition declares no cost (``kbit.cost`` in its YAML file under
# harness/evaluate/local_tasks/; a hub task kbit has no file for): (examples, tokens per example)
DEFAULT_TASK = (2000, 200)
# a method that needs calibration (GPTQ): a forward per layer input plus the Hessian accumulation
CALIBRATION_PASSES = 3


@dataclass
class JobsConf:
    """``hydra.sweeper.jobs``: how planned cells are packed into scheduler jobs."""

    cells_per_job: int | None = None  # at most this many cells per job; null = no cap
    minutes_per_job: float | None = 60.0  # wall-time target per job; null = no target


def check_jobs_conf(conf: Any) -> JobsConf:
    """The settings as a :class:`JobsConf`; one line naming the field for a bad value."""
    raw = dict(conf or {})
    unknown = sorted(set(raw) - {"cells_per_job", "minutes_per_job"})
    if unknown:
        raise ValueError(
            f"hydra.sweeper.jobs.{unknown[0]}: unknown setting; allowed: cells_per_job, "
            "minutes_per_job"
        )
    cells, minutes = raw.get("cells_per_job"), raw.get("minutes_per_job", 60.0)
    if cells is not None and (isinstance(cells, bool) or not isinstance(cells, int) or cells < 1):
        raise ValueError(
            f"hydra.sweeper.jobs.cells_per_job={cells!r}: allowed: an integer >= 1, or null"
        )
    if minutes is not None and (
        isinstance(minutes, bool) or not isinstance(minutes, int | float) or minutes <= 0
    ):
        raise ValueError(
            f"hydra.sweeper.jobs.minutes_per_job={minutes!r}: allowed: a number of minutes > 0, "
            "or null"
        )
    return JobsConf(cells_per_job=cells, minutes_per_job=minutes)


@dataclass
class PackedJob:
    """One scheduler job: a model and the cells it runs, with their expected cost."""

    model: str
    cells: list[Any] = field(default_factory=list)  # harness.sweep.plan.Cell, in grid order
    seconds: float = 0.0  # expected wall time of the cells (without the model load)
    resources: Any = None  # harness.cluster.resources.Resources, set by the planner

    @property
    def minutes(self) -> float:
        return self.seconds / 60.0


def eval_tokens(eval_cfg: Any) -> float:
    """Forward tokens one evaluation of ``eval_cfg`` reads (rough; sizes chunks only): each
    task's size as its definition declares it (:func:`harness.evaluate.task_catalog.task_cost`),
    else :data:`DEFAULT_TASK`."""
    from harness.evaluate.task_catalog import task_cost

    limit = eval_cfg.get("limit") if eval_cfg is not None else None
    tokens = 0.0
    for spec in (eval_cfg or {}).get("perplexity") or []:
        cap = spec.get("max_tokens") if hasattr(spec, "get") else None
        tokens += min(PERPLEXITY_TOKENS, cap) if cap else PERPLEXITY_TOKENS
    for task in (eval_cfg or {}).get("tasks") or []:
        examples, per_example = task_cost(str(task)) or DEFAULT_TASK
        if limit is not None:
            examples = min(examples, limit if limit >= 1 else math.ceil(examples * limit))
        tokens += examples * per_example
    return tokens


def cell_tokens(cfg: Any) -> float:
    """Forward tokens of one cell: its evaluation, plus the calibration passes of a method
    that needs calibration data (the method registry says which: GPTQ today)."""
    tokens = eval_tokens(cfg.get("eval"))
    method = cfg.get("method")
    name = str(method.get("name", "")) if hasattr(method, "get") else str(method or "")
    if int(cfg.get("bits", 16)) < 16 and needs_calibration(name):
        settings = method if hasattr(method, "get") else {}
        n_seq = int(settings.get("n_samples") or 128)
        seqlen = int(settings.get("seqlen") or 2048)
        tokens += CALIBRATION_PASSES * n_seq * seqlen
    return tokens


def needs_calibration(method: str) -> bool:
    """Whether method ``method`` reads calibration data, as the method registry declares
    (:func:`harness.quantize.methods.needs_calibration`); False for a name no method has (a
    cell that names one is refused at planning, before packing)."""
    from harness.quantize.methods import needs_calibration as declared

    try:
        return bool(declared(method))
    except ValueError:
        return False


def estimate_cell_seconds(n_params: int, tokens: float, device_class: str) -> float:
    """Expected wall time of a cell reading ``tokens`` forward tokens on ``n_params`` params.

    2 FLOPs per parameter per token at :data:`THROUGHPUT` of the device class, plus a fixed
    overhead: a first guess that only sizes chunks and time limits.
    """
    flops = 2.0 * float(n_params) * tokens
    return OVERHEAD_S + flops / THROUGHPUT.get(device_class, THROUGHPUT["cpu"])


def measured_cell_seconds(results_dir: str | Path, sweep: str) -> dict[str, float]:
    """model -> mean wall time (load excluded) of its ok cells in the store's sweep folder.

    Why the store: the second launch of a sweep (or a sweep beside an earlier one) knows what
    a cell of each model really costs on this cluster; the estimate is only a first guess.
    """
    from harness.records import STATUS_OK, read_store

    if not (Path(results_dir) / sweep).is_dir():
        return {}
    columns = ["model", "cell_id", "status", "wall_s", "load_s"]
    table = read_store(results_dir, sweep, columns=columns)
    # a cell has one row per (task, metric), all with the cell's wall time: one value per cell
    per_cell: dict[tuple[str, str], float] = {}
    rows = (table.column(c).to_pylist() for c in columns)
    for model, cid, status, wall, load in zip(*rows, strict=True):
        if status == STATUS_OK and wall:
            per_cell[model, cid] = max(float(wall) - float(load or 0.0), 0.0)
    sums: dict[str, list[float]] = {}
    for (model, _), seconds in per_cell.items():
        sums.setdefault(model, []).append(seconds)
    return {model: sum(v) / len(v) for model, v in sums.items()}


def pack(
    cells: Sequence[Any],
    model_of: Callable[[Any], str],
    seconds_of: Callable[[Any], float],
    conf: JobsConf,
) -> list[PackedJob]:
    """Chunks of consecutive cells of one model, in grid order (models first-seen order).

    A chunk closes when it holds ``cells_per_job`` cells or adding the next cell would take
    it over ``minutes_per_job``; every cell lands in exactly one job.
    """
    by_model: OrderedDict[str, list[Any]] = OrderedDict()
    for cell in cells:
        by_model.setdefault(model_of(cell), []).append(cell)
    limit_s = conf.minutes_per_job * 60.0 if conf.minutes_per_job else math.inf
    cap = conf.cells_per_job or math.inf
    jobs: list[PackedJob] = []
    for model, group in by_model.items():
        job = PackedJob(model)
        for cell in group:
            cost = seconds_of(cell)
            if job.cells and (len(job.cells) >= cap or job.seconds + cost > limit_s):
                jobs.append(job)
                job = PackedJob(model)
            job.cells.append(cell)
            job.seconds += cost
        if job.cells:
            jobs.append(job)
    return jobs
