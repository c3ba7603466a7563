"""The bit-optimal k per total-bit budget, with its paired window-bootstrap interval.

For each D level shared by two or more model sizes, each k's held-out NLL curve across sizes
is interpolated in log2(total model bits) (analysis.tables.interpolate_log2) and the k with
the lowest NLL wins; the choice is repeated on every bootstrap replicate of
analysis/fit_data.py. docs/fit.md has the decisions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.fit_data import DEFAULT_LEVEL, LawData
from analysis.tables import TIE_TOL, default_budgets, interpolate_log2
from harness.records import BASELINE_BITS


def budget_groups(data: LawData) -> list[tuple[str, pd.DataFrame]]:
    """(label, cells) per comparison: each D level shared by >= 2 sizes, and each size's final
    (largest-D) checkpoint when those are not all one D level. Baselines included."""
    cells = data.cells
    out = []
    n_per_d = cells.groupby("D")["N"].nunique()
    for d in sorted(n_per_d.index[n_per_d >= 2]):
        out.append((f"D={d:.4g}", cells[cells["D"] == d]))
    final = cells.groupby("N")["D"].transform("max")
    finals = cells[cells["D"] == final]
    if finals["N"].nunique() >= 2 and finals["D"].nunique() > 1:
        out.append(("final checkpoint per size", finals))
    return out


def _interp_matrix(total_bits: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """``(budgets, points)`` weights such that ``weights @ values`` is
    :func:`analysis.tables.interpolate_log2` of ``values`` (it is linear in them)."""
    eye = np.eye(len(total_bits))
    return np.column_stack([interpolate_log2(total_bits, row, budgets) for row in eye])


def _best_k(values: np.ndarray) -> np.ndarray:
    """Index (along axis 0, ascending k) of the lowest value; ties (TIE_TOL) to the smaller k;
    -1 where nothing is covered."""
    filled = np.where(np.isnan(values), np.inf, values)
    best = filled.min(axis=0)
    idx = np.argmax(filled <= best + TIE_TOL, axis=0)
    return np.where(np.isfinite(best), idx, -1)


def bit_optimal(
    data: LawData,
    means: np.ndarray,
    level: float = DEFAULT_LEVEL,
    per_octave: int = 2,
) -> pd.DataFrame:
    """Per group, comparison (D level) and budget: the k with the lowest held-out NLL.

    Each k's curve joins the sizes at that D in order of total model bits and is interpolated
    linearly in log2(total model bits) inside its measured range
    (:func:`analysis.tables.interpolate_log2`); the 16-bit baselines are the ``k=16`` curve.
    Per data type (a dtype's cells never mix with another's). Only budgets that at least two
    curves reach are listed (``k_measured``: the k whose curve covers the budget; a k outside
    it was not measured there, it did not lose). The choice is repeated on every bootstrap
    replicate: ``share`` is the share of replicates choosing ``best_k``, ``k_set`` the k
    chosen by at least (1 - level) / 2 of them.
    """
    point = data.nll.mean(axis=1)
    tail = (1 - level) / 2
    rows = []
    for label, cells in budget_groups(data):
        base = cells[cells["k"] == BASELINE_BITS]
        for group in sorted(g for g in cells["group"].unique() if g):
            sub = pd.concat([cells[cells["group"] == group], base])
            ks = sorted(int(k) for k in sub["k"].unique())
            if len(ks) < 2:
                continue
            budgets = default_budgets(sub, per_octave)
            if budgets.size == 0:
                continue
            vals, reps = [], []
            for k in ks:
                curve = sub[sub["k"] == k]
                w = _interp_matrix(curve["total_model_bits"].to_numpy(float), budgets)
                vals.append(w @ point[curve["row"].to_numpy()])
                reps.append(means[:, curve["row"].to_numpy()] @ w.T)
            vals, reps = np.stack(vals), np.stack(reps)  # (k, budgets), (k, boot, budgets)
            best = _best_k(vals)
            best_reps = _best_k(reps)  # (boot, budgets)
            covered = ~np.isnan(vals)
            for i, budget in enumerate(budgets):
                if covered[:, i].sum() < 2:  # one curve alone would win by default
                    continue
                chosen = best_reps[:, i]
                shares = {ks[j]: float((chosen == j).mean()) for j in range(len(ks))}
                row = {"group": group, "comparison": label, "budget_bits": float(budget),
                       "log2_budget": float(np.log2(budget)), "best_k": ks[best[i]],
                       "best_nll": float(vals[best[i], i]), "share": shares[ks[best[i]]],
                       "k_set": [k for k in ks if shares[k] >= tail],
                       "k_measured": [k for j, k in enumerate(ks) if covered[j, i]],
                       "D": float(sub["D"].max()) if label.startswith("D=") else np.nan,
                       "n_sizes": int(sub["N"].nunique())}  # fmt: skip
                row.update({f"k={k}": float(vals[j, i]) for j, k in enumerate(ks)})
                rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    order = table["comparison"].str.startswith("final").astype(int)
    table = table.assign(_o=order).sort_values(["group", "_o", "D", "budget_bits"])
    return table.drop(columns="_o").reset_index(drop=True)
