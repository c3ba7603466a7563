"""The held-out figure (``heldout_bits``): three panels per family, from a :class:`HeldoutLoss`.

Registered on the ``heldout`` path of :mod:`analysis.figure_registry` under
:data:`analysis.heldout_loss.FIGURE_NAME`; :func:`analysis.heldout.heldout_figures` draws every
figure of that path. The rules behind the numbers: :mod:`analysis.heldout_loss`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from analysis.figure_registry import register_figure
from analysis.figures import BASELINE_COLOR, Pow2Locator, line_style, pow2_label
from analysis.heldout_loss import FIGURE_NAME, IDENT, HeldoutLoss
from harness.records import BASELINE_BITS

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


@register_figure(
    FIGURE_NAME, path="heldout", description="held-out loss vs total model bits, paired intervals"
)
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
