"""Held-out loss against total model bits, with paired per-window intervals.

Why this view: on the small models of the demo, zero-shot accuracy differences between bit
widths (~0.01) are the size of their error bars. The held-out loss of every cell is measured on
the *same* text windows (``per_sample`` of the perplexity task's ``nll`` row: the mean NLL of
each window, nats/token), so the difference between any two cells can be bootstrapped *paired*
per window. That removes the window-to-window variation of the text, which all cells share and
which dominates the uncertainty of each loss on its own.

Rules (each stated in the findings file and in :data:`METHOD_TEXT`):

* Cells: plain block-wise cells and the 16-bit baselines (method ``none``), per model family
  and variant (numerics, data digest: :func:`analysis.tables.variant_labels`; never mixed).
* Choices on one half of the windows, numbers on the other: the data type per (family, k)
  is the one with the lowest mean loss over the models on *half A* (even windows), among the
  configurations that cover the most models; the best k at a budget is ranked on half A too.
  Every number shown or written is measured on *half B* (odd windows), baselines included, so
  all points rest on the same windows and no number is the minimum of noisy numbers.
* Intervals: 95% percentile bootstrap over windows, 10,000 replicates, seed 0. A point's
  own interval resamples that cell's windows; a difference (a cell minus its model's 16-bit
  baseline, or two k curves at the same budget) resamples the same windows on both sides.
* Budgets: each k's curve is interpolated per window, linearly in log2(total model bits),
  inside its measured range only (:func:`analysis.tables.interpolate_log2`), at the budgets of
  :func:`analysis.tables.default_budgets`.

Entry point for ``kbit-plot``: :func:`analysis.heldout.heldout_figures` (writes nothing and returns ``[]`` when
no cell has per-window losses, e.g. a store written before they were recorded).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.load import Results, fill_config_defaults, training_tokens
from analysis.stats import DEFAULT_LEVEL, DEFAULT_N_BOOT, bootstrap_mean_ci, paired_bootstrap_diff
from analysis.tables import (
    config_keys,
    config_labels,
    default_budgets,
    variant_labels,
)
from harness.records import BASELINE_BITS

log = logging.getLogger(__name__)

NLL_METRIC = "nll"
PREFERRED_TASKS = ("heldout", "wikitext2")  # the zoo's own held-out text, then the paper's
FIGURE_NAME = "heldout_bits"
FINDINGS_NAME = "heldout_findings"
MIN_WINDOWS_TO_SPLIT = 4  # fewer windows: no halves; fixed rule (label) and all windows
IDENT = ["model_family", "variant"]
METHOD_TEXT = (
    "choices (the data type per k, the best k per budget) are made on half A of the windows "
    "(even positions) and every number is measured on the other half B (odd positions); "
    "intervals are {pct}% percentile bootstrap over windows ({n_boot:,} replicates, seed {seed}), "
    "paired (the same windows on both sides) for every difference"
)


@dataclass
class HeldoutLoss:
    """Everything the figure and the findings show, computed once.

    ``points``: one row per (family, variant, k, model) of the chosen curves, with ``nll`` and
    its interval (``nll_low``/``nll_high``), ``d16`` = ``nll`` minus the same model's 16-bit loss with
    its paired interval (``d16_low``/``d16_high``; NaN for the baseline itself).
    ``budgets``: one row per (family, variant, budget, k covering it) with the interpolated
    loss, ``rank_a`` (rank on half A; 1 = the best k) and ``d_best`` = loss minus the loss of
    the best-on-half-A k at that budget, with its paired interval.
    """

    task: str
    points: pd.DataFrame
    budgets: pd.DataFrame
    window_tokens: int | None
    n_windows: int
    estimate: str  # which windows the numbers rest on
    n_boot: int
    level: float
    seed: int


def _pick_task(tasks: list[str], task: str | None) -> str | None:
    """``task`` if it has per-window losses; else the first of :data:`PREFERRED_TASKS` that
    has them, else the first alphabetically; None when there is none."""
    if task is not None:
        return task if task in tasks else None
    preferred = [t for t in PREFERRED_TASKS if t in tasks]
    return (preferred or sorted(tasks) or [None])[0]


def _d_label(tokens: float) -> str:
    """A panel label in millions of tokens: 501760 -> '0.5M', 8e6 -> '8M'."""
    return f"{tokens / 1e6:.2g}M"


def window_losses(results: Results, task: str | None = None) -> tuple[pd.DataFrame, str | None]:
    """(plain cells with a ``windows`` array of per-window NLL, the perplexity task used).

    ``task``: the perplexity task (default: ``heldout``, else ``wikitext2``, else the first
    with per-window losses). An empty frame and None when no cell has per-window losses.
    """
    cells = results.cells
    if cells.empty or "method" not in cells.columns:
        return cells.iloc[0:0], None
    plain = cells[cells["method"].isin(["blockwise", "none"])]
    if plain.empty:
        return plain, None
    per = results.per_sample(plain["key"].tolist())
    per = per[per["metric"] == NLL_METRIC]
    task = _pick_task(sorted(per["task"].unique()), task)
    if task is None:
        return plain.iloc[0:0], None
    per = per[per["task"] == task]
    windows = {
        k: np.asarray(v, dtype=float) for k, v in zip(per["key"], per["per_sample"], strict=True)
    }
    frame = fill_config_defaults(plain[plain["key"].isin(windows)])
    frame = frame.assign(
        windows=frame["key"].map(windows),
        n_windows=frame["key"].map(lambda k: windows[k].size),
        config=config_labels(frame),
        variant=variant_labels(frame),
        _cfg=config_keys(frame),
    )
    # Checkpoints of one family trained on different token counts are different curves (a
    # k-bit curve across sizes is drawn at one D): one row of panels per count.
    tokens = training_tokens(frame)
    several = tokens.groupby(frame["model_family"]).transform("nunique") > 1
    if several.any():
        frame.loc[several, "model_family"] = (
            frame.loc[several, "model_family"] + " @" + tokens[several].map(_d_label)
        )
    # Pairing needs the same windows: within a (family, variant) keep the common count.
    common = frame.groupby(IDENT)["n_windows"].transform(lambda n: n.mode().iloc[0])
    odd = frame["n_windows"] != common
    if odd.any():
        log.warning(
            "held-out loss: %d cell(s) with another number of windows than their family left "
            "out (they cannot be paired), e.g. %s",
            int(odd.sum()),
            frame.loc[odd, "key"].iloc[0],
        )
    frame = frame[~odd & (frame["n_windows"] > 0)]
    return frame.reset_index(drop=True), task


def _choose_curves(frame: pd.DataFrame, split: bool) -> pd.DataFrame:
    """One configuration per (family, variant, k), chosen on half A when there is a choice."""
    chosen = []
    for _, group in frame.groupby([*IDENT, "bits"], sort=True):
        cover = group.groupby("_cfg")["model"].nunique()
        cands = sorted(cover[cover == cover.max()].index, key=lambda c: group.loc[
            group["_cfg"] == c, "config"].iloc[0])  # fmt: skip
        best = cands[0]
        if split and len(cands) > 1:
            score = {
                c: float(
                    np.mean([w[0::2].mean() for w in group.loc[group["_cfg"] == c, "windows"]])
                )
                for c in cands
            }
            best = min(cands, key=lambda c: score[c])  # ties: the first label
        sub = group[group["_cfg"] == best].sort_values("total_model_bits")
        chosen.append(sub.drop_duplicates("model").assign(n_candidates=len(cands)))
    return pd.concat(chosen, ignore_index=True)


def _curve_windows(curve: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(distinct log2 total bits, windows per point): points at equal bits averaged."""
    x = np.log2(curve["total_model_bits"].to_numpy(dtype=float))
    ux, inverse = np.unique(x, return_inverse=True)
    rows = np.stack(curve[column].to_list())
    return ux, np.stack([rows[inverse == i].mean(axis=0) for i in range(len(ux))])


