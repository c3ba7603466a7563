"""The look shared by every figure: palette, markers, panels, log2 bit axes, saving.

Why a module of its own: the paper's figures (:mod:`analysis.figures`), the held-out figure
(:mod:`analysis.heldout_plot`), the fit's figure (:mod:`analysis.fit`) and a plugin's figure
(:mod:`analysis.figure_registry`) share one palette and one axis style; keeping them apart
from what each figure compares lets a new figure import the style without the others.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, Locator, LogLocator, NullFormatter

from analysis.load import ACC_COLUMN
from analysis.tables import INTERVAL_LEVEL

# Okabe & Ito (2008), colour-blind safe; black is kept for the 16-bit baseline.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">"]
BASELINE_COLOR = "#000000"
DEFAULT_PPL_CAP = 100.0
FORMATS = ("png", "pdf")


LINESTYLES = ["-", "-.", ":"]


def line_style(i: int) -> dict:
    """Colour, marker and (past the palette's length) line style: distinct without colour."""
    n = len(OKABE_ITO)
    return {
        "color": OKABE_ITO[i % n],
        "marker": MARKERS[i % len(MARKERS)],
        "ls": LINESTYLES[(i // n) % len(LINESTYLES)],
    }


def ylabel_text(y: str) -> str:
    return "mean zero-shot accuracy" if y == ACC_COLUMN else y


def panels(families: Sequence[str], title: str, caption: str = "") -> tuple[Figure, list]:
    n = max(len(families), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    width, height = 4.4 * ncols, 3.5 * nrows + 0.75
    # Fixed margins in inches instead of a layout engine: constrained layout measured every
    # text twice per save and took ~40% of the plotting time; the panels here are uniform.
    fig = Figure(figsize=(width, height))
    grid = dict(left=0.75 / width, right=1 - 0.2 / width, bottom=0.6 / height,
                top=1 - 1.1 / height, wspace=0.35, hspace=0.5)  # fmt: skip
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=grid).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    # a long title on one narrow panel shrinks to fit (~11 characters an inch at 12 pt)
    size = min(12.0, max(8.0, 12.0 * 11 * width / max(len(title), 1)))
    fig.suptitle(title, y=1 - 0.1 / height, va="top", fontsize=size)
    if caption:  # what the bars are, wrapped to the figure's width (~15 characters an inch)
        text = "\n".join(textwrap.wrap(caption, width=int(15 * width)))
        fig.text(0.5, 1 - 0.4 / height, text, ha="center", va="top", fontsize=7.5,
                 color="0.25")  # fmt: skip
    return fig, axes[:n]


MIN_X_TICKS = 3
_POW2_STEPS = (16.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125)  # octaves between labelled ticks


class Pow2Locator(Locator):
    """Ticks at powers of two, ``2^(j * step)``: the widest step that puts at least
    :data:`MIN_X_TICKS` ticks in view (whole octaves where the data span them, then halves,
    quarters and eighths), so that a narrow span (a family of three small models) still reads.
    """

    def __call__(self) -> np.ndarray:
        lo, hi = self.axis.get_view_interval()
        return self.tick_values(lo, hi)

    def tick_values(self, vmin: float, vmax: float) -> np.ndarray:
        lo, hi = sorted((float(vmin), float(vmax)))
        if not (lo > 0 and np.isfinite(hi)):
            return np.array([])
        a, b = math.log2(lo), math.log2(hi)
        ticks = np.array([])
        for step in _POW2_STEPS:
            ticks = np.arange(math.ceil(a / step - 1e-9), math.floor(b / step + 1e-9) + 1) * step
            if ticks.size >= MIN_X_TICKS:
                break
        return 2.0**ticks


def pow2_label(x: float, _pos: int) -> str:
    """'2^30', '2^20.5', '2^20.25' as plain text (mathtext tick labels cost a third of the
    plotting time); '' for a value that is not a power of two on an eighth-octave grid."""
    e = math.log2(x) if x > 0 else float("nan")
    q = round(e * 8) / 8
    if not abs(e - q) < 1e-9:
        return ""
    return f"2^{round(q)}" if q == round(q) else f"2^{q:g}"


def log_y_axis(ax) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def finish_axis(ax, title: str, ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(Pow2Locator())
    ax.xaxis.set_major_formatter(FuncFormatter(pow2_label))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("total model bits (log2)")
    ax.set_ylabel(ylabel)
    ax.set_title(str(title), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False)


def interval_caption(y: str, estimate: str = "", drawn: bool = True) -> str:
    """What the bars are, in words (each figure states it under its title); ``drawn``
    False: no point had an interval, and the caption says why instead."""
    pct = round(100 * INTERVAL_LEVEL)
    if not drawn:
        what = ("no intervals: no per-window NLL given (analysis.tables.with_window_stderr)"
                if y.endswith(":ppl") else "no intervals: no stderr recorded")  # fmt: skip
    elif y.endswith(":ppl"):
        what = (f"bars: {pct}% CI of exp(mean NLL), t over batch means of contiguous text "
                "windows")  # fmt: skip
    else:
        what = f"bars: {pct}% CI, normal approx. from lm-eval's stderr"
    if estimate:
        what += f"; accuracy and its stderr (lm-eval's rule) on {estimate}"
    return what


def draw_points(ax, x, y, low, high, label: str, style: dict) -> None:
    """A line, and an error bar (no caps) on every point that has an interval (NaN: none).

    The bars are a separate ``errorbar(fmt="none")`` (an ErrorbarContainer holding only a
    LineCollection), so the axes' lines stay one per legend entry.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    style = {"lw": 1.4, "ms": 4, **style}
    ax.plot(x, y, label=label, **style)
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    if not (np.isfinite(low) & np.isfinite(high)).any():
        return
    yerr = np.vstack([np.clip(y - low, 0, None), np.clip(high - y, 0, None)])
    ax.errorbar(x, y, yerr=yerr, fmt="none", ecolor=style["color"], elinewidth=0.9,
                capsize=0, alpha=0.8)  # fmt: skip


def save_figure(
    fig: Figure,
    out_dir: str | Path,
    name: str,
    dpi: int = 150,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Write ``name.png`` and ``name.pdf`` (or the given ``formats``) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in formats:
        path = out / f"{name}.{ext}"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths
