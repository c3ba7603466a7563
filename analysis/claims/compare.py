"""Paired comparisons of cells: per-example data, pooled bootstrap intervals, cell pairs.

Every interval of the claims is a paired percentile bootstrap
(:func:`analysis.stats.paired_bootstrap_diff`, stratified by task) over the examples that the
cells of a scope share. This module holds what the claims share to get there: the per-example
data by cell key, the mean over cell pairs (:func:`pooled_comparison`), the interpolation of a
k curve in log2(total model bits), and the pairing of cells that differ in one field.

Pairing: cells pair when they agree on the model (checkpoint included), on k and on every
quantization axis of the record schema apart from the one a claim varies
(:func:`analysis.tables.pairing_columns`, derived from the cell schema's axis roles), so an
axis added to the schema is part of every pairing without a line here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from analysis.claims.model import (
    DETAIL_ROLE,
    FAILS,
    HOLDS,
    NEGATIVE,
    NO_INTERVAL,
    NOT_SEPARATED,
    PAPER_METHOD,
    POSITIVE,
    TIED,
    VERDICT_ROLE,
    Comparison,
    Samples,
    ScopeData,
)
from analysis.load import ACC_COLUMN
from analysis.stats import paired_bootstrap_diff
from analysis.tables import pairing_columns
from harness.records import AXES_COLUMN, MEAN_ZEROSHOT_TASK

# The element format a method is applied with: claim 4 pairs a proxy cell with the blockwise
# cell of the same format (and generic axes), whatever the two methods' own settings.
FORMAT_COLUMNS = ("dtype", "dtype_overrides", "block_size", "scale_format", "centering")


def twin_columns() -> list[str]:
    """The pairing columns of two cells that differ in method (and the method's settings):
    the element format and the generic axes, in the schema's order."""
    return [c for c in pairing_columns("method") if c in FORMAT_COLUMNS or c == AXES_COLUMN]


def samples_by_key(per_sample: pd.DataFrame, nll_task: str | None) -> tuple[dict, dict]:
    """({key: {task: 0/1}} of per-task accuracy rows, {key: {task: per-window NLL}})."""
    acc: dict[str, Samples] = {}
    nll: dict[str, Samples] = {}
    if per_sample.empty:
        return acc, nll
    for row in per_sample.itertuples():
        values = np.asarray(row.per_sample, dtype=float)
        if values.ndim != 1 or values.size == 0:
            continue
        if row.metric == "acc" and row.task != MEAN_ZEROSHOT_TASK:
            acc.setdefault(row.key, {})[row.task] = values
        elif row.metric == "nll" and row.task == nll_task:
            nll.setdefault(row.key, {})[row.task] = values
    return acc, nll


def sample_signature(samples: Samples) -> tuple:
    return tuple(sorted((t, v.size) for t, v in samples.items()))


def combine(parts: Sequence[tuple[float, Samples | None]]) -> Samples | None:
    """sum_i w_i * samples_i, per task and example; None if any is missing or they differ."""
    if not parts or any(s is None for _, s in parts):
        return None
    sig = sample_signature(parts[0][1])
    if any(sample_signature(s) != sig for _, s in parts):
        return None
    return {t: sum(w * s[t] for w, s in parts) for t in parts[0][1]}


def interval_outcome(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return NO_INTERVAL
    return POSITIVE if low > 0 else NEGATIVE if high < 0 else TIED


def pooled_comparison(
    pairs: Sequence[tuple[Samples | None, Samples | None]],
    label: str,
    metric: str,
    level: float,
    n_boot: int,
    seed: int,
    role: str = VERDICT_ROLE,
) -> Comparison | None:
    """Mean over pairs of (a - b), with a joint paired bootstrap interval over the examples.

    Pairs lacking per-example data on either side, or on examples unlike the most common
    set (other tasks or counts), are left out and counted in ``note``. None if no pair is
    left.
    """
    usable = [(a, b) for a, b in pairs if a and b and sample_signature(a) == sample_signature(b)]
    notes = []
    if len(usable) < len(pairs):
        notes.append(f"{len(pairs) - len(usable)} pair(s) without paired per-example data left out")
    if not usable:
        return None
    sigs = pd.Series([sample_signature(a) for a, _ in usable])
    common = sigs.value_counts().index[0]
    kept = [p for p, s in zip(usable, sigs, strict=True) if s == common]
    if len(kept) < len(usable):
        notes.append(f"{len(usable) - len(kept)} pair(s) on other examples left out")
    a = combine([(1 / len(kept), x) for x, _ in kept])
    b = combine([(1 / len(kept), y) for _, y in kept])
    ci = paired_bootstrap_diff(a, b, n_boot=n_boot, level=level, seed=seed)
    return Comparison(
        label=label,
        metric=metric,
        estimate=ci.estimate,
        low=ci.low,
        high=ci.high,
        level=level,
        n=len(kept),
        n_examples=sum(v.size for v in a.values()),
        role=role,
        outcome=interval_outcome(ci.low, ci.high),
        note="; ".join(notes),
    )


def curve_points(curves: pd.DataFrame, k: int, samples: dict) -> list[tuple[float, Samples]]:
    """(log2 total bits, per-example scores) of one k's curve; equal sizes averaged."""
    pts = curves[curves["bits"] == k]
    out: list[tuple[float, Samples | None]] = []
    for x, group in pts.groupby(np.log2(pts["total_model_bits"].astype(float)), sort=True):
        parts = [(1 / len(group), samples.get(key)) for key in group["key"]]
        out.append((float(x), combine(parts)))
    return out


def interp(points: list[tuple[float, Samples | None]], x: float) -> tuple[bool, Samples | None]:
    """(budget inside the curve's range, interpolated per-example scores or None if missing)."""
    if not points or x < points[0][0] - 1e-9 or x > points[-1][0] + 1e-9:
        return False, None
    xs = [p[0] for p in points]
    j = int(np.searchsorted(xs, x, side="right")) - 1
    j = min(max(j, 0), len(points) - 1)
    if j == len(points) - 1 or abs(x - xs[j]) < 1e-9:
        return True, points[j][1]
    w = (x - xs[j]) / (xs[j + 1] - xs[j])
    return True, combine([(1 - w, points[j][1]), (w, points[j + 1][1])])


def pairs_by(cells: pd.DataFrame, vary: str, order) -> list[tuple[pd.Series, pd.Series]]:
    """(better-by-claim, reference) cell pairs that differ only in ``vary``: same model, k and
    :func:`analysis.tables.pairing_columns` (``cells`` with config defaults filled).

    ``order(values)`` returns the (candidate, reference) value pairs to form within a group.
    """
    if cells.empty:
        return []
    group_cols = ["_model", "bits", *pairing_columns(vary)]
    pairs = []
    for _, group in cells.groupby(group_cols, sort=True, dropna=False):
        by_value = {
            v: row for v, row in zip(group[vary], (r for _, r in group.iterrows()), strict=True)
        }
        for cand, ref in order(list(by_value)):
            pairs.append((by_value[cand], by_value[ref]))
    return pairs


def block_order(values: list) -> list[tuple]:
    """Adjacent (smaller, next larger) block sizes; a per-tensor scale (NaN) is the largest."""
    ranked = sorted(values, key=lambda b: math.inf if pd.isna(b) else float(b))
    return list(itertools.pairwise(ranked))


def sample_pairs(pairs, samples: dict, lower_is_better: bool = False):
    """Per-example data of each (candidate, reference) pair, oriented so > 0 favours the first."""
    out = []
    for cand, ref in pairs:
        a, b = samples.get(cand["key"]), samples.get(ref["key"])
        out.append((b, a) if lower_is_better else (a, b))
    return out


def bs_text(b) -> str:
    return "tensor" if pd.isna(b) else str(int(b))


def detail_rows(
    scope: ScopeData,
    cells: pd.DataFrame,
    make_pairs: Callable[[pd.DataFrame], list[tuple[pd.Series, pd.Series]]],
    label: str,
    split_k: bool = True,
) -> list[Comparison]:
    """Per-k, other-method and NLL detail comparisons of a pooled claim on ``cells`` (the
    scope's cells the claim looks at), shown at the scope's level, never in a verdict."""
    rows: list[Comparison] = []
    blockwise = cells[cells["method"] == PAPER_METHOD]

    def accuracy_detail(subset: pd.DataFrame, name: str) -> None:
        pairs = sample_pairs(make_pairs(subset), scope.samples)
        c = pooled_comparison(
            pairs, name, ACC_COLUMN, scope.level, scope.n_boot, scope.seed, DETAIL_ROLE
        )
        rows.extend([c] if c else [])

    if split_k:
        for k in sorted(blockwise["bits"].unique()):
            accuracy_detail(blockwise[blockwise["bits"] == k], f"{label}, blockwise k={k}")
    for method in sorted(set(cells["method"]) - {PAPER_METHOD, "none"}):
        accuracy_detail(cells[cells["method"] == method], f"{label}, {method}")
    if scope.nll_col:
        pairs = make_pairs(blockwise)
        c = pooled_comparison(
            sample_pairs(pairs, scope.nll_samples, lower_is_better=True),
            f"{label}, blockwise, NLL (lower better: sign flipped)",
            scope.nll_col,
            scope.level,
            scope.n_boot,
            scope.seed,
            DETAIL_ROLE,
        )
        if c:
            rows.append(c)
        elif pairs:
            rows.append(
                Comparison(
                    f"{label}, blockwise, NLL",
                    scope.nll_col,
                    float("nan"),
                    None,
                    None,
                    scope.level,
                    len(pairs),
                    0,
                    DETAIL_ROLE,
                    NO_INTERVAL,
                    "no per-window data: not compared",
                )
            )
    return rows


def simple_verdict(c: Comparison) -> tuple[str, str]:
    verdict = {POSITIVE: HOLDS, NEGATIVE: FAILS}.get(c.outcome, NOT_SEPARATED)
    return (
        verdict,
        f"pooled difference {c.estimate:+.4f} [{c.low:+.4f}, {c.high:+.4f}] ({c.outcome})",
    )
