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

Entry point for ``kbit-plot``: :func:`heldout_figures` (writes nothing and returns ``[]`` when
no cell has per-window losses, e.g. a store written before they were recorded).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from analysis.figures import (
    BASELINE_COLOR,
    FORMATS,
    Pow2Locator,
    line_style,
    pow2_label,
    save_figure,
)
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


# --- figure --------------------------------------------------------------------------------


def _k_styles(ks: list[int]) -> dict[int, dict]:
    """The same colour and marker for a k in every panel; the baseline black."""
    styles = {k: line_style(i) for i, k in enumerate(k for k in ks if k != BASELINE_BITS)}
    styles[BASELINE_BITS] = {"color": BASELINE_COLOR, "marker": "*", "ls": "--"}
    return styles


def _k_label(k: int) -> str:
    return "16-bit baseline" if k == BASELINE_BITS else f"{k}-bit"


def _bars(ax, x, y, low, high, style: dict, label: str | None, ms: float = 4) -> None:
    yerr = np.vstack([np.asarray(y) - np.asarray(low), np.asarray(high) - np.asarray(y)])
    ax.errorbar(x, y, yerr=yerr, label=label, lw=1.3, ms=ms, capsize=2, elinewidth=1,
                **style)  # fmt: skip


def _log2_x(ax, xlabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(Pow2Locator())  # >= 3 labelled ticks on a narrow span
    ax.xaxis.set_major_formatter(FuncFormatter(pow2_label))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(labelsize=8)
    ax.set_xlabel(xlabel)
    ax.grid(True, which="major", alpha=0.3)


def _signed_log_y(ax, values: np.ndarray) -> None:
    """Symmetric log y when the differences span more than two decades, else linear."""
    v = np.abs(values[np.isfinite(values)])
    v = v[v > 0]
    if v.size and v.max() / v.min() > 100:
        thresh = 10 ** np.floor(np.log10(np.quantile(v, 0.1)))
        ax.set_yscale("symlog", linthresh=thresh, linscale=0.5)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _p: f"{y:g}"))
    ax.axhline(0.0, color="0.4", lw=0.8, zorder=0)


def _own_interval(ax, points: pd.DataFrame) -> None:
    """One bar for the median half-width of a single loss's own interval, at the left edge.

    Each loss on its own is uncertain mostly because of which text was sampled, and every
    cell saw the same text: bars on every point would hide differences that the paired
    intervals of the other panels resolve. The bar says how large that shared part is.
    """
    half = float(np.median((points["nll_high"] - points["nll_low"]) / 2))
    mid = float(np.median(points["nll"]))
    ax.annotate("", xy=(0.04, mid - half), xytext=(0.04, mid + half),
                xycoords=("axes fraction", "data"), textcoords=("axes fraction", "data"),
                arrowprops=dict(arrowstyle="|-|", color="0.35", lw=1, shrinkA=0, shrinkB=0,
                                mutation_scale=3))  # fmt: skip
    ax.annotate(f"one loss's own\n95% interval\n(+-{half:.3f}, the\nsame text for all)",
                xy=(0.06, mid), xycoords=("axes fraction", "data"), ha="left", va="center",
                fontsize=6.5, color="0.35")  # fmt: skip


