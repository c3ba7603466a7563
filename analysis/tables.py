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

import json
import logging
import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import pandas as pd

from analysis.load import ACC_COLUMN, fill_config_defaults
from analysis.selection import ESTIMATE_ALL, ESTIMATE_HELDOUT, half_scores, rank_heldout
from harness.records import MEAN_ZEROSHOT_TASK

log = logging.getLogger(__name__)

TIE_TOL = 1e-12
# A cell's quantization configuration, apart from k: cells that share it form one curve.
QUANT_CONFIG = [
    "method",
    "dtype",
    "dtype_overrides",
    "block_size",
    "scale_format",
    "centering",
    "outlier_fraction",
    "method_settings",
]
# How and on what a cell was evaluated. Cells that differ here are different measurements:
# a curve never crosses them, and labels name them whenever the cells shown hold two values.
VARIANT_COLUMNS = ["device_class", "compute_dtype", "data_digest"]
NUMERICS_COLUMNS = ["device_class", "compute_dtype"]
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
_DIGEST_MIN = 4  # characters of a data digest shown in labels (more where needed to differ)
INTERVAL_LEVEL = 0.95
# Interval inputs main_curves carries per point: the standard error of ``y`` on all examples
# (``se``, with ``se_df`` degrees of freedom, NaN = normal) and on held-out half B
# (``se_heldout``); :func:`point_stderr` picks the one that matches the point's ``estimate``.
STDERR_COLUMNS = ["se", "se_df", "se_heldout"]


def overrides_text(overrides: object) -> str:
    """``{"exponent_bits": 3}`` -> ``{exponent_bits=3}``; ``""`` for no overrides."""
    if overrides is None or (isinstance(overrides, float) and np.isnan(overrides)):
        return ""
    parsed = json.loads(overrides) if isinstance(overrides, str) and overrides else {}
    if not parsed:
        return ""
    items = (f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(parsed.items()))
    return "{" + ",".join(items) + "}"


def _varies(context: pd.DataFrame, columns: Sequence[str]) -> bool:
    """Whether ``context`` holds more than one combination of ``columns``."""
    present = [c for c in columns if c in context.columns]
    return bool(present) and len(context[present].drop_duplicates()) > 1


def _digest_width(digests: pd.Series) -> int:
    """The shortest prefix (>= 4 characters) that keeps the distinct digests distinct."""
    uniq = sorted({str(d) for d in digests})
    width = _DIGEST_MIN
    while len({u[:width] for u in uniq}) < len(uniq):
        width += 1
    return width


def variant_labels(cells: pd.DataFrame, context: pd.DataFrame | None = None) -> pd.Series:
    """``cuda/bfloat16 data=ab12`` parts, each only when ``context`` holds two or more values.

    Why conditional: in a store measured on one device with one data set the parts say
    nothing and would only lengthen every legend; once two values are present they are what
    tells two otherwise identical lines apart.
    """
    ctx = fill_config_defaults(cells if context is None else context)
    cells = fill_config_defaults(cells)
    label = pd.Series("", index=cells.index, dtype=object)
    if _varies(ctx, NUMERICS_COLUMNS):
        dev = cells["device_class"].astype(str).replace("", "?")
        cdt = cells["compute_dtype"].astype(str).replace("", "?")
        label = label + dev + "/" + cdt
    if _varies(ctx, ["data_digest"]):
        width = _digest_width(ctx["data_digest"])
        digest = cells["data_digest"].astype(str).replace("", "?").str[:width]
        label = label.where(label == "", label + " ") + "data=" + digest
    return label


def _base_labels(cells: pd.DataFrame) -> pd.Series:
    """Data type (with its overrides), block size, scale format, centering, proxy."""
    bs = cells["block_size"].map(lambda b: "tensor" if pd.isna(b) else str(int(b)))
    over = cells["dtype_overrides"].map(overrides_text)
    label = (
        cells["dtype"].astype(str) + over + " bs=" + bs + " " + cells["scale_format"].astype(str)
    )
    label = label.where(~cells["centering"].astype(bool), label + " centered")
    outl = cells["outlier_fraction"].map("{:g}".format)
    label = label.where(cells["method"] != "proxy", label + " proxy(" + outl + ")")
    other = ~cells["method"].isin(["blockwise", "proxy", "none"])
    settings = cells["method"].astype(str) + cells["method_settings"].map(overrides_text)
    label = label.where(~other, label + " " + settings)
    return label.where(cells["method"] != "none", "16-bit baseline").astype(object)


def config_labels(cells: pd.DataFrame, context: pd.DataFrame | None = None) -> pd.Series:
    """A short human label per cell for its configuration (k excluded).

    Data-type overrides are always part of it (``float{exponent_bits=3} bs=64 fp16``);
    numerics and data digest only when ``context`` (default: ``cells``) holds two or more
    values of them (see :func:`variant_labels`). Vectorized: a row-wise ``apply`` over a
    1,000-cell frame cost a noticeable share of the plotting time.
    """
    if cells.empty:
        return pd.Series([], dtype=object, index=cells.index)
    cells = fill_config_defaults(cells)
    variant = variant_labels(cells, context)
    base = _base_labels(cells)
    return base.where(variant == "", base + " " + variant).astype(object)


def config_label(row: pd.Series, context: pd.DataFrame | None = None) -> str:
    """The label of one cell; ``context``: the cells shown with it (see :func:`config_labels`)."""
    frame = row.to_frame().T
    return str(config_labels(frame, frame if context is None else context).iloc[0])


def config_keys(cells: pd.DataFrame) -> pd.Series:
    """One string per distinct configuration + variant: what curves are grouped by.

    Built from the raw columns, not the label, so two configurations can never share a
    group even if their labels looked alike.
    """
    cells = fill_config_defaults(cells)
    # map(str), not astype(str): pandas 3 keeps a missing value missing under astype(str),
    # and one missing part (a per-tensor block size) would blank the whole key
    parts = [cells[c].map(str) for c in [*QUANT_CONFIG, *VARIANT_COLUMNS]]
    key = parts[0]
    for part in parts[1:]:
        key = key + "\x1f" + part
    return key


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
