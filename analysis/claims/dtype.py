"""Claim 3: at 4 bits, quantile >= float > int."""

from __future__ import annotations

import pandas as pd

from analysis.claims.compare import detail_rows, pairs_by, pooled_comparison, sample_pairs
from analysis.claims.model import (
    CLAIMS,
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

CLAIM3_DEF = (
    "At k=4, pairs of cells of the same model, method blockwise, block size, scale format and "
    "centering, with the data type entries quantile, float and int as they are (no overrides): "
    "quantile - float and float - int, each averaged over its pairs. Holds: float - int > 0 and "
    "quantile - float not < 0; does not hold: either < 0; else not separated. Two intervals, "
    "Bonferroni-widened."
)


def dtype_pairs(frame: pd.DataFrame, cand: str, ref: str):
    frame = frame[(frame["dtype_overrides"] == "{}") & frame["dtype"].isin([cand, ref])]

    def order(values):
        return [(cand, ref)] if cand in values and ref in values else []

    return pairs_by(frame, "dtype", order)


def claim_dtype(scope: ScopeData) -> Finding:
    """Claim 3 (definition: :data:`CLAIM3_DEF`)."""
    cells = scope.cells
    cells = cells[cells["bits"] == 4]
    lvl = bonferroni_level(scope.level, 2)
    comps, missing = [], []
    for cand, ref in (("quantile", "float"), ("float", "int")):
        pairs = dtype_pairs(cells[cells["method"] == PAPER_METHOD], cand, ref)
        c = pooled_comparison(
            sample_pairs(pairs, scope.samples),
            f"{cand} - {ref}, blockwise k=4",
            ACC_COLUMN,
            lvl,
            scope.n_boot,
            scope.seed,
        )
        if c is None:
            missing.append(f"no 4-bit blockwise {cand}/{ref} pairs with per-example data")
        else:
            comps.append(c)
    for cand, ref in (("quantile", "float"), ("float", "int")):
        comps += detail_rows(
            scope,
            cells,
            lambda f, c=cand, r=ref: dtype_pairs(f, c, r),
            f"{cand} - {ref}",
            split_k=False,
        )
    main = {c.label.split(",")[0]: c for c in comps if c.role == VERDICT_ROLE}
    if not main:
        return not_tested(3, scope.name, ACC_COLUMN, CLAIM3_DEF, "; ".join(missing))
    text = "; ".join(
        f"{name} {c.estimate:+.4f} [{c.low:+.4f}, {c.high:+.4f}] (n={c.n})"
        for name, c in main.items()
    )
    reversed_ = [name for name, c in main.items() if c.outcome == NEGATIVE]
    if reversed_:
        verdict = FAILS
    elif missing:
        verdict = NOT_TESTED
        text += "; " + "; ".join(missing)
    elif main["float - int"].outcome == POSITIVE:
        verdict = HOLDS
    else:
        verdict = NOT_SEPARATED
    return Finding(
        3,
        CLAIMS[3],
        scope.name,
        ACC_COLUMN,
        CLAIM3_DEF,
        verdict,
        text,
        scope.level,
        f"Bonferroni over m=2 intervals (each at {lvl:.4g})",
        comps,
    )
