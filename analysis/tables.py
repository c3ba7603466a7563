"""Scaling curves, the bit-optimal k per total-bit budget, the best cell per budget.

The paper's bit-level scaling view: for each bit width k, a *curve* joins the models of one
family in order of total model bits. The bit-optimal k for a budget B is the k whose curve,
interpolated linearly in log2(total model bits), is highest (accuracy) or lowest (perplexity)
at B. A curve is only read inside its measured range: no extrapolation, since the point of the
table is what was measured.

Ties: two curves whose interpolated values differ by at most ``TIE_TOL`` are tied; the tie
goes to the smaller k (fewer bits per parameter, i.e. the larger model at that budget).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.load import ACC_COLUMN

log = logging.getLogger(__name__)

TIE_TOL = 1e-12
BASELINE_BITS = 16
# A cell's quantization configuration, apart from k: cells that share it form one curve.
QUANT_CONFIG = ["method", "dtype", "block_size", "scale_format", "centering", "outlier_fraction"]
CURVE_COLUMNS = ["model_family", "bits", "model", "key", "total_model_bits", *QUANT_CONFIG]


def config_label(row: pd.Series) -> str:
    """The label of one cell (see :func:`config_labels` for a whole frame)."""
    if row["method"] == "none":
        return "16-bit baseline"
    bs = "tensor" if pd.isna(row["block_size"]) else int(row["block_size"])
    label = f"{row['dtype']} bs={bs} {row['scale_format']}"
    if bool(row["centering"]):
        label += " centered"
    if row["method"] == "proxy":
        label += f" proxy({row['outlier_fraction']:g})"
    return label


def config_labels(cells: pd.DataFrame) -> pd.Series:
    """A short human label per cell for its quantization configuration (k excluded).

    Vectorized twin of the per-row label: a row-wise ``apply`` over a 1,000-cell frame cost
    a noticeable share of the plotting time.
    """
    if cells.empty:
        return pd.Series([], dtype=object, index=cells.index)
    bs = cells["block_size"].map(lambda b: "tensor" if pd.isna(b) else str(int(b)))
    label = cells["dtype"].astype(str) + " bs=" + bs + " " + cells["scale_format"].astype(str)
    label = label.where(~cells["centering"].astype(bool), label + " centered")
    outl = cells["outlier_fraction"].map("{:g}".format)
    label = label.where(cells["method"] != "proxy", label + " proxy(" + outl + ")")
    return label.where(cells["method"] != "none", "16-bit baseline").astype(object)


def main_curves(cells: pd.DataFrame, y: str = ACC_COLUMN) -> pd.DataFrame:
    """One curve per (family, k): the points the paper's scaling figure draws.

    A grid usually holds several configurations per k (data types, block sizes, proxy,
    centering); those have their own figures. For the main figure each (family, k) keeps the
    plain block-wise configuration (method blockwise, or none for the 16-bit baseline) that
    covers the most models; ties go to the higher mean zero-shot accuracy (whatever ``y``
    is, so the accuracy and perplexity figures show the same configurations), then to the
    label. Returns one row per (family, k, model) with ``y`` and the chosen ``config`` label.
    """
    columns = [*CURVE_COLUMNS, y, "config"]
    need = {"model_family", "bits", "total_model_bits", y}
    if cells.empty or not need <= set(cells.columns):
        return pd.DataFrame(columns=columns)
    plain = cells[cells["method"].isin(["blockwise", "none"]) & cells[y].notna()]
    if plain.empty:
        return pd.DataFrame(columns=columns)
    plain = plain.assign(
        config=config_labels(plain),
        # Rank configurations by accuracy even when plotting perplexity, so both agree.
        _rank=plain[ACC_COLUMN] if ACC_COLUMN in plain.columns else 0.0,
    )
    group = ["model_family", "bits"]
    score = plain.groupby([*group, "config"], as_index=False).agg(
        n=("model", "nunique"), mean=("_rank", "mean")
    )
    score = score.sort_values(
        [*group, "n", "mean", "config"], ascending=[True, True, False, False, True]
    ).drop_duplicates(group)
    chosen = plain.merge(score[[*group, "config"]], on=[*group, "config"])
    chosen = chosen.sort_values([*group, "total_model_bits"], ignore_index=True)
    return chosen.drop_duplicates([*group, "model"], ignore_index=True)[columns]


def interpolate_log2(
    total_bits: Sequence[float], values: Sequence[float], budgets: Sequence[float]
) -> np.ndarray:
    """Values of a curve at ``budgets``, linear in log2(total bits); NaN outside its range.

    Points at the same total bits are averaged (np.interp needs increasing x).
    """
    x = np.log2(np.asarray(total_bits, dtype=float))
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(x) & np.isfinite(v)
    x, v = x[ok], v[ok]
    b = np.log2(np.asarray(budgets, dtype=float))
    out = np.full(b.shape, np.nan)
    if x.size == 0:
        return out
    ux, inverse = np.unique(x, return_inverse=True)
    uv = np.bincount(inverse, weights=v) / np.bincount(inverse)
    inside = (b >= ux[0]) & (b <= ux[-1])
    out[inside] = np.interp(b[inside], ux, uv)
    return out


def default_budgets(curves: pd.DataFrame, per_octave: int = 2) -> np.ndarray:
    """Budgets on a log2 grid (``per_octave`` per doubling) spanning all measured curves."""
    bits = curves["total_model_bits"].to_numpy(dtype=float)
    bits = bits[np.isfinite(bits) & (bits > 0)]
    if bits.size == 0:
        return np.array([])
    lo = np.ceil(np.log2(bits.min()) * per_octave)
    hi = np.floor(np.log2(bits.max()) * per_octave)
    return 2.0 ** (np.arange(lo, hi + 1) / per_octave)


def bit_optimal_table(
    curves: pd.DataFrame,
    budgets: Sequence[float] | None = None,
    y: str = ACC_COLUMN,
    higher_is_better: bool = True,
) -> pd.DataFrame:
    """The bit-optimal k per family and budget, with every k's interpolated value.

    Columns: model_family, budget_bits, log2_budget, best_k, best_value, and ``k=<k>`` per bit
    width (NaN where the budget is outside that k's measured range). ``best_k`` is <NA> when no
    curve covers the budget.
    """
    budgets = default_budgets(curves) if budgets is None else np.asarray(budgets, dtype=float)
    rows = []
    for fam, fam_curves in curves.groupby("model_family", sort=True):
        ks = sorted(int(k) for k in fam_curves["bits"].unique())
        interp = {
            k: interpolate_log2(c["total_model_bits"], c[y], budgets)
            for k, c in fam_curves.groupby("bits")
        }
        for i, budget in enumerate(budgets):
            row = {"model_family": fam, "budget_bits": budget, "log2_budget": np.log2(budget)}
            best_k, best_v = pd.NA, np.nan
            for k in ks:  # ascending k: a later k must be strictly better to win a tie
                v = interp[k][i]
                row[f"k={k}"] = v
                if np.isnan(v):
                    continue
                better = v > best_v + TIE_TOL if higher_is_better else v < best_v - TIE_TOL
                if np.isnan(best_v) or better:
                    best_k, best_v = k, v
            row["best_k"], row["best_value"] = best_k, best_v
            rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=["model_family", "budget_bits", "log2_budget", "best_k"])
    front = ["model_family", "budget_bits", "log2_budget", "best_k", "best_value"]
    k_cols = sorted((c for c in table.columns if c.startswith("k=")), key=lambda c: int(c[2:]))
    table["best_k"] = table["best_k"].astype("Int64")
    return table[front + k_cols]


def rank_under_budget(cells: pd.DataFrame, budget_bits: float, y: str = ACC_COLUMN) -> pd.DataFrame:
    """Measured cells that fit ``budget_bits``, best ``y`` first.

    Ties on ``y`` go to the smaller total model bits, then to the key (deterministic).
    """
    if cells.empty or y not in cells.columns:
        return cells.iloc[0:0]
    fits = cells[(cells["total_model_bits"] <= budget_bits) & cells[y].notna()]
    return fits.sort_values(
        [y, "total_model_bits", "key"], ascending=[False, True, True], ignore_index=True
    )


def best_config_table(
    cells: pd.DataFrame, budgets: Sequence[float], y: str = ACC_COLUMN
) -> pd.DataFrame:
    """The best measured cell (any model, k, data type, block size, method) per budget."""
    rows = []
    for budget in budgets:
        ranked = rank_under_budget(cells, budget, y)
        row: dict = {"budget_bits": budget, "budget_GiB": budget / 8 / 2**30}
        if not ranked.empty:
            best = ranked.iloc[0]
            row.update(
                model=best["model"],
                model_family=best["model_family"],
                bits=int(best["bits"]),
                config=config_label(best),
                total_model_bits=best["total_model_bits"],
                value=best[y],
                n_fitting=len(ranked),
            )
        rows.append(row)
    return pd.DataFrame(rows)


CELL_TABLE_COLUMNS = [
    "sweep",
    "cell_id",
    "model",
    "model_family",
    "n_params",
    "method",
    "dtype",
    "bits",
    "block_size",
    "scale_format",
    "centering",
    "outlier_fraction",
    "total_model_bits",
    "bits_per_param",
]


def cell_table(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: configuration, size and every measured ``task:metric``."""
    measured = [c for c in cells.columns if ":" in c]
    return cells[[c for c in CELL_TABLE_COLUMNS if c in cells.columns] + sorted(measured)]


def to_markdown(frame: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured markdown table (no optional dependency needed)."""

    def fmt(v: object) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            return ""
        if isinstance(v, float | np.floating):
            return format(float(v), floatfmt)
        return str(v).replace("|", "\\|")

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    sep = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, sep, *body]) + "\n"
