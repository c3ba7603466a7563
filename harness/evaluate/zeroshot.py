"""Zero-shot accuracy through lm-eval, on the quantized model already in memory.

``HFLM(pretrained=<model object>)`` evaluates the weights as they are now, so no quantized
model is ever saved. Tasks are lm-eval names. When a data root is given, kbit's local
definitions of the same names (``harness.evaluate.tasks``) are used, offline; without one,
lm-eval's built-in tasks load their data from the Hub. The zoo tasks always read the model
folder.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.evaluate.task_catalog import check_task_names, is_local, task_files
from harness.evaluate.tasks import materialize
from harness.evaluate.timing import ForwardTimer

log = logging.getLogger(__name__)
METRICS = ("acc", "acc_norm")


@dataclass
class TaskResult:
    """One task's accuracies, their standard errors and per-example correctness."""

    task: str
    n: int
    values: dict[str, float] = field(default_factory=dict)  # metric -> value
    stderr: dict[str, float | None] = field(default_factory=dict)
    per_sample: dict[str, list[float]] = field(default_factory=dict)  # metric -> 0/1 by doc_id
    nonfinite: int = 0  # requests whose log-likelihood is NaN or inf: the result is not valid


@dataclass
class ZeroShotResult:
    tasks: dict[str, TaskResult]
    forward_s: float


def split_tasks(
    names: list[str], data_root: str | os.PathLike | None, model_dir: str | os.PathLike | None
) -> tuple[list[str], list[str]]:
    """(names served by kbit's local definitions, names left to lm-eval's built-ins)."""
    local = [n for n in names if is_local(n, data_root)]
    return local, [n for n in names if n not in local]


def task_manager(
    names: list[str], data_root: str | os.PathLike | None, model_dir: str | os.PathLike | None
):
    """A TaskManager that knows ``names``; without built-ins when all are local (fast).

    Names are checked first (one line, no 10 s index of every built-in for a typo).
    """
    from lm_eval.tasks import TaskManager

    check_task_names(names, data_root, model_dir)
    local, builtin = split_tasks(names, data_root, model_dir)
    include = str(materialize(local, data_root, model_dir)) if local else None
    return TaskManager(include_path=include, include_defaults=bool(builtin))


_TASK_CACHE: OrderedDict[tuple, tuple] = OrderedDict()
_TASK_CACHE_SIZE = 4


def _source_stamp(
    names: list[str], data_root: str | os.PathLike | None, model_dir: str | os.PathLike | None
) -> tuple:
    """(path, size, mtime) of the local tasks' data files: a changed file is a new cache key."""
    local = split_tasks(names, data_root, model_dir)[0]
    return tuple(
        (str(f), (st := f.stat()).st_size, st.st_mtime_ns)
        for f in task_files(local, data_root, model_dir)
    )


def task_objects(
    names: list[str],
    data_root: str | os.PathLike | None,
    model_dir: str | os.PathLike | None,
    num_fewshot: int,
) -> tuple[object, list]:
    """(TaskManager, lm-eval Task objects for ``names``), built once per process and reused.

    Why: building a Task loads its dataset and lists every document (for the few-shot sampler)
    whatever the limit, and the local definitions are re-materialized; in a sweep that was a
    large part of what each cell spent outside forward passes. Reuse is safe because lm-eval
    rebuilds a task's requests on every ``evaluate`` and ``simple_evaluate`` re-applies the
    few-shot settings (tests/test_zeroshot.py checks results equal a fresh build). Names that
    expand to groups or tags come back as names (lm-eval then loads them per call).
    """
    key = (tuple(names), str(data_root), str(model_dir), num_fewshot,
           _source_stamp(names, data_root, model_dir))  # fmt: skip
    if key in _TASK_CACHE:
        _TASK_CACHE.move_to_end(key)
        return _TASK_CACHE[key]
    manager = task_manager(names, data_root, model_dir)
    loaded = manager.load(list(names))
    if loaded["groups"] or sorted(loaded["tasks"]) != sorted(names):
        return manager, list(names)
    _TASK_CACHE[key] = manager, [loaded["tasks"][n] for n in names]
    while len(_TASK_CACHE) > _TASK_CACHE_SIZE:
        _TASK_CACHE.popitem(last=False)
    return _TASK_CACHE[key]


@contextlib.contextmanager
def _without_environment_report():
    """Skip what ``simple_evaluate`` adds to its results after evaluating: the git hash and
    ``torch.utils.collect_env`` (pip, conda, nvidia-smi, ... as subprocesses), ~0.5-0.7 s
    per call, on every cell. kbit records its own provenance (versions, commit, host) in
    each record and never reads these fields. Only names that exist are replaced, so a
    future lm-eval without them is unaffected; the originals come back on exit.
    """
    import lm_eval.evaluator as evaluator

    replaced = {}
    for name, stand_in in (("add_env_info", lambda results: None), ("get_git_commit_hash", str)):
        if hasattr(evaluator, name):
            replaced[name] = getattr(evaluator, name)
            setattr(evaluator, name, stand_in)
    try:
        yield
    finally:
        for name, original in replaced.items():
            setattr(evaluator, name, original)


