"""Uncertainty for accuracies and their differences; perplexity-accuracy correlation.

The correlation comes with :func:`correlation_caveat`: a plain-language note whenever its sign
is not the paper's (r = -0.94: lower perplexity, higher accuracy), so a reader of ``stats.md``
is told what a positive r on a store means and what it does not.

Mean zero-shot accuracy is a macro mean over tasks, so the bootstrap is *stratified by task*:
each replicate resamples the examples of every task independently (with replacement) and
averages the per-task means. A *paired* bootstrap resamples the same example indices for both
configurations, which is what makes small differences on the same examples detectable.

Speed: the mean of a resample only depends on how many draws fall on each distinct value, so
for per-example 0/1 results a replicate is one multinomial draw over the distinct values (for
a paired difference: over the distinct (a, b) pairs), exactly the same distribution as
resampling indices but O(distinct values) instead of O(examples) per replicate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

PAPER_PPL_ACC_R = -0.94  # Dettmers & Zettlemoyer (2022): perplexity vs mean zero-shot accuracy
FEW_CELLS = 10  # below this many stable cells, r moves a lot with one cell
DEFAULT_N_BOOT = 10_000
DEFAULT_LEVEL = 0.95
_MAX_DISTINCT = 64  # above this many distinct values, resample indices in chunks instead
_CHUNK = 256


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval."""

    estimate: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL
    method: str = "bootstrap"  # bootstrap | paired-bootstrap | normal | none

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        pct = round(100 * self.level)
        return f"{self.estimate:.4f} [{pct}% CI {self.low:.4f}, {self.high:.4f}; {self.method}]"


def _replicate_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` bootstrap replicates of ``values.mean()`` (rows of ``values`` are examples)."""
    n = values.shape[0]
    distinct, counts = np.unique(values, axis=0, return_counts=True)
    if distinct.shape[0] <= _MAX_DISTINCT:
        draws = rng.multinomial(n, counts / n, size=n_boot)  # (n_boot, n_distinct)
        return draws @ distinct / n
    out = np.empty((n_boot, *values.shape[1:]))
    for start in range(0, n_boot, _CHUNK):
        stop = min(start + _CHUNK, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def _as_tasks(samples: Mapping[str, Sequence[float]] | Sequence[float]) -> dict[str, np.ndarray]:
    if isinstance(samples, Mapping):
        tasks = {t: np.asarray(v, dtype=float) for t, v in samples.items()}
    else:
        tasks = {"": np.asarray(samples, dtype=float)}
    for task, v in tasks.items():
        if v.ndim != 1 or v.size == 0:
            raise ValueError(
                f"per_sample of task {task!r} must be a non-empty 1-d list, got {v.shape}"
            )
    return tasks


def _percentile_interval(est: float, reps: np.ndarray, level: float, method: str) -> Interval:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    alpha = (1 - level) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha])
    return Interval(float(est), float(low), float(high), level, method)


def bootstrap_mean_ci(
    samples: Mapping[str, Sequence[float]] | Sequence[float],
    n_boot: int = DEFAULT_N_BOOT,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap CI of a (macro-over-tasks) mean accuracy.

    ``samples`` is one list of per-example scores, or ``{task: list}``; the estimate is the
    mean over tasks of each task's mean.
    """
    tasks = _as_tasks(samples)
    rng = np.random.default_rng(seed)
    reps = np.zeros(n_boot)
    for task in sorted(tasks):
        reps += _replicate_means(tasks[task], n_boot, rng)
    reps /= len(tasks)
    est = float(np.mean([v.mean() for v in tasks.values()]))
    return _percentile_interval(est, reps, level, "bootstrap")


def paired_bootstrap_diff(
    a: Mapping[str, Sequence[float]] | Sequence[float],
    b: Mapping[str, Sequence[float]] | Sequence[float],
    n_boot: int = DEFAULT_N_BOOT,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Interval:
    """Paired percentile bootstrap CI of mean(a) - mean(b) over the same examples.

    Both sides must list the same tasks with the same number of examples in the same order
    (the runner evaluates every cell on identical examples); anything else is refused, since
    an unpaired comparison would need a different method.
    """
    ta, tb = _as_tasks(a), _as_tasks(b)
    if set(ta) != set(tb):
        raise ValueError(f"paired bootstrap: tasks differ: {sorted(ta)} vs {sorted(tb)}")
    rng = np.random.default_rng(seed)
    reps = np.zeros(n_boot)
    for task in sorted(ta):
        if ta[task].shape != tb[task].shape:
            raise ValueError(
                f"paired bootstrap: task {task!r} has {ta[task].size} vs {tb[task].size} "
                "examples; pairing needs the same examples on both sides"
            )
        pairs = np.stack([ta[task], tb[task]], axis=1)
        means = _replicate_means(pairs, n_boot, rng)
        reps += means[:, 0] - means[:, 1]
    reps /= len(ta)
    est = float(np.mean([ta[t].mean() - tb[t].mean() for t in ta]))
    return _percentile_interval(est, reps, level, "paired-bootstrap")


def normal_interval(estimate: float, stderr: float, level: float = DEFAULT_LEVEL) -> Interval:
    """estimate +- z * stderr: the fallback when no per-example results were recorded."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    return Interval(float(estimate), estimate - z * stderr, estimate + z * stderr, level, "normal")


def pearson_r(x: Sequence[float], y: Sequence[float]) -> tuple[float, int]:
    """Pearson correlation over the pairs where both are finite; returns (r, n pairs)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    if n < 3:
        return float("nan"), n
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return (float((dx * dy).sum() / denom) if denom > 0 else float("nan")), n


def ppl_acc_correlation(
    cells: pd.DataFrame, ppl_column: str, acc_column: str, cap: float | None = None
) -> tuple[float, int]:
    """Pearson r between perplexity and mean zero-shot accuracy across cells.

    Unstable cells (perplexity above ``cap`` or non-finite) are left out: a single diverged
    cell at ppl 1e5 would otherwise decide r on its own.
    """
    if ppl_column not in cells or acc_column not in cells:
        return float("nan"), 0
    stable = stable_cells(cells, ppl_column, cap)
    return pearson_r(stable[ppl_column], stable[acc_column])


def stable_cells(cells: pd.DataFrame, ppl_column: str, cap: float | None = None) -> pd.DataFrame:
    """The cells whose perplexity is finite and at most ``cap``: what r is computed over."""
    ppl = cells[ppl_column].to_numpy(dtype=float)
    keep = np.isfinite(ppl) & ((ppl <= cap) if cap is not None else True)
    return cells[keep]


def correlation_caveat(
    r: float,
    n: int,
    acc: Sequence[float] | None = None,
    acc_stderr: Sequence[float] | None = None,
    paper_r: float = PAPER_PPL_ACC_R,
) -> str:
    """A plain-language caveat for a perplexity-accuracy r, or ``""`` when none is needed.

    Needed when r could not be computed, or when its sign differs from ``paper_r`` (r = 0
    included). ``acc``: the accuracies r was computed over, and ``acc_stderr`` their standard
    errors (either may be None): when given, the caveat states the accuracy range and how
    many typical standard errors it spans, the fact that most often explains a positive r
    (models near chance: accuracy differences are noise, perplexity still moves).
    Agreement in sign gets no caveat, whatever n is: ``stats.md`` states n beside r.
    """
    if not np.isfinite(r):
        return (
            f"r could not be computed: it needs at least 3 stable cells with both numbers "
            f"and some spread in each (here {n} cell(s)). Nothing can be concluded about the "
            "relation of perplexity and accuracy from this store."
        )
    if np.sign(r) == np.sign(paper_r):
        return ""
    facts = []
    if acc is not None:
        a = np.asarray(acc, dtype=float)
        a = a[np.isfinite(a)]
        if a.size:
            spread = float(a.max() - a.min())
            text = f"accuracy here spans {a.min():.3f} to {a.max():.3f}"
            se = np.asarray(acc_stderr if acc_stderr is not None else [], dtype=float)
            se = se[np.isfinite(se) & (se > 0)]
            if se.size:
                text += f", {spread / float(np.median(se)):.1f} times its typical standard error"
                text += f" ({float(np.median(se)):.3f})"
            facts.append(text)
    if n < FEW_CELLS:
        facts.append(f"only {n} cells: one cell can flip the sign")
    fact_text = f" ({'; '.join(facts)})" if facts else ""
    return (
        f"Caveat: the sign is the opposite of the paper's ({paper_r:+.2f}): on this store, "
        "cells with higher perplexity have higher zero-shot accuracy, not lower. This does "
        "not mean that quantization or a worse language model improves accuracy, nor that "
        "the paper's relation is wrong. The usual reasons are models near chance on the "
        "zero-shot tasks, where accuracy differences are noise while perplexity still moves; "
        "too few cells or models; or zero-shot tasks that do not match the perplexity text"
        f"{fact_text}. Do not use perplexity as a proxy for accuracy on this store; compare "
        "accuracies with their intervals (kbit-plot --report, kbit-advise)."
    )