def heldout_figure(loss: HeldoutLoss) -> Figure | None:
    """Three panels per family: loss vs total bits; increase over 16-bit; gap to the best k.

    (a) held-out loss of each k's chosen configuration against total model bits, with one bar
    for the median own interval of a loss (the text sample's uncertainty, shared by every
    point, so it overstates the uncertainty of a difference; see :func:`_own_interval`); (b) each model's loss increase over its
    16-bit baseline against its parameters, paired intervals; (c) at each total-bit budget,
    each k's interpolated loss minus the loss of the k ranked best on half A, paired intervals.
    """
    pts = loss.points
    if pts.empty:
        return None
    groups = list(pts.groupby(IDENT, sort=True))
    ks = sorted(int(k) for k in pts["bits"].unique())
    styles = _k_styles(ks)
    nrows = len(groups)
    width, height = 14.0, 3.9 * nrows + 0.6
    fig = Figure(figsize=(width, height))
    grid = dict(left=0.7 / width, right=1 - 0.2 / width, bottom=0.65 / height,
                top=1 - 0.95 / height, wspace=0.3, hspace=0.55)  # fmt: skip
    axes = fig.subplots(nrows, 3, squeeze=False, gridspec_kw=grid)
    fig.suptitle(
        f"Held-out loss ({loss.task} NLL, nats/token) against model bits; "
        f"numbers on {loss.estimate}, {round(100 * loss.level)}% bootstrap intervals",
        y=1 - 0.12 / height, va="top", fontsize=11,
    )  # fmt: skip
    for (ident, fp), (ax_a, ax_b, ax_c) in zip(groups, axes, strict=True):
        fam = " ".join(str(i) for i in ident if i)
        for k in ks:
            line = fp[fp["bits"] == k].sort_values("total_model_bits")
            if line.empty:
                continue
            dtype = "" if k == BASELINE_BITS else f" ({line['config'].iloc[0].split(' ')[0]})"
            ax_a.plot(line["total_model_bits"], line["nll"], label=_k_label(k) + dtype,
                      lw=1.3, ms=4, **styles[k])  # fmt: skip
        _own_interval(ax_a, fp)
        _log2_x(ax_a, "total model bits (log2)")
        ax_a.set_ylabel("held-out loss (nats/token)")
        ax_a.set_title(f"{fam}: held-out loss", fontsize=10)
        ax_a.legend(fontsize=7, frameon=False)

        q = fp[fp["bits"] != BASELINE_BITS].dropna(subset=["d16"])
        for i, k in enumerate(k for k in ks if k != BASELINE_BITS):
            line = q[q["bits"] == k].sort_values("n_params")
            if line.empty:
                continue
            x = line["n_params"].to_numpy(dtype=float) * 2 ** (0.06 * (i - (len(ks) - 2) / 2))
            _bars(ax_b, x, line["d16"], line["d16_low"], line["d16_high"], styles[k], None)
        _signed_log_y(ax_b, q[["d16", "d16_low", "d16_high"]].to_numpy(dtype=float).ravel())
        _log2_x(ax_b, "parameters (log2; points of one model spread apart)")
        ax_b.set_ylabel("loss minus the model's 16-bit loss")
        ax_b.set_title("increase over 16-bit (paired intervals)", fontsize=10)

        bud = loss.budgets
        bud = bud[(bud["model_family"] == ident[0]) & (bud["variant"] == ident[1])]
        for i, k in enumerate(ks):
            line = bud[bud["bits"] == k].sort_values("budget_bits")
            if line.empty:
                continue
            x = line["budget_bits"].to_numpy(dtype=float) * 2 ** (0.03 * (i - len(ks) / 2))
            _bars(ax_c, x, line["d_best"], line["d_best_low"], line["d_best_high"],
                  styles[k], None)  # fmt: skip
        if not bud.empty:
            _signed_log_y(
                ax_c, bud[["d_best", "d_best_low", "d_best_high"]].to_numpy(float).ravel()
            )
        _log2_x(ax_c, "total-bit budget (log2)")
        ax_c.set_ylabel("loss minus the best k's at that budget")
        ax_c.set_title("equal total bits: gap to the best k (paired)", fontsize=10)
    return fig


# --- findings ------------------------------------------------------------------------------


def format_interval(est: float, low: float, high: float, signed: bool = False) -> str:
    """``+0.012 [0.009, 0.015]``: enough decimals to show the interval's width (3 to 6)."""
    width = abs(high - low)
    decimals = 3 if not width > 0 else int(min(6, max(3, 1 - np.floor(np.log10(width)))))
    sign = "+" if signed else ""
    return f"{est:{sign}.{decimals}f} [{low:.{decimals}f}, {high:.{decimals}f}]"


_ci = format_interval


def _bits_text(bits: float) -> str:
    e = np.log2(bits)
    return f"2^{e:.1f}".replace(".0", "") + f" ({bits / 8 / 1024:.0f} KiB)"


def findings_summary(loss: HeldoutLoss) -> list[str]:
    """The headline sentences (what the README caption quotes), computed from the data."""
    pct = round(100 * loss.level)
    lines = []
    for (fam, var), fp in loss.points.groupby(IDENT, sort=True):
        name = " ".join(str(i) for i in (fam, var) if i)
        q = fp.dropna(subset=["d16"])
        if not q.empty:  # the largest model with a 16-bit baseline
            largest = q.loc[q["n_params"].idxmax(), "model"]
            big = fp[fp["model"] == largest].sort_values("bits")
            base = big[big["bits"] == BASELINE_BITS].iloc[0]
            parts = [
                f"{int(r.bits)}-bit {_ci(r.d16, r.d16_low, r.d16_high, signed=True)}"
                for r in big.dropna(subset=["d16"]).itertuples()
            ]
            lines.append(
                f"{name}, largest model ({largest}, 16-bit loss "
                f"{_ci(base.nll, base.nll_low, base.nll_high)}): k-bit quantization changes its "
                f"held-out loss by {'; '.join(parts)} nats/token ({pct}% paired intervals)."
            )
            above = [
                f"{k}-bit at {int((g['d16_low'] > 0).sum())} of {len(g)}"
                for k, g in q.groupby("bits")
            ]
            below = int((q["d16_high"] < 0).sum())
            lines.append(
                f"{name}: models whose loss increase over 16-bit is above 0 beyond its interval: "
                f"{', '.join(above)} (below 0: {below} of {len(q)} model-k pairs)."
            )
        bud = loss.budgets[(loss.budgets["model_family"] == fam) & (loss.budgets["variant"] == var)]
        if bud.empty:
            continue
        wins = bud[bud["rank_a"] == 1]
        runner = bud[bud["rank_a"] == 2].set_index("budget_bits")
        counts = wins["bits"].value_counts().sort_index()
        sep_n = sum(bool(runner.loc[b, "d_best_low"] > 0) for b in wins["budget_bits"])
        lines.append(
            f"{name}: at {len(wins)} total-bit budgets covered by two or more k curves, the "
            f"lowest loss (ranked on half A) is at "
            + ", ".join(f"k={k} ({n})" for k, n in counts.items())
            + f"; its lead over the runner-up (half B) is above 0 beyond its interval at {sep_n} "
            f"of {len(wins)}."
        )
        # The budget the most curves cover (the largest such): the widest comparison.
        n_at = bud.groupby("budget_bits")["bits"].count()
        widest = float(n_at[n_at == n_at.max()].index.max())
        at = bud[bud["budget_bits"] == widest].sort_values("rank_a")
        best = int(at["bits"].iloc[0])
        gaps = "; ".join(
            f"{int(r.bits)}-bit {_ci(r.d_best, r.d_best_low, r.d_best_high, signed=True)}"
            for r in at.iloc[1:].sort_values("bits").itertuples()
        )
        lines.append(
            f"{name}: at {_bits_text(widest)}, the budget the most k curves cover "
            f"({len(at)}), the best k (ranked on half A) is {best} (loss "
            f"{at['nll'].iloc[0]:.3f}); each other k's loss minus it: {gaps} nats/token."
        )
    return lines


def _md_table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def findings_markdown(loss: HeldoutLoss) -> str:
    """The findings file: how the numbers were made, the headline sentences, the tables."""
    tokens = f" of {loss.window_tokens} predicted tokens" if loss.window_tokens else ""
    out = [
        "# Held-out loss against total model bits",
        "",
        f"Task `{loss.task}`: mean NLL (nats/token) of {loss.n_windows} windows{tokens} per "
        f"cell, the same windows in every cell. Numbers on {loss.estimate}; "
        + METHOD_TEXT.format(pct=round(100 * loss.level), n_boot=loss.n_boot, seed=loss.seed)
        + ".",
        "",
        "## Findings",
        "",
        *(f"- {line}" for line in findings_summary(loss)),
        "",
        "## Loss increase over the same model's 16-bit baseline",
        "",
    ]
    for (fam, var), fp in loss.points.groupby(IDENT, sort=True):
        ks = sorted(int(k) for k in fp["bits"].unique() if k != BASELINE_BITS)
        rows = []
        for model, g in fp.sort_values("n_params").groupby("model", sort=False):
            g = g.set_index("bits")
            row = {"model": model, "parameters": int(g["n_params"].iloc[0])}
            if BASELINE_BITS in g.index:
                r = g.loc[BASELINE_BITS]
                row["16-bit loss"] = _ci(r.nll, r.nll_low, r.nll_high)
            for k in ks:
                r = g.loc[k] if k in g.index else None
                ok = r is not None and np.isfinite(r.d16)
                row[f"{k}-bit"] = _ci(r.d16, r.d16_low, r.d16_high, signed=True) if ok else ""
            rows.append(row)
        configs = fp[fp["bits"] != BASELINE_BITS].drop_duplicates("bits").sort_values("bits")
        chosen = ", ".join(f"{int(r.bits)}-bit {r.config} (of {r.n_candidates})"
                           for r in configs.itertuples())  # fmt: skip
        out += [f"### {' '.join(str(i) for i in (fam, var) if i)}", "",
                f"Configuration per k (chosen on half A): {chosen}.", "",
                _md_table(pd.DataFrame(rows).fillna("")), ""]  # fmt: skip
    out += ["## Equal total bits: each k's loss minus the best k's (paired)", ""]
    for (fam, var), bud in loss.budgets.groupby(IDENT, sort=True):
        rows = []
        for budget, g in bud.groupby("budget_bits"):
            g = g.sort_values("rank_a")
            row = {"budget": _bits_text(budget), "best k (half A)": int(g["bits"].iloc[0]),
                   "its loss": f"{g['nll'].iloc[0]:.3f}"}  # fmt: skip
            for r in g.iloc[1:].itertuples():
                row[f"rank {r.rank_a}"] = (
                    f"k={r.bits}: {_ci(r.d_best, r.d_best_low, r.d_best_high, signed=True)}"
                )
            rows.append(row)
        table = pd.DataFrame(rows).fillna("")
        out += [f"### {' '.join(str(i) for i in (fam, var) if i)}", "", _md_table(table), ""]
    return "\n".join(out)


def heldout_figures(
    results: Results,
    out: str | Path,
    task: str | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> list[Path]:
    """``heldout_bits.{png,pdf}``, ``heldout_findings.md``, ``heldout_points.csv`` and
    ``heldout_budgets.csv`` into ``out``; returns the paths written ([] and nothing written
    when no cell has per-window held-out losses)."""
    loss = heldout_loss(results, task, n_boot=n_boot, level=level, seed=seed)
    if loss is None:
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig = heldout_figure(loss)
    if fig is not None:
        paths += save_figure(fig, out, FIGURE_NAME, formats=FORMATS)
    findings = out / f"{FINDINGS_NAME}.md"
    findings.write_text(findings_markdown(loss) + "\n")
    loss.points.to_csv(out / "heldout_points.csv", index=False)
    loss.budgets.to_csv(out / "heldout_budgets.csv", index=False)
    return [*paths, findings, out / "heldout_points.csv", out / "heldout_budgets.csv"]