@contextlib.contextmanager
def _bootstrap_in_process():
    """Make lm-eval bootstrap its stderrs in this process (``DISABLE_MULTIPROC``, its switch).

    Why: by default it forks a ``multiprocessing.Pool`` of one worker per CPU for each
    bootstrapped metric. Forking a process that runs torch and kbit's kernel threads is
    unsafe, and in a submitit job the forked workers inherit submitit's handler that ignores
    SIGTERM, so the pool's ``terminate()`` never ends them: a packed job hung after its first
    cell. With 1,000 draws lm-eval makes a single chunk anyway, so the pool bought nothing;
    the draws are seeded the same way on both paths, so the values are identical.
    """
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = before


_TRUNCATED = "exceeds model's maximum length"  # lm-eval's per-request warning (loglikelihood)
_LEFT_TRUNCATION = "Left truncation applied"  # its per-batch warning (generation tasks)
# lm-eval's notices about what kbit does on purpose (an in-memory model passed as
# ``pretrained``, num_fewshot set explicitly): true every time, so they only bury the output
_EXPECTED_NOTICES = (
    "model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Overwriting default num_fewshot",
)


class _TruncationCounter(logging.Filter):
    """Swallows lm-eval's per-request truncation warnings (one per request: hundreds per
    cell on a short-context model) and counts them; every other record passes."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0  # "Combined length ... exceeds model's maximum length"
        self.batches = 0  # "Left truncation applied" (generation)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        if _TRUNCATED in message:
            self.requests += 1
            return False
        if _LEFT_TRUNCATION in message:
            self.batches += 1
            return False
        return True


def _lm_eval_loggers() -> list[logging.Logger]:
    names = {"lm_eval", "lm_eval.models.huggingface"} | {
        n for n in list(logging.root.manager.loggerDict) if n.startswith("lm_eval.")
    }
    return [logging.getLogger(n) for n in sorted(names)]


class _ExpectedNotices(logging.Filter):
    """Drops lm-eval's notices about what kbit does on purpose (:data:`_EXPECTED_NOTICES`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(notice in message for notice in _EXPECTED_NOTICES)


@contextlib.contextmanager
def expected_notices_dropped():
    """lm-eval's notices about an in-memory model and an explicit num_fewshot left out (they
    hold for every cell); everything else it logs passes."""
    notices = _ExpectedNotices()
    loggers = _lm_eval_loggers()
    for logger in loggers:
        logger.addFilter(notices)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notices)


def request_tokens(lm: object, context: str, continuation: str) -> int:
    """Tokens lm-eval feeds for one loglikelihood request (context + continuation), as its
    ``loglikelihood`` encodes them: the pair encoded whole; an empty context is the prefix
    token (unless the continuation starts with it). Truncated when > ``max_length + 1``."""
    if context == "":
        cont = lm.tok_encode(continuation, add_special_tokens=False)  # type: ignore[attr-defined]
        return len(cont) + (not cont or cont[0] != lm.prefix_token_id)  # type: ignore[attr-defined]
    return len(lm.tok_encode(context + continuation))  # type: ignore[attr-defined]


@contextlib.contextmanager
def truncation_summary(lm: object):
    """Around an lm-eval run: its per-request "exceeds model's maximum length" warnings are
    swallowed and summarised in one line per task, e.g. ``zoo_lastword: 187 of 300 requests
    did not fit the model's 64-token context and were truncated on the left (lm-eval)``.

    Why: lm-eval logs one warning per request, so a short-context model buries the cell's
    output under hundreds of identical lines. The counts per task come from re-encoding the
    requests the model received (only when a warning was seen); if they do not add up to the
    warnings lm-eval logged (another lm-eval version), one line gives the total instead.
    """
    counter = _TruncationCounter()
    loggers = _lm_eval_loggers()
    for logger in loggers:
        logger.addFilter(counter)
    seen: list = []  # the loglikelihood requests (lm-eval Instances) in the order received
    original = getattr(lm, "loglikelihood", None)
    if original is not None:

        def loglikelihood(requests, *args, **kwargs):
            seen.extend(requests)
            return original(requests, *args, **kwargs)

        lm.loglikelihood = loglikelihood  # type: ignore[attr-defined]
    try:
        yield counter
    finally:
        for logger in loggers:
            logger.removeFilter(counter)
        if original is not None:
            del lm.loglikelihood  # type: ignore[attr-defined]  # the class method again
    _log_truncation(lm, counter, seen)


def _log_truncation(lm: object, counter: _TruncationCounter, requests: list) -> None:
    if counter.batches:
        log.warning("%d generation batches had their contexts truncated on the left to fit the "
                    "model's context (lm-eval)", counter.batches)  # fmt: skip
    if not counter.requests:
        return
    max_length = int(getattr(lm, "max_length", 0) or 0)
    per_task: dict[str, list[int]] = {}
    try:
        for req in requests:
            counts = per_task.setdefault(str(req.task_name), [0, 0])
            counts[1] += 1
            counts[0] += request_tokens(lm, *req.args[:2]) > max_length + 1
    except Exception:  # an unknown request layout: the total still counts
        per_task = {}
    if per_task and sum(c[0] for c in per_task.values()) == counter.requests:
        for task, (truncated, total) in per_task.items():
            if truncated:
                log.warning("%s: %d of %d requests did not fit the model's %d-token context "
                            "and were truncated on the left (lm-eval)", task, truncated, total,
                            max_length)  # fmt: skip
    else:
        log.warning("%d requests did not fit the model's %d-token context and were truncated "
                    "on the left (lm-eval)", counter.requests, max_length)  # fmt: skip


def _loglikelihood(response: object) -> float | None:
    """The log-likelihood of one logged response: ``(ll, is_greedy)``, ``[(ll, greedy)]`` or ll."""
    while isinstance(response, list | tuple) and response:
        response = response[0]
    try:
        return float(response)
    except (TypeError, ValueError):
        return None  # not a log-likelihood (a generated string): nothing to count


def count_nonfinite(samples: list[dict]) -> int:
    """Requests whose log-likelihood is NaN or inf, from lm-eval's logged samples.

    Why: lm-eval's argmax over NaN log-likelihoods picks choice 0, so a broken model gets a
    plausible accuracy; the runner turns a count > 0 into a failed record.
    """
    count = 0
    for sample in samples:
        responses = sample.get("filtered_resps") or sample.get("resps") or []
        for response in responses:
            value = _loglikelihood(response)
            count += value is not None and not math.isfinite(value)
    return count


def _task_result(name: str, results: dict) -> TaskResult:
    metrics = results["results"][name]
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    out = TaskResult(task=name, n=int(results["n-samples"][name]["effective"]),
                     nonfinite=count_nonfinite(samples))  # fmt: skip
    for metric in METRICS:
        key = f"{metric},none"
        if key not in metrics:
            continue
        out.values[metric] = float(metrics[key])
        stderr = metrics.get(f"{metric}_stderr,none")
        out.stderr[metric] = float(stderr) if isinstance(stderr, int | float) else None
        out.per_sample[metric] = [float(s[metric]) for s in samples]
    if not out.values:
        raise ValueError(f"task={name!r} reports none of {METRICS}; got {sorted(metrics)}")
    return out


def make_lm(model: nn.Module, tokenizer: object, batch_size: int = 8):
    """lm-eval's HFLM around the in-memory model, log-softmax in float32.

    A model sharded with a device map (accelerate hooks) works as is: HFLM sends token ids to
    the input embedding's device and accelerate's top-level hook returns the logits there.
    """
    from lm_eval.models.huggingface import HFLM

    from harness.models.placement import input_device

    device = input_device(model)  # token ids go to the input embedding (sharded: first GPU)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
                softmax_dtype=torch.float32)  # fmt: skip


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer: object,
    tasks: list[str],
    *,
    data_root: str | os.PathLike | None = None,
    model_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    bootstrap_iters: int = 1000,
    seed: int = 0,
) -> ZeroShotResult:
    """Run lm-eval's ``simple_evaluate`` on the in-memory model; see the module docstring.

    Log-softmax runs in float32 whatever the model's dtype (a bf16 log-softmax loses the small
    differences between choices). Non-finite log-likelihoods are counted per task
    (``TaskResult.nonfinite``), never silently scored.
    """
    from lm_eval import simple_evaluate

    manager, objects = task_objects(tasks, data_root, model_dir, num_fewshot)
    with expected_notices_dropped():
        lm = make_lm(model, tokenizer, batch_size)
    with (
        expected_notices_dropped(),
        ForwardTimer(model) as timer,
        torch.no_grad(),
        _without_environment_report(),
        _bootstrap_in_process(),
        truncation_summary(lm),
    ):
        results = simple_evaluate(
            model=lm,
            tasks=objects,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=True,
            bootstrap_iters=bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    return ZeroShotResult({n: _task_result(n, results) for n in tasks}, timer.seconds)


def mean_accuracy(results: dict[str, TaskResult], mean_of: list[str]) -> tuple[float, float, int]:
    """(mean acc, its stderr assuming independent tasks, total examples) over ``mean_of``."""
    missing = [t for t in mean_of if t not in results]
    if missing:
        raise ValueError(
            f"mean_of: tasks {missing} were not evaluated; evaluated: {sorted(results)}"
        )
    accs = [results[t].values["acc"] for t in mean_of]
    errs = [results[t].stderr.get("acc") for t in mean_of]
    stderr = (
        math.sqrt(sum(e * e for e in errs)) / len(errs)
        if all(e is not None for e in errs)
        else math.nan
    )
    return sum(accs) / len(accs), stderr, sum(results[t].n for t in mean_of)