def _interp_weights(x: np.ndarray, b: float) -> np.ndarray | None:
    """Weights over a curve's points giving its linear interpolation at ``b`` (log2 bits);
    None outside the measured range (no extrapolation)."""
    if b < x.min() or b > x.max():
        return None
    return np.array([np.interp(b, x, col) for col in np.eye(len(x))])


def _tokens_per_window(results: Results, task: str, keys: set[str]) -> int | None:
    """Predicted tokens per window (``n_samples`` of the nll row / its number of windows)."""
    long = results.long
    rows = long[(long["task"] == task) & (long["metric"] == NLL_METRIC) & long["key"].isin(keys)]
    return None if rows.empty else int(rows["n_samples"].iloc[0])


def _points(curves: pd.DataFrame, n_boot: int, level: float, seed: int) -> pd.DataFrame:
    points = []
    for (fam, var), fc in curves.groupby(IDENT, sort=True):
        base = fc[fc["bits"] == BASELINE_BITS].set_index("model")["half_b"]
        for row in fc.itertuples():
            ci = bootstrap_mean_ci(row.half_b, n_boot, level, seed)
            rec = dict(model_family=fam, variant=var, bits=int(row.bits), model=row.model,
                       config=row.config, total_model_bits=float(row.total_model_bits),
                       n_params=int(row.n_params), n_candidates=int(row.n_candidates),
                       nll=ci.estimate, nll_low=ci.low, nll_high=ci.high,
                       d16=np.nan, d16_low=np.nan, d16_high=np.nan)  # fmt: skip
            if row.bits != BASELINE_BITS and row.model in base.index:
                d = paired_bootstrap_diff(row.half_b, base[row.model], n_boot, level, seed)
                rec.update(d16=d.estimate, d16_low=d.low, d16_high=d.high)
            points.append(rec)
    return pd.DataFrame(points)


