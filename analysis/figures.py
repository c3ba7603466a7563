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
part of every data-type name (``float{exponent_bits=3}``), numerics / data digest
(``cuda/bfloat16``, ``data=ab12``) are added to a line's label whenever the cells of *its
panel* hold more than one value of them (a value shared by the whole panel goes into the
panel's title when other panels differ), and any other field that still tells two cells of one
line apart is named in the label (``scale_format=bf16``).

Every figure compares, so every point carries a 95% interval, and each figure says which
(:func:`analysis.tables.interval`, the one place the rule lives): accuracies +- 1.96 of the
recorded lm-eval stderr (on held-out half B where the point is reported there); perplexity
``exp(mean NLL +- t * se)`` with ``se`` from batch means of contiguous per-window NLL
(:func:`analysis.tables.window_stderr`). A panel is drawn only when something in it compares
(a scaling panel needs a k line and the 16-bit baseline; the other figures two lines); a figure
with no such panel is not built (the function returns None). The log2 x axis labels at least
three ticks whenever the data span a quarter of an octave (:class:`Pow2Locator`).

The shared look (palette, panels, axes, saving) is in :mod:`analysis.figure_style`; each
figure is registered for kbit-plot in :mod:`analysis.plot_figures`.

Why one module: the six figure functions share their panel, variant-label and hue-line
helpers (``_hue_lines``, ``_with_variant``, ``_panel_variants``); splitting the figures across
modules would turn those helpers into a public interface that no caller outside needs.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figure_style import (
    BASELINE_COLOR,
    DEFAULT_PPL_CAP,
    FORMATS,
    LINESTYLES,
    MARKERS,
    MIN_X_TICKS,
    OKABE_ITO,
    Pow2Locator,
    draw_points,
    finish_axis,
    interval_caption,
    line_style,
    log_y_axis,
    panels,
    pow2_label,
    save_figure,
    ylabel_text,
)
from analysis.load import ACC_COLUMN, fill_config_defaults
from analysis.tables import (
    ESTIMATE_HELDOUT,
    QUANT_CONFIG,
    VARIANT_COLUMNS,
    config_keys,
    interval,
    main_curves,
    measure_stderr,
    overrides_text,
    point_stderr,
    variant_labels,
)
from harness.records import BASELINE_BITS

log = logging.getLogger(__name__)

_finish_axis = finish_axis  # its name before the style moved to analysis.figure_style
__all__ = [
    "BASELINE_COLOR",
    "DEFAULT_PPL_CAP",
    "FORMATS",
    "LINESTYLES",
    "MARKERS",
    "MIN_X_TICKS",
    "OKABE_ITO",
    "Pow2Locator",
    "block_size_figure",
    "dtype_figure",
    "interval_caption",
    "line_style",
    "method_figure",
    "perplexity_figure",
    "pow2_label",
    "proxy_centering_figure",
    "save_figure",
    "scaling_figure",
]


def _panel_variants(frame: pd.DataFrame, panel: str = "model_family") -> tuple[pd.Series, dict]:
    """(label suffix per row naming what differs *within* its panel, title suffix per panel).

    A panel whose cells share one numerics / data value while the figure holds several gets
    that value in its title, so nothing is lost from the figure while every legend names only
    what tells its own lines apart.
    """
    frame = fill_config_defaults(frame)
    within = pd.Series("", index=frame.index, dtype=object)
    titles = {}
    overall = variant_labels(frame, frame)
    for fam, rows in frame.groupby(panel, sort=False):
        within.loc[rows.index] = variant_labels(rows, rows)
        shared = overall.loc[rows.index].unique()
        titles[fam] = str(shared[0]) if len(shared) == 1 and shared[0] else ""
    return within, titles


def _title(fam: str, titles: dict) -> str:
    extra = titles.get(fam, "")
    return f"{fam} ({extra})" if extra else str(fam)


def _baselines(cells: pd.DataFrame, y: str) -> pd.DataFrame:
    """The 16-bit baselines with a ``y`` value: every hue figure's reference points."""
    if y not in cells.columns:
        return cells.iloc[0:0]
    return fill_config_defaults(cells[(cells["bits"] == BASELINE_BITS) & cells[y].notna()])


def _hue_lines(
    cells: pd.DataFrame,
    y: str,
    hue: str,
    title: str,
    ylabel: str,
    hue_fmt=str,
    log_y: bool = False,
    titles: dict | None = None,
    baselines: pd.DataFrame | None = None,
) -> Figure | None:
    """One panel per family, one line per value of ``hue`` (points joined by total bits),
    each point with its interval; the family's 16-bit baselines (``baselines``, on the same
    numerics and data as the lines) as black stars. A panel is drawn only where something
    compares: two lines, or a line and a baseline; None when no family has that.
    ``titles``: panel title suffix per family."""
    cells = cells[cells[y].notna()] if y in cells.columns else cells.iloc[0:0]
    if cells.empty:
        return None
    base = baselines if baselines is not None else cells.iloc[0:0]
    if not base.empty:  # a baseline measured like some line of its panel
        vk = _variant_key(base).to_numpy()
        line_keys = set(zip(cells["model_family"], _variant_key(cells), strict=True))
        keep = [(f, v) in line_keys for f, v in zip(base["model_family"], vk, strict=True)]
        base = base[np.asarray(keep, dtype=bool)]
    n_lines = cells.groupby("model_family")[hue].nunique()
    has_base = set(base["model_family"])
    families = sorted(f for f, n in n_lines.items() if n >= 2 or (n >= 1 and f in has_base))
    if not families:
        log.info("%s: no panel has two lines or a line and a baseline; skipped", title)
        return None
    cells = cells[cells["model_family"].isin(families)]
    both = pd.concat([cells, base], ignore_index=False)
    se, df = measure_stderr(both, y)
    low, high = interval(both[y], se, df, log_scale=y.endswith(":ppl"))
    cells = cells.assign(_low=low[: len(cells)], _high=high[: len(cells)])
    base = base.assign(_low=low[len(cells) :], _high=high[len(cells) :])
    hues = sorted(cells[hue].dropna().unique(), key=lambda v: (isinstance(v, str), v))
    titles = titles or {}
    drawn = bool(np.isfinite(low).any())
    fig, axes = panels(families, title, interval_caption(y, drawn=drawn))
    for ax, fam in zip(axes, families, strict=True):
        sub = cells[cells["model_family"] == fam]
        for i, h in enumerate(hues):
            line = sub[sub[hue] == h].sort_values("total_model_bits")
            if line.empty:
                continue
            draw_points(ax, line["total_model_bits"], line[y], line["_low"], line["_high"],
                         hue_fmt(h), line_style(i))  # fmt: skip
        b = base[base["model_family"] == fam].sort_values("total_model_bits")
        if not b.empty:
            suffix = variant_labels(b, sub)
            for text, rows in b.groupby(suffix, sort=True):
                _draw_marks(ax, rows["total_model_bits"], rows[y], rows["_low"], rows["_high"],
                            _line_label("16-bit baseline", str(text)))  # fmt: skip
        if log_y:
            log_y_axis(ax)
        finish_axis(ax, _title(fam, titles), ylabel)
    return fig


def _draw_marks(ax, x, y, low, high, label: str) -> None:
    """Unjoined black stars with error bars: a reference, not a curve of the comparison."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ax.scatter(x, y, marker="*", s=45, color=BASELINE_COLOR, label=label, zorder=4)
    low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    if (np.isfinite(low) & np.isfinite(high)).any():
        yerr = np.vstack([np.clip(y - low, 0, None), np.clip(high - y, 0, None)])
        ax.errorbar(x, y, yerr=yerr, fmt="none", ecolor=BASELINE_COLOR, elinewidth=0.9,
                    capsize=0, alpha=0.8)  # fmt: skip


def scaling_figure(
    cells: pd.DataFrame,
    y: str = ACC_COLUMN,
    ylabel: str | None = None,
    curves: pd.DataFrame | None = None,
) -> Figure | None:
    """The bit-level scaling figure: a line per k, a panel per family, baseline in black.

    ``curves``: from :func:`analysis.tables.main_curves` (with per-example results for the
    selection-corrected accuracies and their half-B intervals); computed from ``cells``
    without them if not given. None when no family has both a k line and a baseline.
    """
    curves = main_curves(cells, y) if curves is None else curves
    if curves.empty:
        log.info("scaling figure: no cell has %s; skipped", y)
        return None
    return _draw_scaling(curves, y, ylabel or ylabel_text(y))


def _line_label(name: str, variant: str) -> str:
    return f"{name} {variant}" if variant else name


def _variant_key(frame: pd.DataFrame) -> pd.Series:
    """The raw numerics/data values of each row: what a line may never cross."""
    frame = fill_config_defaults(frame)
    key = frame[VARIANT_COLUMNS[0]].map(str)
    for col in VARIANT_COLUMNS[1:]:
        key = key + "\x1f" + frame[col].map(str)
    return key


def _comparing_families(curves: pd.DataFrame) -> list:
    """Families whose panel holds a baseline and at least one quantized point."""
    base = curves["bits"] == BASELINE_BITS
    has_base = set(curves.loc[base, "model_family"])
    has_k = set(curves.loc[~base, "model_family"])
    return sorted(has_base & has_k)


def _draw_scaling(
    curves: pd.DataFrame, y: str, ylabel: str, cap: float | None = None
) -> Figure | None:
    """The scaling figure from main curves; ``cap``: perplexity above it (or non-finite) is
    drawn at the cap with a cross, without an interval, and counted in the legend."""
    families = _comparing_families(curves)
    if not families:
        log.info("scaling figure %s: no family has both a k line and a 16-bit baseline", y)
        return None
    curves = curves[curves["model_family"].isin(families)]
    curves = fill_config_defaults(curves).assign(_vkey=_variant_key(curves))
    within, titles = _panel_variants(curves)
    se, df = point_stderr(curves)
    raw = curves[y].to_numpy(dtype=float)
    unstable = np.zeros(raw.shape, bool)
    if cap is not None:
        unstable = ~np.isfinite(raw) | (raw > cap)
        curves = curves.assign(**{y: np.where(unstable, cap, raw)})
        se = se.where(~unstable, np.nan)
    low, high = interval(curves[y], se, df, log_scale=y.endswith(":ppl"))
    curves = curves.assign(_within=within, _low=low, _high=high, _unstable=unstable)
    vkeys = sorted(curves["_vkey"].unique())
    ks = sorted(int(k) for k in curves["bits"].unique() if k != BASELINE_BITS)
    held = set(curves.get("estimate", pd.Series(dtype=object)))
    drawn = bool(np.isfinite(low).any())
    caption = interval_caption(y, ESTIMATE_HELDOUT if ESTIMATE_HELDOUT in held else "", drawn)
    if len(held) > 1:
        caption += " (some points: all examples)"
    fig, axes = panels(families, f"Bit-level scaling: {ylabel}", caption)
    for ax, fam in zip(axes, families, strict=True):
        panel = curves[curves["model_family"] == fam]
        for vi, vkey in enumerate(vkeys):
            sub = panel[panel["_vkey"] == vkey]
            if sub.empty:
                continue
            variant = str(sub["_within"].iloc[0])
            for i, k in enumerate(ks):
                line = sub[sub["bits"] == k].sort_values("total_model_bits")
                if not line.empty:
                    draw_points(ax, line["total_model_bits"], line[y], line["_low"],
                                 line["_high"], _line_label(f"{k}-bit", variant),
                                 line_style(i + vi * len(ks)))  # fmt: skip
            base = sub[sub["bits"] == BASELINE_BITS].sort_values("total_model_bits")
            if not base.empty:
                style = {"color": BASELINE_COLOR, "ls": ["--", ":", "-."][vi % 3],
                         "marker": ["*", "p", "h"][vi % 3], "ms": 6}  # fmt: skip
                draw_points(ax, base["total_model_bits"], base[y], base["_low"], base["_high"],
                             _line_label("16-bit baseline", variant), style)  # fmt: skip
        bad = panel[panel["_unstable"]]
        if not bad.empty:
            ax.scatter(bad["total_model_bits"], bad[y], marker="x", s=60, zorder=5,
                       color=OKABE_ITO[3],
                       label=f"unstable (> {cap:g} or NaN): {len(bad)}")  # fmt: skip
        if y.endswith(":ppl"):
            log_y_axis(ax)
        finish_axis(ax, _title(fam, titles), ylabel)
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
    Intervals need per-window NLL: given to ``main_curves`` (``per_sample``) or as
    ``<task>:nll:stderr`` columns of ``cells`` (:func:`analysis.tables.with_window_stderr`).
    """
    if ppl_column not in cells.columns:
        log.info("perplexity figure: no %s column; skipped", ppl_column)
        return None
    if curves is None:
        filled = cells.assign(**{ppl_column: cells[ppl_column].fillna(np.inf)})
        curves = main_curves(filled, ppl_column)
    if curves.empty:
        return None
    return _draw_scaling(curves, ppl_column, f"{ppl_column} (capped at {cap:g})", cap=cap)


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
    """Cells at k with a ``y`` value, plus ``_dtype`` (name with overrides), ``_variant``
    (numerics / data where they differ within the cell's family panel) and ``_cfg``."""
    if y not in cells.columns:
        return cells.iloc[0:0].assign(_dtype=[], _variant=[], _cfg=[])
    sub = fill_config_defaults(cells[(cells["bits"] == k) & cells[y].notna()])
    if sub.empty:
        return sub.assign(_dtype=[], _variant=[], _cfg=[])
    return sub.assign(
        _dtype=sub["dtype"].astype(str) + sub["dtype_overrides"].map(overrides_text),
        _variant="",
        _cfg=config_keys(sub),
    )


def _match(frame: pd.DataFrame, column: str, value) -> pd.Series:
    return frame[column].isna() if pd.isna(value) else frame[column] == value


def _shown(value) -> str:
    if isinstance(value, str):
        return overrides_text(value) or value if value.startswith("{") else value
    if pd.isna(value):
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _with_variant(names: pd.Series, sub: pd.DataFrame) -> tuple[pd.Series, dict]:
    """Line names that never merge cells differing in a result-determining field.

    Numerics / data digest are added where the line's family panel holds two values of them
    (:func:`_panel_variants`; a value shared by the panel goes to its title: the second item
    returned, per family); any configuration field that still varies among the cells of one
    (panel, name) (e.g. the scale format) is named as ``field=value``.
    """
    within, titles = _panel_variants(sub)
    names = names.where(within == "", names + " " + within)
    groups = sub.assign(_name=names).groupby(["model_family", "_name"], sort=False)
    for _, rows in groups:
        if rows["_cfg"].nunique() < 2:
            continue
        varying = [c for c in [*QUANT_CONFIG, *VARIANT_COLUMNS]
                   if c in rows.columns and rows[c].map(str).nunique() > 1]  # fmt: skip
        extra = rows[varying].apply(
            lambda r, cols=varying: " ".join(f"{c}={_shown(r[c])}" for c in cols), axis=1
        )
        names.loc[rows.index] = names.loc[rows.index] + " " + extra
    return names, titles


def block_size_figure(cells: pd.DataFrame, k: int, y: str = ACC_COLUMN) -> Figure | None:
    """Block-size effect at fixed k (plain block-wise; the data type and scale format with the
    most block sizes measured)."""
    sub = _at_k(cells, k, y)
    sub = sub[(sub["method"] == "blockwise") & ~sub["centering"].astype(bool)]
    if sub.empty:
        return None
    # the data type and scale with the most block sizes (something to compare), then the
    # most cells, then by name: a fixed rule, no accuracy used
    per = sub.groupby(["_dtype", "scale_format"], dropna=False)["block_size"]
    rank = pd.DataFrame({"n_bs": per.nunique(dropna=False), "n": per.size()}).reset_index()
    rank = rank.sort_values(["n_bs", "n", "_dtype", "scale_format"],
                            ascending=[False, False, True, True])  # fmt: skip
    dtype, scale = rank.iloc[0]["_dtype"], rank.iloc[0]["scale_format"]
    sub = sub[(sub["_dtype"] == dtype) & (sub["scale_format"] == scale)]
    if sub.empty:
        return None
    bs = sub["block_size"].map(lambda b: "per tensor" if pd.isna(b) else f"block {int(b)}")
    order = sub["block_size"].fillna(-1).map(lambda b: f"{b:020.0f}")  # per tensor first
    names, titles = _with_variant(order + "|" + bs, sub)
    return _hue_lines(
        sub.assign(_line=names),
        y,
        "_line",
        f"Block size at k={k} ({dtype}, {scale} scales)",
        ylabel_text(y),
        hue_fmt=lambda h: h.split("|", 1)[1],
        titles=titles,
        baselines=_baselines(cells, y),
    )


def dtype_figure(cells: pd.DataFrame, k: int, y: str = ACC_COLUMN) -> Figure | None:
    """Data-type comparison at fixed k (plain block-wise, the block size with the most data
    types measured)."""
    sub = _at_k(cells, k, y)
    sub = sub[(sub["method"] == "blockwise") & ~sub["centering"].astype(bool)]
    if sub.empty:
        return None
    # the block size with the most data types (something to compare), then the most cells,
    # then the smallest: a fixed rule, no accuracy used
    per = sub.groupby("block_size", dropna=False)["_dtype"]
    rank = pd.DataFrame({"n_dt": per.nunique(), "n": per.size()}).reset_index()
    rank = rank.sort_values(["n_dt", "n", "block_size"], ascending=[False, False, True],
                            na_position="last")  # fmt: skip
    bs = rank.iloc[0]["block_size"]
    sub = sub[_match(sub, "block_size", bs)]
    if sub.empty:
        return None
    names, titles = _with_variant(sub["_dtype"], sub)
    bs_txt = "per tensor" if pd.isna(bs) else f"block {int(bs)}"
    return _hue_lines(sub.assign(_line=names), y, "_line", f"Data types at k={k} ({bs_txt})",
                      ylabel_text(y), titles=titles, baselines=_baselines(cells, y))  # fmt: skip


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
    names, titles = _with_variant(pd.Series(variant, index=sub.index) + centered, sub)
    sub = sub.assign(_line=names)
    sub = sub.sort_values("total_model_bits").drop_duplicates(["model_family", "_line", "model"])
    bs_txt = "per tensor" if pd.isna(bs) else f"block {int(bs)}"
    title = f"Proxy quantization and centering at k={k} ({dtype}, {bs_txt})"
    return _hue_lines(sub, y, "_line", title, ylabel_text(y), log_y=y.endswith(":ppl"),
                      titles=titles, baselines=_baselines(cells, y))  # fmt: skip


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
    names, titles = _with_variant(names, sub)
    sub = sub.assign(_line=names)
    sub = sub.sort_values("total_model_bits").drop_duplicates(["model_family", "_line", "model"])
    bs_txt = "per tensor" if pd.isna(bs) else f"block {int(bs)}"
    log_y = y.endswith(":ppl")
    return _hue_lines(sub, y, "_line", f"Methods at k={k} ({dtype}, {bs_txt})", ylabel_text(y),
                      log_y=log_y, titles=titles, baselines=_baselines(cells, y))  # fmt: skip
