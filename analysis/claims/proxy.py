"""Claim 4: proxy quantization stabilises 3-bit but does not beat 4-bit."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.claims.compare import (
    curve_points,
    interp,
    pooled_comparison,
    sample_pairs,
    twin_columns,
)
from analysis.claims.model import (
    CLAIMS,
    DETAIL_ROLE,
    FAILS,
    HOLDS,
    NEGATIVE,
    NOT_SEPARATED,
    NOT_TESTED,
    PAPER_METHOD,
    POSITIVE,
    VERDICT_ROLE,
    Finding,
    ScopeData,
    bonferroni_level,
    not_tested,
)
from analysis.load import ACC_COLUMN

CLAIM4_DEF = (
    "(a) Every 3-bit proxy cell against its blockwise twin (same model, data type, block size, "
    "scale format, centering): proxy - blockwise accuracy, averaged over pairs. (b) Every 3-bit "
    "proxy cell against the blockwise 4-bit curve of the same data type, block size, scale "
    "format and centering across the scope's models, interpolated linearly in log2(total model "
    "bits) at the proxy cell's total bits (cells outside the curve's range left out): proxy - "
    "4-bit. Holds: (a) > 0 and (b) not > 0; does not hold: (a) < 0 or (b) > 0; else not "
    "separated. Two intervals, Bonferroni-widened."
)


# A proxy cell's blockwise twin shares these: the element format and the generic axes.
CURVE_CONFIG = twin_columns()


def curve_key(row: pd.Series) -> tuple:
    return tuple("nan" if pd.isna(row[c]) else str(row[c]) for c in CURVE_CONFIG)


def proxy_vs_4bit(proxy: pd.DataFrame, four: pd.DataFrame, samples: dict):
    """(proxy samples, 4-bit curve samples at its total bits) pairs; count outside the range."""
    curves: dict[tuple, list] = {}
    keys = pd.Series([curve_key(row) for _, row in four.iterrows()], index=four.index)
    for key, group in four.groupby(keys, sort=True) if len(four) else []:
        curves[key] = curve_points(group, 4, samples)
    pairs, outside = [], 0
    for _, row in proxy.iterrows():
        inside, s4 = interp(curves.get(curve_key(row), []), float(np.log2(row["total_model_bits"])))
        if not inside:
            outside += 1
            continue
        pairs.append((samples.get(row["key"]), s4))
    return pairs, outside


def claim_proxy(scope: ScopeData) -> Finding:
    """Claim 4 (definition: :data:`CLAIM4_DEF`)."""
    cells = scope.cells
    proxy = cells[cells["method"] == "proxy"]
    if proxy.empty:
        return not_tested(4, scope.name, ACC_COLUMN, CLAIM4_DEF, "no proxy cells")
    proxy3 = proxy[proxy["bits"] == 3]
    if proxy3.empty:
        return not_tested(4, scope.name, ACC_COLUMN, CLAIM4_DEF, "no 3-bit proxy cells")
    blockwise = cells[cells["method"] == PAPER_METHOD]
    lvl = bonferroni_level(scope.level, 2)
    twins = {
        (row["_model"], *curve_key(row)): row
        for _, row in blockwise[blockwise["bits"] == 3].iterrows()
    }
    pairs_a = [
        (row, twins[(row["_model"], *curve_key(row))])
        for _, row in proxy3.iterrows()
        if (row["_model"], *curve_key(row)) in twins
    ]
    comps, missing = [], []
    a = pooled_comparison(
        sample_pairs(pairs_a, scope.samples),
        "(a) proxy - blockwise, k=3",
        ACC_COLUMN,
        lvl,
        scope.n_boot,
        scope.seed,
    )
    if a is None:
        missing.append("no 3-bit blockwise twins of the proxy cells with per-example data")
    else:
        comps.append(a)
    four = blockwise[blockwise["bits"] == 4]
    pairs_b, outside = proxy_vs_4bit(proxy3, four, scope.samples)
    b = pooled_comparison(
        pairs_b,
        "(b) proxy k=3 - blockwise k=4 at equal total bits",
        ACC_COLUMN,
        lvl,
        scope.n_boot,
        scope.seed,
    )
    if b is None:
        missing.append(
            "no 4-bit blockwise curve (same data type, block size) covering the "
            "proxy cells' total bits"
        )
    else:
        if outside:
            b.note = "; ".join(
                filter(None, [b.note, f"{outside} proxy cell(s) outside the 4-bit curve's range"])
            )
        comps.append(b)
    if scope.nll_col:
        c = pooled_comparison(
            sample_pairs(pairs_a, scope.nll_samples, lower_is_better=True),
            "(a) proxy - blockwise, k=3, NLL (lower better: sign flipped)",
            scope.nll_col,
            scope.level,
            scope.n_boot,
            scope.seed,
            DETAIL_ROLE,
        )
        comps += [c] if c else []
    if a is None and b is None:
        return not_tested(4, scope.name, ACC_COLUMN, CLAIM4_DEF, "; ".join(missing))
    text = "; ".join(
        f"{c.label.split(' ')[0]} {c.estimate:+.4f} [{c.low:+.4f}, {c.high:+.4f}] (n={c.n})"
        for c in comps
        if c.role == VERDICT_ROLE
    )
    if (a and a.outcome == NEGATIVE) or (b and b.outcome == POSITIVE):
        verdict = FAILS
    elif missing:
        verdict, text = NOT_TESTED, text + "; " + "; ".join(missing)
    elif a.outcome == POSITIVE:
        verdict = HOLDS
    else:
        verdict = NOT_SEPARATED
    return Finding(
        4,
        CLAIMS[4],
        scope.name,
        ACC_COLUMN,
        CLAIM4_DEF,
        verdict,
        text,
        scope.level,
        f"Bonferroni over m=2 intervals (each at {lvl:.4g})",
        comps,
    )
