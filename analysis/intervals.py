"""Intervals: the one place every interval a figure or table draws comes from.

Why its own module: the estimators (a Student-t or normal quantile, batch-means standard errors
of per-window NLL, the held-out half's standard error) are statistics, not table logic, and
issue 24 replaces them here without touching the tables. ``analysis.tables`` re-exports every
public name (``analysis.tables.interval`` is a public path).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import pandas as pd

from analysis.selection import ESTIMATE_HELDOUT
from harness.records import MEAN_ZEROSHOT_TASK

INTERVAL_LEVEL = 0.95
# Interval inputs main_curves carries per point: the standard error of ``y`` on all examples
# (``se``, with ``se_df`` degrees of freedom, NaN = normal) and on held-out half B
# (``se_heldout``); :func:`point_stderr` picks the one that matches the point's ``estimate``.
STDERR_COLUMNS = ["se", "se_df", "se_heldout"]


# --- intervals -------------------------------------------------------------------------------
# Every interval a figure draws comes from :func:`interval`; the standard errors it takes come
# from :func:`measure_stderr` (recorded stderr, or per-window NLL by batch means) and
# :func:`half_b_stderr`. Issue 24 may replace the statistics: these are the places to do it.


def _quantile(level: float, df: np.ndarray) -> np.ndarray:
    """Two-sided ``level`` quantile: Student t for finite ``df`` >= 1, the normal elsewhere."""
    df = np.asarray(df, dtype=float)
    z = NormalDist().inv_cdf((1 + level) / 2)
    q = np.full(df.shape, z)
    finite = np.isfinite(df) & (df >= 1)
    if finite.any():
        from scipy.stats import t  # scipy comes with lm-eval (scikit-learn)

        q[finite] = t.ppf((1 + level) / 2, df[finite])
    return q


def interval(
    values: Sequence[float],
    stderr: Sequence[float],
    df: Sequence[float] | None = None,
    log_scale: bool = False,
    level: float = INTERVAL_LEVEL,
) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of a ``level`` interval around each value from its standard error.

    ``value +- q * stderr`` with q the normal quantile (Student t where ``df`` is given);
    ``log_scale``: the standard error is of ``log(value)`` (perplexity = exp(mean NLL), whose
    standard error is that of the mean NLL), so the interval is ``exp(log(value) +- q * se)``.
    NaN where the standard error is unknown: no interval is drawn rather than a made-up one.
    """
    v = np.asarray(values, dtype=float)
    se = np.asarray(stderr, dtype=float)
    q = _quantile(level, np.full(v.shape, np.nan) if df is None else np.asarray(df, float))
    if log_scale:
        with np.errstate(divide="ignore", invalid="ignore"):
            centre = np.log(v)
            return np.exp(centre - q * se), np.exp(centre + q * se)
    return v - q * se, v + q * se


def window_stderr(windows: Sequence[float]) -> tuple[float, int]:
    """(standard error of the mean per-window NLL, its degrees of freedom), by batch means.

    Why batches: windows are consecutive pieces of one text, so neighbours are correlated and
    treating n windows as n independent draws would claim too narrow an interval. The
    windows are cut into b = floor(sqrt(n)) contiguous batches of equal length (a remainder
    at the end is left out of the error estimate); the batch means are much closer to
    independent, and their spread over b - 1 degrees of freedom gives the standard error
    (a Student t quantile then widens the interval for few batches). Fewer than 4 windows:
    NaN (no honest interval).
    """
    w = np.asarray(windows, dtype=float)
    w = w[np.isfinite(w)]
    if w.size < 4:
        return math.nan, 0
    b = max(2, math.isqrt(w.size))
    m = w.size // b
    means = w[: b * m].reshape(b, m).mean(axis=1)
    return float(means.std(ddof=1) / math.sqrt(b)), b - 1


def _window_stderrs(per_sample: pd.DataFrame | None, task: str) -> pd.DataFrame:
    """Per key: ``se``/``df`` of the ``task`` per-window NLL (:func:`window_stderr`)."""
    if per_sample is None or per_sample.empty:
        return pd.DataFrame(columns=["se", "df"])
    rows = per_sample[(per_sample["task"] == task) & (per_sample["metric"] == "nll")]
    out = {
        key: window_stderr(values)
        for key, values in zip(rows["key"], rows["per_sample"], strict=True)
    }
    return pd.DataFrame.from_dict(out, orient="index", columns=["se", "df"])