BUDGET_COLUMNS = ["model_family", "variant", "budget_bits", "bits", "rank_a", "best_k", "nll",
                  "d_best", "d_best_low", "d_best_high"]  # fmt: skip


def _budgets(
    curves: pd.DataFrame, split: bool, n_boot: int, level: float, seed: int
) -> pd.DataFrame:
    """Every k covering each budget: its loss there and its loss minus the best k's (paired).

    The best k is ranked on half A (interpolated half-A losses); the numbers are half B.
    """
    rows = []
    for (fam, var), fc in curves.groupby(IDENT, sort=True):
        per_k = {}
        for k, c in fc.groupby("bits"):
            ux, full = _curve_windows(c, "windows")
            per_k[int(k)] = (ux, full, _curve_windows(c, "half_b")[1])
        for budget in default_budgets(fc):
            at = {}
            for k, (ux, full, half_b) in per_k.items():
                w = _interp_weights(ux, float(np.log2(budget)))
                if w is not None:
                    choose = (w @ full)[0::2] if split else w @ full
                    at[k] = (float(choose.mean()), w @ half_b)
            if len(at) < 2:
                continue
            ranked = sorted(at, key=lambda k: (at[k][0], k))  # ties: the smaller k
            best = ranked[0]
            for rank, k in enumerate(ranked, start=1):
                d = paired_bootstrap_diff(at[k][1], at[best][1], n_boot, level, seed)
                rows.append(dict(model_family=fam, variant=var, budget_bits=float(budget),
                                 bits=k, rank_a=rank, best_k=best, nll=float(at[k][1].mean()),
                                 d_best=d.estimate, d_best_low=d.low,
                                 d_best_high=d.high))  # fmt: skip
    return pd.DataFrame(rows, columns=BUDGET_COLUMNS)


def heldout_loss(
    results: Results,
    task: str | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> HeldoutLoss | None:
    """The curves, paired differences and budget comparisons; None without per-window data."""
    frame, task = window_losses(results, task)
    if frame.empty or task is None:
        log.info("held-out loss: no cell has per-window losses; skipped")
        return None
    n_windows = int(frame["n_windows"].min())
    split = n_windows >= MIN_WINDOWS_TO_SPLIT
    curves = _choose_curves(frame, split)
    curves["half_b"] = curves["windows"].map(lambda w: w[1::2] if split else w)
    tokens = _tokens_per_window(results, task, set(curves["key"]))
    estimate = (
        f"half B ({n_windows // 2} odd of {n_windows} windows)"
        if split
        else f"all {n_windows} windows (too few to split)"
    )
    return HeldoutLoss(
        task=task,
        points=_points(curves, n_boot, level, seed),
        budgets=_budgets(curves, split, n_boot, level, seed),
        window_tokens=None if tokens is None else tokens // max(n_windows, 1),
        n_windows=n_windows,
        estimate=estimate,
        n_boot=n_boot,
        level=level,
        seed=seed,
    )
