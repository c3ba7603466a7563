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

from analysis.cell_keys import BASELINE_METHOD as BASELINE_METHOD
from analysis.cell_keys import NUMERICS_COLUMNS as NUMERICS_COLUMNS
from analysis.cell_keys import PLAIN_METHOD as PLAIN_METHOD
from analysis.cell_keys import QUANT_CONFIG as QUANT_CONFIG
from analysis.cell_keys import VARIANT_COLUMNS as VARIANT_COLUMNS
from analysis.cell_keys import config_keys as config_keys
from analysis.cell_keys import config_label as config_label
from analysis.cell_keys import config_labels as config_labels
from analysis.cell_keys import method_settings_of as method_settings_of
from analysis.cell_keys import method_text as method_text
from analysis.cell_keys import overrides_text as overrides_text
from analysis.cell_keys import pairing_columns as pairing_columns
from analysis.cell_keys import pairing_keys as pairing_keys
from analysis.cell_keys import variant_labels as variant_labels
from analysis.intervals import (  # `x as x`: re-exported, analysis.tables.interval is public
    INTERVAL_LEVEL as INTERVAL_LEVEL,
)
from analysis.intervals import (
    STDERR_COLUMNS,
    half_b_stderr,
    measure_stderr,
)
from analysis.intervals import interval as interval
from analysis.intervals import point_stderr as point_stderr
from analysis.intervals import window_stderr as window_stderr
from analysis.intervals import with_window_stderr as with_window_stderr
from analysis.load import ACC_COLUMN, fill_config_defaults
from analysis.selection import ESTIMATE_ALL, ESTIMATE_HELDOUT, half_scores, rank_heldout

log = logging.getLogger(__name__)

TIE_TOL = 1e-12
CURVE_COLUMNS = [
    "model_family",
    "bits",
    "model",
    "key",
    "total_model_bits",
    *QUANT_CONFIG,
    *VARIANT_COLUMNS,
]
CURVE_GROUP = ["model_family", *VARIANT_COLUMNS, "bits"]  # one configuration is chosen per group
SELECTIONS = ("split", "fixed")


def _candidates(plain: pd.DataFrame) -> pd.DataFrame:
    """Per curve group, the configurations covering the most models (data-independent)."""
    score = plain.groupby([*CURVE_GROUP, "_cfg"], as_index=False, dropna=False).agg(
        n=("model", "nunique"), config=("config", "first")
    )
    most = score.groupby(CURVE_GROUP, dropna=False)["n"].transform("max")
    cand = score[score["n"] == most].copy()
    cand["n_candidates"] = cand.groupby(CURVE_GROUP, dropna=False)["_cfg"].transform("size")
    return cand


def _choose(
    plain: pd.DataFrame, cand: pd.DataFrame, scores: pd.DataFrame | None, selection: str
) -> pd.DataFrame:
    """One configuration per curve group, with the rule it was chosen by (``_split``)."""
    cand = cand.assign(_score=np.nan)
    if selection == "split" and scores is not None and not scores.empty:
        a = plain[["_cfg", *CURVE_GROUP, "key"]].join(scores["acc_a"], on="key")
        # A configuration missing half A on any of its cells gets no score (NaN): mean with
        # skipna=False, so it never wins on a partial average.
        grouped = a.assign(_missing=a["acc_a"].isna()).groupby([*CURVE_GROUP, "_cfg"], dropna=False)
        by_cfg = grouped["acc_a"].mean().where(~grouped["_missing"].any())
        cand = cand.drop(columns="_score").join(by_cfg.rename("_score"), on=[*CURVE_GROUP, "_cfg"])
    scored = cand["_score"].notna()
    group_scored = scored.groupby([cand[c] for c in CURVE_GROUP], dropna=False).transform("any")
    unscored = (cand["n_candidates"] > 1) & ~group_scored
    if selection == "split" and unscored.any():
        log.warning(
            "main curves: %d (family, k) group(s) without per-example results for every "
            "candidate configuration: chosen by label (no accuracy used), e.g. %s",
            cand.loc[unscored, CURVE_GROUP].drop_duplicates().shape[0],
            cand.loc[unscored, "config"].iloc[0],
        )
    cand = cand.sort_values(
        [*CURVE_GROUP, "_score", "config"],
        ascending=[True] * len(CURVE_GROUP) + [False, True],
        na_position="last",
    ).drop_duplicates(CURVE_GROUP)
    return cand.assign(_split=cand["_score"].notna() & (cand["n_candidates"] > 1))


def main_curves(
    cells: pd.DataFrame,
    y: str = ACC_COLUMN,
    per_sample: pd.DataFrame | None = None,
    selection: str = "split",
    method: str = "blockwise",
) -> pd.DataFrame:
    """One curve per (family, numerics, data, k): the points the paper's scaling figure draws.

    ``method``: the curves of this method (default the paper's round-to-nearest ``blockwise``;
    e.g. ``gptq`` for its own bit-optimal table), with the 16-bit baselines.

    A grid usually holds several configurations per k (data types, block sizes, proxy,
    centering); those have their own figures. For the main figure each group keeps one plain
    block-wise configuration (method blockwise, or none for the 16-bit baseline): first
    those that cover the most models (no accuracy used), then, among those,

    * ``selection="split"`` (default): the highest mean zero-shot accuracy on *half A* of the
      examples (``per_sample``: rows of :func:`analysis.load.read_per_sample`), and the
      accuracy reported is that configuration's accuracy on the held-out *half B*. Choosing
      and reporting on the same examples would report a maximum of noisy numbers: biased up,
      most where the grid holds the most candidates (analysis/selection.py). Groups with one
      candidate report all examples (nothing was selected); groups whose candidates lack
      per-example results fall back to the fixed rule, with a warning.
    * ``selection="fixed"``: the first label (alphabetical): no accuracy used, all examples
      reported; unbiased but arbitrary.

    The choice is made on accuracy whatever ``y`` is, so the accuracy and perplexity figures
    show the same configurations; only an accuracy ``y`` is replaced by its held-out value.
    Returns one row per (group, model) with ``y``, the ``config`` and ``variant`` labels,
    ``n_candidates`` and ``estimate`` (what ``y`` rests on).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} is unknown; allowed: {list(SELECTIONS)}")
    columns = [*CURVE_COLUMNS, y, "config", "variant", "n_candidates", "estimate",
               *STDERR_COLUMNS]  # fmt: skip
    need = {"model_family", "bits", "total_model_bits", y}
    if cells.empty or not need <= set(cells.columns):
        return pd.DataFrame(columns=columns)
    plain = cells[cells["method"].isin([method, "none"]) & cells[y].notna()]
    if plain.empty:
        return pd.DataFrame(columns=columns)
    plain = fill_config_defaults(plain)
    plain = plain.assign(
        config=config_labels(plain), variant=variant_labels(plain), _cfg=config_keys(plain)
    )
    scores = half_scores(per_sample) if per_sample is not None else None
    pick = _choose(plain, _candidates(plain), scores, selection)
    chosen = plain.merge(
        pick[[*CURVE_GROUP, "_cfg", "n_candidates", "_split"]], on=[*CURVE_GROUP, "_cfg"]
    )
    chosen = chosen.sort_values([*CURVE_GROUP, "total_model_bits"], ignore_index=True)
    chosen = chosen.drop_duplicates([*CURVE_GROUP, "model"], ignore_index=True)
    heldout = chosen["_split"].astype(bool) & (y == ACC_COLUMN)
    if heldout.any():
        acc_b = chosen["key"].map(scores["acc_b"])
        chosen[y] = chosen[y].where(~heldout, acc_b)
    chosen["estimate"] = np.where(heldout, ESTIMATE_HELDOUT, ESTIMATE_ALL)
    se, df = measure_stderr(chosen, y, per_sample)
    chosen["se"], chosen["se_df"] = se, df
    heldout_se = half_b_stderr(per_sample) if per_sample is not None and y == ACC_COLUMN else None
    chosen["se_heldout"] = (
        np.nan if heldout_se is None else chosen["key"].map(heldout_se).astype(float)
    )
    return chosen[columns]


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


def _curve_groups(curves: pd.DataFrame) -> list[str]:
    """Columns that split curves into independent sets: family, and variant when present."""
    return ["model_family", "variant"] if "variant" in curves.columns else ["model_family"]


def bit_optimal_table(
    curves: pd.DataFrame,
    budgets: Sequence[float] | None = None,
    y: str = ACC_COLUMN,
    higher_is_better: bool = True,
) -> pd.DataFrame:
    """The bit-optimal k per family (and variant) and budget, with every k's interpolated value.

    Columns: model_family, [variant,] budget_bits, log2_budget, best_k, best_value, and
    ``k=<k>`` per bit width (NaN where the budget is outside that k's measured range).
    ``best_k`` is <NA> when no curve covers the budget. ``variant`` (numerics / data, see
    :func:`variant_labels`) is a column only when the curves hold more than one: curves
    measured on different devices, dtypes or data never compete in one row.
    """
    budgets = default_budgets(curves) if budgets is None else np.asarray(budgets, dtype=float)
    groups = _curve_groups(curves)
    rows = []
    for ident, group_curves in curves.groupby(groups, sort=True):
        ident = dict(zip(groups, ident if isinstance(ident, tuple) else (ident,), strict=True))
        ks = sorted(int(k) for k in group_curves["bits"].unique())
        interp = {
            k: interpolate_log2(c["total_model_bits"], c[y], budgets)
            for k, c in group_curves.groupby("bits")
        }
        for i, budget in enumerate(budgets):
            row = {**ident, "budget_bits": budget, "log2_budget": np.log2(budget)}
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
    if "variant" in table.columns and (table["variant"] == "").all():
        table = table.drop(columns="variant")
    ident_cols = [c for c in ("model_family", "variant") if c in table.columns]
    front = [*ident_cols, "budget_bits", "log2_budget", "best_k", "best_value"]
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
    cells: pd.DataFrame,
    budgets: Sequence[float],
    y: str = ACC_COLUMN,
    per_sample: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The best measured cell (any model, k, data type, block size, method) per budget.

    With ``per_sample`` (and an accuracy ``y``) the best of the N fitting cells is chosen on
    half A of the examples and ``value`` is its held-out half-B accuracy (``value_all``: all
    examples, selection-biased). Without, ``value`` is the recorded value and ``estimate``
    says it is the maximum of N (biased up).
    """
    scores = half_scores(per_sample) if per_sample is not None and y == ACC_COLUMN else None
    rows = []
    for budget in budgets:
        ranked = rank_under_budget(cells, budget, y)
        row: dict = {"budget_bits": budget, "budget_GiB": budget / 8 / 2**30}
        if not ranked.empty:
            order, rule = rank_heldout(ranked, scores) if scores is not None else (ranked, "")
            best = order.iloc[0]
            value = best["acc_b"] if rule == "split" else best[y]
            estimate = {"split": ESTIMATE_HELDOUT, "none": ESTIMATE_ALL}.get(
                rule, f"{ESTIMATE_ALL}, best of {len(ranked)} (biased up)"
            )
            row.update(
                model=best["model"],
                model_family=best["model_family"],
                bits=int(best["bits"]),
                config=config_label(best, cells),
                total_model_bits=best["total_model_bits"],
                value=value,
                value_all=best[y],
                estimate=estimate if len(ranked) > 1 else ESTIMATE_ALL,
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
    "dtype_overrides",
    "bits",
    "block_size",
    "scale_format",
    "centering",
    "outlier_fraction",
    "total_model_bits",
    "bits_per_param",
    "device_class",
    "compute_dtype",
    "data_digest",
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
