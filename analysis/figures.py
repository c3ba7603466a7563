"""The paper's figures from a cell frame: PNG + PDF, Okabe-Ito colours, log2 x axis of bits.

Figures are built with the object-oriented :class:`matplotlib.figure.Figure` (Agg canvas), never
pyplot: no display, no global backend switch, nothing kept alive between calls.

1. ``scaling_acc``: mean zero-shot accuracy vs total model bits, a line per k, a panel per
   family, the 16-bit baseline in black (the paper's bit-level scaling figure).
2. ``scaling_ppl``: the same for perplexity, log y axis; cells above ``cap`` or non-finite are
   *unstable*: drawn at the cap with a cross and counted in the legend.
3. ``block_size``: block-size effect at fixed k. 4. ``dtype``: data types at fixed k.
5. ``proxy_centering``: block-wise vs proxy (outlier) quantization vs centering at fixed k.
6. ``method``: methods (blockwise, gptq, hqq, ...) at fixed k, accuracy and perplexity.
7. ``heldout_bits``: held-out loss vs total model bits with paired per-window intervals (the
   README's demo figure), in :mod:`analysis.heldout` with its findings and tables.

Cells that differ in any result-determining field never share a line: data-type overrides are
part of every data-type name (``float{exponent_bits=3}``), and numerics / data digest
(``cuda/bfloat16``, ``data=ab12``) are added to a line's label whenever the cells drawn hold
more than one value of them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from analysis.load import ACC_COLUMN, fill_config_defaults
from analysis.tables import main_curves, overrides_text, variant_labels
from harness.records import BASELINE_BITS

log = logging.getLogger(__name__)

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


def _ylabel(y: str) -> str:
    return "mean zero-shot accuracy" if y == ACC_COLUMN else y


def _panels(families: Sequence[str], title: str) -> tuple[Figure, list]:
    n = max(len(families), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    width, height = 4.4 * ncols, 3.5 * nrows + 0.4
    # Fixed margins in inches instead of a layout engine: constrained layout measured every
    # text twice per save and took ~40% of the plotting time; the panels here are uniform.
    fig = Figure(figsize=(width, height))
    grid = dict(left=0.75 / width, right=1 - 0.2 / width, bottom=0.6 / height,
                top=1 - 0.75 / height, wspace=0.35, hspace=0.5)  # fmt: skip
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=grid).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title, y=1 - 0.12 / height, va="top")
    return fig, axes[:n]


def pow2_label(x: float, _pos: int) -> str:
    """'2^30' as plain text: mathtext tick labels cost a third of the plotting time."""
    e = math.log2(x) if x > 0 else float("nan")
    return f"2^{round(e)}" if abs(e - round(e)) < 1e-9 else ""


def _log_y(ax) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _finish_axis(ax, family: str, ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(pow2_label))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("total model bits (log2)")
    ax.set_ylabel(ylabel)
    ax.set_title(str(family))
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False)


def _hue_lines(
    cells: pd.DataFrame,
    y: str,
    hue: str,
    title: str,
    ylabel: str,
    hue_fmt=str,
    log_y: bool = False,
) -> Figure | None:
    """One panel per family, one line per value of ``hue`` (points joined by total bits)."""
    cells = cells[cells[y].notna()] if y in cells.columns else cells.iloc[0:0]
    if cells.empty:
        return None
    families = sorted(cells["model_family"].unique())
    hues = sorted(cells[hue].dropna().unique(), key=lambda v: (isinstance(v, str), v))
    fig, axes = _panels(families, title)
    for ax, fam in zip(axes, families, strict=True):
        sub = cells[cells["model_family"] == fam]
        for i, h in enumerate(hues):
            line = sub[sub[hue] == h].sort_values("total_model_bits")
            if line.empty:
                continue
            ax.plot(
                line["total_model_bits"], line[y], label=hue_fmt(h), lw=1.4, ms=4, **line_style(i)
            )
        if log_y:
            _log_y(ax)
        _finish_axis(ax, fam, ylabel)
    return fig


def scaling_figure(
    cells: pd.DataFrame,
    y: str = ACC_COLUMN,
    ylabel: str | None = None,
    curves: pd.DataFrame | None = None,
) -> Figure | None:
    """The bit-level scaling figure: a line per k, a panel per family, baseline in black.

    ``curves``: from :func:`analysis.tables.main_curves` (with per-example results for the
    selection-corrected accuracies); computed from ``cells`` without them if not given.
    """
    curves = main_curves(cells, y) if curves is None else curves
    if curves.empty:
        log.info("scaling figure: no cell has %s; skipped", y)
        return None
    return _draw_scaling(curves, y, ylabel or _ylabel(y))


def _line_label(name: str, variant: str) -> str:
    return f"{name} {variant}" if variant else name


def _draw_scaling(curves: pd.DataFrame, y: str, ylabel: str) -> Figure:
    families = sorted(curves["model_family"].unique())
    if "variant" not in curves.columns:
        curves = curves.assign(variant="")
    variants = sorted(curves["variant"].unique())
    ks = sorted(int(k) for k in curves["bits"].unique() if k != BASELINE_BITS)
    fig, axes = _panels(families, f"Bit-level scaling: {ylabel}")
    for ax, fam in zip(axes, families, strict=True):
        for vi, variant in enumerate(variants):
            sub = curves[(curves["model_family"] == fam) & (curves["variant"] == variant)]
            for i, k in enumerate(ks):
                line = sub[sub["bits"] == k].sort_values("total_model_bits")
                if not line.empty:
                    label = _line_label(f"{k}-bit", variant)
                    style = line_style(i + vi * len(ks))
                    ax.plot(line["total_model_bits"], line[y], label=label, lw=1.4, ms=4, **style)
            base = sub[sub["bits"] == BASELINE_BITS].sort_values("total_model_bits")
            if not base.empty:
                ax.plot(
                    base["total_model_bits"],
                    base[y],
                    color=BASELINE_COLOR,
                    ls=["--", ":", "-."][vi % 3],
                    marker=["*", "p", "h"][vi % 3],
                    lw=1.4,
                    ms=6,
                    label=_line_label("16-bit baseline", variant),
                )
        _finish_axis(ax, fam, ylabel)
    return fig


def perplexity_figure(
    cells: pd.DataFrame,
    ppl_column: str,
    cap: float = DEFAULT_PPL_CAP,
    curves: pd.DataFrame | None = None,
) -> Figure | None:
    """Scaling figure for perplexity; unstable cells (> cap or non-finite) marked at the cap.

    ``curves``: :func:`analysis.tables.main_curves` of ``ppl_column`` (NaN filled with inf so
    a diverged cell stays on its curve, marked); computed from ``cells`` if not given.
    """
    if ppl_column not in cells.columns:
        log.info("perplexity figure: no %s column; skipped", ppl_column)
        return None
    if curves is None:
        filled = cells.assign(**{ppl_column: cells[ppl_column].fillna(np.inf)})
        curves = main_curves(filled, ppl_column)
    if curves.empty:
        return None
    raw = curves[ppl_column].to_numpy(dtype=float)
    unstable = ~np.isfinite(raw) | (raw > cap)
    curves = curves.assign(**{ppl_column: np.where(unstable, cap, raw)})
    fig = _draw_scaling(curves, ppl_column, f"{ppl_column} (capped at {cap:g})")
    for ax, fam in zip(fig.axes, sorted(curves["model_family"].unique()), strict=False):
        bad = curves[unstable & (curves["model_family"] == fam).to_numpy()]
        if not bad.empty:
            ax.scatter(
                bad["total_model_bits"],
                bad[ppl_column],
                marker="x",
                s=60,
                zorder=5,
                color=OKABE_ITO[3],
                label=f"unstable (> {cap:g} or NaN): {len(bad)}",
            )
        _log_y(ax)
        ax.legend(fontsize=7, frameon=False)
    return fig


def _most_common(frame: pd.DataFrame, column: str):
    """The most frequent value; ties go to the smallest, missing (per tensor) last."""
    counts = frame[column].value_counts(dropna=False)
    if counts.empty:
        return None
    top = [v for v, c in counts.items() if c == counts.iloc[0]]
    return sorted(top, key=lambda v: (pd.isna(v), str(v) if isinstance(v, str) else v))[0]


def _common_within(rows: pd.DataFrame, frame: pd.DataFrame, column: str):
    """The most common ``column`` value of ``frame`` when ``rows`` (cells already chosen on
    other columns) have it; otherwise the most common ``column`` value among ``rows``.

    Why: choosing the data type and the scale format each by its own count can pick a pair
    no cell has (int4 with fp16 scales beside NVFP4's e2m1 with nvfp4 scales: the commonest
    data type is e2m1, the commonest scale fp16), an empty figure. Where the store-wide
    choice exists for ``value`` it is kept, so stores that drew before draw the same.
    """
    overall = _most_common(frame, column)
    if _match(rows, column, overall).any():
        return overall
    return _most_common(rows, column)


def _at_k(cells: pd.DataFrame, k: int, y: str) -> pd.DataFrame:
    """Cells at k with a ``y`` value, plus ``_dtype`` (name with overrides) and ``_variant``."""
    if y not in cells.columns:
        return cells.iloc[0:0].assign(_dtype=[], _variant=[])
    sub = fill_config_defaults(cells[(cells["bits"] == k) & cells[y].notna()])
    return sub.assign(
        _dtype=sub["dtype"].astype(str) + sub["dtype_overrides"].map(overrides_text),
        _variant=variant_labels(sub),
    )


def _match(frame: pd.DataFrame, column: str, value) -> pd.Series:
    return frame[column].isna() if pd.isna(value) else frame[column] == value


def _with_variant(names: pd.Series, sub: pd.DataFrame) -> pd.Series:
    """Line names with the numerics / data suffix where the cells drawn hold two values."""
    return names.where(sub["_variant"] == "", names + " " + sub["_variant"])


def block_size_figure(cells: pd.DataFrame, k: int, y: str = ACC_COLUMN) -> Figure | None:
    """Block-size effect at fixed k (plain block-wise, the most common data type and scale)."""
    sub = _at_k(cells, k, y)
    sub = sub[(sub["method"] == "blockwise") & ~sub["centering"].astype(bool)]
    if sub.empty:
        return None
    dtype = _most_common(sub, "_dtype")
    scale = _common_within(sub[sub["_dtype"] == dtype], sub, "scale_format")
    sub = sub[(sub["_dtype"] == dtype) & (sub["scale_format"] == scale)]
    if sub.empty:
        return None
    bs = sub["block_size"].map(lambda b: "per tensor" if pd.isna(b) else f"block {int(b)}")
    order = sub["block_size"].fillna(-1).map(lambda b: f"{b:020.0f}")  # per tensor first
    sub = sub.assign(_line=_with_variant(order + "|" + bs, sub))
    return _hue_lines(
        sub,
        y,
        "_line",
        f"Block size at k={k} ({dtype}, {scale} scales)",
        _ylabel(y),
        hue_fmt=lambda h: h.split("|", 1)[1],
    )


def dtype_figure(cells: pd.DataFrame, k: int, y: str = ACC_COLUMN) -> Figure | None:
    """Data-type comparison at fixed k (plain block-wise, the most common block size)."""
    sub = _at_k(cells, k, y)
    sub = sub[(sub["method"] == "blockwise") & ~sub["centering"].astype(bool)]
    if sub.empty:
        return None
    bs = _most_common(sub, "block_size")
    sub = sub[_match(sub, "block_size", bs)]
    if sub.empty:
        return None
    sub = sub.assign(_line=_with_variant(sub["_dtype"], sub))
    bs_txt = "per tensor" if pd.isna(bs) else f"block {int(bs)}"
    return _hue_lines(sub, y, "_line", f"Data types at k={k} ({bs_txt})", _ylabel(y))


def proxy_centering_figure(cells: pd.DataFrame, k: int, y: str = ACC_COLUMN) -> Figure | None:
    """Proxy (outlier) quantization and centering, on against off, at fixed k."""
    sub = _at_k(cells, k, y)
    if sub.empty or not ((sub["method"] == "proxy").any() or sub["centering"].astype(bool).any()):
        return None
    # Compare like with like: the data type, block size and scale of the proxy/centered cells.
    special = sub[(sub["method"] == "proxy") | sub["centering"].astype(bool)]
    dtype = _most_common(special, "_dtype")
    of_dtype = special[special["_dtype"] == dtype]
    bs = _common_within(of_dtype, special, "block_size")
    scale = _common_within(of_dtype[_match(of_dtype, "block_size", bs)], special, "scale_format")
    sub = sub[(sub["_dtype"] == dtype) & _match(sub, "block_size", bs)]
    sub = sub[sub["method"].isin(["blockwise", "proxy"]) & (sub["scale_format"] == scale)]
    if sub.empty:
        return None
    proxy = sub["method"] == "proxy"
    variant = np.where(proxy, "proxy " + sub["outlier_fraction"].map("{:g}".format), "blockwise")
    centered = np.where(sub["centering"].astype(bool), ", centered", "")
    names = pd.Series(variant, index=sub.index) + centered
    sub = sub.assign(_line=_with_variant(names, sub))
    sub = sub.sort_values("total_model_bits").drop_duplicates(["model_family", "_line", "model"])
    bs_txt = "per tensor" if pd.isna(bs) else f"block {int(bs)}"
    title = f"Proxy quantization and centering at k={k} ({dtype}, {bs_txt})"
    return _hue_lines(sub, y, "_line", title, _ylabel(y))


def method_figure(cells: pd.DataFrame, k: int, y: str = ACC_COLUMN) -> Figure | None:
    """Methods compared at fixed k: one line per method (with its settings where they vary),
    on the data type and block size that the most methods share (e.g. int for blockwise,
    gptq and hqq).

    Only drawn when the cells hold more than one method besides proxy (proxy has its own
    figure). The configuration is a fixed rule (no accuracy is used to choose it).
    """
    sub = _at_k(cells, k, y)
    sub = sub[~sub["method"].isin(["proxy", "none"]) & ~sub["centering"].astype(bool)]
    if sub.empty or sub["method"].nunique() < 2:
        return None
    per_config = sub.groupby(["_dtype", "block_size"], dropna=False)["method"].nunique()
    widest = per_config[per_config == per_config.max()].index
    dtype, bs = sorted(widest, key=lambda t: (t[0] != "int", pd.isna(t[1]), str(t)))[0]
    sub = sub[(sub["_dtype"] == dtype) & _match(sub, "block_size", bs)]
    if sub.empty:
        return None
    settings = sub["method_settings"] if "method_settings" in sub.columns else ""
    settings = pd.Series(settings, index=sub.index).astype(str)
    # a method's settings are named only where its cells differ in them (labels stay short)
    varied = settings.groupby(sub["method"]).transform("nunique") > 1
    names = sub["method"].astype(str) + settings.map(overrides_text).where(varied, "")
    sub = sub.assign(_line=_with_variant(names, sub))
    sub = sub.sort_values("total_model_bits").drop_duplicates(["model_family", "_line", "model"])
    bs_txt = "per tensor" if pd.isna(bs) else f"block {int(bs)}"
    log_y = y.endswith(":ppl")
    return _hue_lines(sub, y, "_line", f"Methods at k={k} ({dtype}, {bs_txt})", _ylabel(y),
                      log_y=log_y)  # fmt: skip


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
