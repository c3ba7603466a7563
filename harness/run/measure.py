"""A cell's measurements: one row per (task, metric) from its perplexity sets and zero-shot tasks.

Every task is evaluated even when an earlier one is non-finite, so a broken model gets a failed
row for each task (with the count of non-finite values), never a plausible score.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig

from harness.config.identity import Resolved
from harness.config.schema import eval_limit, mean_tasks
from harness.models.loading import LoadedModel
from harness.records import MEAN_ZEROSHOT_TASK, STATUS_FAILED


def _nonfinite_row(row: dict[str, Any], what: str) -> dict[str, Any]:
    """A measurement that cannot be trusted: failed, its value withheld, the count named."""
    return {**row, "value": None, "stderr": None, "per_sample": None, "status": STATUS_FAILED,
            "error": f"NonFiniteError: {what}"}  # fmt: skip


def perplexity_limit(ev: DictConfig) -> int | float | None:
    """The perplexity windows a cell scores: ``eval.limit`` when ``eval.limit_perplexity``
    (the default), else every window (None)."""
    return eval_limit(ev.limit) if ev.get("limit_perplexity", True) else None


def _perplexity_rows(
    cfg: DictConfig, loaded: LoadedModel, resolved: Resolved
) -> tuple[list, float]:
    from harness.evaluate import load_text, perplexity_details

    rows, forward_s = [], 0.0
    for entry in cfg.eval.perplexity:
        text = load_text(entry.name, entry.get("path"), cfg.data_root, loaded.path)
        # one quiet progress line on stderr (a multirun cell's stderr is its job log file)
        res = perplexity_details(loaded.model, loaded.tokenizer, text, entry.seqlen,
                                 entry.max_tokens, cfg.eval.batch_size, progress=True,
                                 limit=perplexity_limit(cfg.eval),
                                 label=f"perplexity {entry.name}")  # fmt: skip
        forward_s += res.forward_s
        source, version = resolved.sources[f"ppl:{entry.name}"]
        bad = res.nonfinite or not math.isfinite(res.nll)
        for metric, value in (("ppl", res.ppl), ("nll", res.nll)):
            row = dict(task=entry.name, metric=metric, value=value, n_samples=res.n_tokens,
                       data_source=source, task_version=version)  # fmt: skip
            if metric == "nll":  # per-window NLL: paired intervals between cells (records.py)
                row["per_sample"] = res.window_nll
            what = (f"perplexity {entry.name}: {res.nonfinite} of {res.n_windows} windows have "
                    "a NaN/inf loss")  # fmt: skip
            rows.append(_nonfinite_row(row, what) if bad else row)
    return rows, forward_s


def _zeroshot_rows(cfg: DictConfig, loaded: LoadedModel, resolved: Resolved) -> tuple[list, float]:
    from harness.evaluate import evaluate_zeroshot, mean_accuracy

    ev, rows = cfg.eval, []
    zs = evaluate_zeroshot(
        loaded.model, loaded.tokenizer, list(ev.tasks), data_root=cfg.data_root,
        model_dir=loaded.path, limit=eval_limit(ev.limit), batch_size=ev.batch_size,
        num_fewshot=ev.num_fewshot, bootstrap_iters=ev.bootstrap_iters, seed=cfg.seed,
    )  # fmt: skip
    for name, tr in zs.tasks.items():
        source, version = resolved.sources[name]
        for metric, value in tr.values.items():
            row = dict(task=name, metric=metric, value=value, stderr=tr.stderr[metric],
                       n_samples=tr.n, per_sample=tr.per_sample[metric], data_source=source,
                       task_version=version)  # fmt: skip
            what = (
                f"task {name}: {tr.nonfinite} of the log-likelihoods of {tr.n} examples are NaN/inf"
            )
            rows.append(_nonfinite_row(row, what) if tr.nonfinite else row)
    mean_of = mean_tasks(ev.tasks, ev.mean_of)  # null: every task that ran
    if mean_of:
        mean, stderr, n = mean_accuracy(zs.tasks, mean_of)
        row = dict(task=MEAN_ZEROSHOT_TASK, metric="acc", value=mean, stderr=stderr, n_samples=n,
                   data_source=" + ".join(resolved.sources[t][0] for t in mean_of))  # fmt: skip
        bad = [t for t in mean_of if zs.tasks[t].nonfinite]
        rows.append(
            _nonfinite_row(row, f"{MEAN_ZEROSHOT_TASK}: tasks {bad} are non-finite") if bad else row
        )
    return rows, zs.forward_s


def evaluate_rows(cfg: DictConfig, loaded: LoadedModel, resolved: Resolved) -> tuple[list, float]:
    """Measurement rows (task, metric, value, status, ...) and seconds in forward passes.

    Every task is evaluated even when an earlier one is non-finite, so a broken model gets a
    failed row for each task (with the count of non-finite values), never a plausible score.
    """
    rows, forward_s = _perplexity_rows(cfg, loaded, resolved)
    if cfg.eval.tasks:
        zs_rows, zs_s = _zeroshot_rows(cfg, loaded, resolved)
        rows, forward_s = rows + zs_rows, forward_s + zs_s
    return rows, forward_s