def measure_stderr(
    cells: pd.DataFrame, column: str, per_sample: pd.DataFrame | None = None
) -> tuple[pd.Series, pd.Series]:
    """(standard error, degrees of freedom) of ``column`` per cell; NaN where unknown.

    Accuracies: the recorded ``<column>:stderr`` (lm-eval's; for ``zeroshot_mean`` the
    independent-tasks combination of its tasks' stderrs), normal (df NaN). Perplexity
    ``<task>:ppl``: the standard error of the mean NLL (so of log ppl), from the per-window NLL
    in ``per_sample`` by batch means (:func:`window_stderr`), else a recorded
    ``<task>:nll:stderr`` (with ``<task>:nll:stderr_df`` where given).
    """
    nan = pd.Series(np.nan, index=cells.index, dtype=float)
    if column.endswith(":ppl"):
        task = column[: -len(":ppl")]
        windows = _window_stderrs(per_sample, task)
        se = cells["key"].map(windows["se"]).astype(float) if "key" in cells else nan
        df = cells["key"].map(windows["df"]).astype(float) if "key" in cells else nan
        recorded = f"{task}:nll:stderr"
        if recorded in cells.columns:
            fill = se.isna()
            se = se.where(~fill, pd.to_numeric(cells[recorded], errors="coerce"))
            rec_df = cells.get(f"{recorded}_df", nan)
            df = df.where(~fill, pd.to_numeric(rec_df, errors="coerce"))
        return se, df
    recorded = f"{column}:stderr"
    if recorded not in cells.columns:
        return nan, nan.copy()
    return pd.to_numeric(cells[recorded], errors="coerce").astype(float), nan.copy()


def with_window_stderr(cells: pd.DataFrame, per_sample: pd.DataFrame | None) -> pd.DataFrame:
    """``cells`` with ``<task>:nll:stderr`` (and ``_df``) from per-window NLL, for every
    perplexity task: what lets the figures that take only ``cells`` (data types, methods)
    draw perplexity intervals. Unchanged without per-window rows."""
    if per_sample is None or per_sample.empty or "key" not in cells.columns:
        return cells
    tasks = per_sample.loc[per_sample["metric"] == "nll", "task"].unique()
    extra = {}
    for task in sorted(tasks):
        stderrs = _window_stderrs(per_sample, task)
        extra[f"{task}:nll:stderr"] = cells["key"].map(stderrs["se"]).astype(float)
        extra[f"{task}:nll:stderr_df"] = cells["key"].map(stderrs["df"]).astype(float)
    return cells.assign(**extra)


def half_b_stderr(per_sample: pd.DataFrame | None) -> pd.Series:
    """Standard error of each cell's half-B macro-mean accuracy, indexed by ``key``.

    The same examples :func:`analysis.selection.half_scores` averages (odd positions of each
    task's per-example 0/1), each task's stderr as lm-eval computes it (sample standard
    deviation / sqrt(n)), combined over tasks as independent: sqrt(sum se^2) / n_tasks.
    """
    if per_sample is None or per_sample.empty:
        return pd.Series(dtype=float)
    rows = per_sample[(per_sample["metric"] == "acc") & (per_sample["task"] != MEAN_ZEROSHOT_TASK)]
    var: dict[str, list[float]] = {}
    for key, values in zip(rows["key"], rows["per_sample"], strict=True):
        v = np.asarray(values, dtype=float)
        if v.size < 2:  # no two halves (as half_scores)
            continue
        half = v[1::2]
        se2 = half.var(ddof=1) / half.size if half.size > 1 else np.nan
        var.setdefault(key, []).append(se2)
    return pd.Series({k: math.sqrt(sum(s)) / len(s) for k, s in var.items()}, dtype=float)


def point_stderr(curves: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(stderr, df) of each main-curve point for what it reports (``estimate``): the
    held-out half-B stderr for points on half B, the all-examples one otherwise."""
    nan = pd.Series(np.nan, index=curves.index, dtype=float)
    se = curves["se"].astype(float) if "se" in curves.columns else nan
    df = curves["se_df"].astype(float) if "se_df" in curves.columns else nan
    if "estimate" in curves.columns and "se_heldout" in curves.columns:
        held = curves["estimate"] == ESTIMATE_HELDOUT
        se = se.where(~held, curves["se_heldout"].astype(float))
        df = df.where(~held, np.nan)
    return se, df
