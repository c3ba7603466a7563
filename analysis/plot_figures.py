"""kbit-plot's figures of cells, declared once each in :mod:`analysis.figure_registry`.

Each figure is registered with its name (``{k}`` filled with ``--k``), the function that draws
it (:mod:`analysis.figures`) and the check that says, before drawing, why it would have
nothing to compare. :func:`analysis.cli.make_figures` draws the figures of the ``plot`` path
in registration order; a plugin's figure registered on that path is drawn the same way, from
the same :class:`PlotInputs`.

Why checks before drawing: a figure with no cell to draw (no perplexity task, nothing at k,
no family with both a curve and its baseline) is not written, and the command says why in one
line. These checks are necessary conditions only: what a figure compares (two lines, or a line
and its 16-bit baseline) is decided by the figure function itself, which returns None when its
cells compare nothing, so the rule lives in one place (:mod:`analysis.figures`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figure_registry import figure_spec, register_figure, registered_figures
from analysis.figures import (
    block_size_figure,
    dtype_figure,
    method_figure,
    perplexity_figure,
    proxy_centering_figure,
    scaling_figure,
)
from analysis.load import ACC_COLUMN, fill_config_defaults
from analysis.selection import half_scores, same_examples
from analysis.tables import QUANT_CONFIG, main_curves
from harness.records import BASELINE_BITS

PAPER_METHOD = "blockwise"
# The columns of QUANT_CONFIG that describe the element format; the others (apart from
# ``method``) are the method's own settings, shown generically (method_settings_text).
FORMAT_COLUMNS = ("dtype", "dtype_overrides", "block_size", "scale_format", "centering")


@dataclass
class PlotInputs:
    """What every figure of kbit-plot's ``plot`` path is drawn from.

    ``curves``: ``{"acc": ..., "ppl": ...}`` main curves (:func:`main_curves_for`); a figure
    computes its own (fixed-rule fallback, no per-example results) where one is missing.
    """

    cells: pd.DataFrame
    k: int
    ppl_column: str | None
    cap: float
    curves: dict[str, pd.DataFrame] = field(default_factory=dict)


def accuracy_curves(
    cells: pd.DataFrame,
    per_sample: pd.DataFrame | None,
    selection: str = "split",
    method: str = PAPER_METHOD,
) -> pd.DataFrame:
    """The accuracy main curves, every point of a family on the same examples.

    :func:`analysis.tables.main_curves` reports a selected configuration on held-out half B
    and a group with nothing to choose (the 16-bit baseline) on all examples;
    :func:`analysis.selection.same_examples` moves the latter to half B wherever the family
    holds a half-B point, so that a figure or table never sets a point on half of the
    examples beside its baseline on all of them.
    """
    curves = main_curves(cells, ACC_COLUMN, per_sample, selection, method=method)
    scores = half_scores(per_sample) if per_sample is not None else None
    return same_examples(curves, scores, ACC_COLUMN)


def main_curves_for(
    cells: pd.DataFrame,
    ppl_column: str | None,
    per_sample: pd.DataFrame | None,
    selection: str = "split",
) -> dict[str, pd.DataFrame]:
    """The accuracy and perplexity main curves, with one selection for both figures."""
    curves = {"acc": accuracy_curves(cells, per_sample, selection)}
    if ppl_column and ppl_column in cells.columns:
        # NaN perplexity stays on its curve as inf, so the figure can mark it unstable.
        filled = cells.assign(**{ppl_column: cells[ppl_column].fillna(np.inf)})
        curves["ppl"] = main_curves(filled, ppl_column, per_sample, selection)
    return curves


def method_settings_text(frame: pd.DataFrame) -> pd.Series:
    """Each cell's method settings as one text: every quantization-config column that is
    neither ``method`` nor the element format (:data:`FORMAT_COLUMNS`).

    Why generic: a method's settings (proxy's outlier fraction, a method's
    ``method_settings``) are told apart the same way for every method, so a new method's
    setting needs no line here."""
    cols = [c for c in QUANT_CONFIG if c not in (*FORMAT_COLUMNS, "method") and c in frame]
    text = pd.Series("", index=frame.index, dtype=object)
    for i, col in enumerate(cols):
        text = text + ("\x1f" if i else "") + frame[col].map(str)
    return text


def plain_at_k(cells: pd.DataFrame, k: int, y: str | None) -> pd.DataFrame:
    """Cells at k with a ``y`` value, config defaults filled, ``_dtype`` = name + overrides."""
    if y is None or y not in cells.columns:
        return cells.iloc[0:0]
    sub = fill_config_defaults(cells[(cells["bits"] == k) & cells[y].notna()])
    return sub.assign(_dtype=sub["dtype"].astype(str) + "|" + sub["dtype_overrides"].astype(str))


def _scaling_skip(inputs: PlotInputs, y: str | None, curve: str) -> str | None:
    if y is None:
        return "the store has no perplexity task"
    frame = inputs.curves.get(curve)
    if frame is None or frame.empty:
        return f"no plain block-wise or 16-bit cell has {y}"
    base = frame["bits"] == BASELINE_BITS
    if not set(frame.loc[base, "model_family"]) & set(frame.loc[~base, "model_family"]):
        return f"no family has both a k curve and a 16-bit baseline with {y}"
    return None


def _at_k(inputs: PlotInputs, y: str | None) -> tuple[pd.DataFrame, str | None]:
    """(cells at k with ``y``, or why there are none)."""
    if y is None:
        return inputs.cells.iloc[0:0], "the store has no perplexity task"
    sub = plain_at_k(inputs.cells, inputs.k, y)
    return sub, (f"no cell at k={inputs.k} has {y}" if sub.empty else None)


def _plain_skip(inputs: PlotInputs) -> str | None:
    sub, why = _at_k(inputs, ACC_COLUMN)
    if why:
        return why
    plain = sub[(sub["method"] == PAPER_METHOD) & ~sub["centering"].astype(bool)]
    return f"no plain block-wise cell at k={inputs.k}" if plain.empty else None


def _proxy_centering_skip(inputs: PlotInputs) -> str | None:
    sub, why = _at_k(inputs, ACC_COLUMN)
    if why:
        return why
    special = (sub["method"] == "proxy") | sub["centering"].astype(bool)
    if not special.any():
        return f"no proxy or centered cell at k={inputs.k}"
    both = sub[sub["method"].isin([PAPER_METHOD, "proxy"])]
    kinds = both["method"].astype(str) + both["centering"].astype(bool).map(str)
    kinds = kinds + method_settings_text(both).where(both["method"] != PAPER_METHOD, "")
    if kinds.nunique() < 2:
        return (
            f"only one kind of cell at k={inputs.k} (nothing to set the proxy/centered cells "
            "against)"
        )
    return None


def _method_skip(inputs: PlotInputs, y: str | None) -> str | None:
    sub, why = _at_k(inputs, y)
    if why:
        return why
    others = sub[~sub["method"].isin(["proxy", "none"]) & ~sub["centering"].astype(bool)]
    return f"no cell of a method other than proxy at k={inputs.k}" if others.empty else None


@register_figure(
    "scaling_acc",
    skip_reason=lambda i: _scaling_skip(i, ACC_COLUMN, "acc"),
    description="mean zero-shot accuracy vs total model bits, a line per k",
)
def scaling_acc(inputs: PlotInputs) -> Figure | None:
    """Figure 1 (:func:`analysis.figures.scaling_figure`)."""
    return scaling_figure(
        inputs.cells, ACC_COLUMN, "mean zero-shot accuracy", curves=inputs.curves.get("acc")
    )


@register_figure(
    "scaling_ppl",
    skip_reason=lambda i: _scaling_skip(i, i.ppl_column, "ppl"),
    description="perplexity vs total model bits, unstable cells marked at the cap",
)
def scaling_ppl(inputs: PlotInputs) -> Figure | None:
    """Figure 2 (:func:`analysis.figures.perplexity_figure`)."""
    if not inputs.ppl_column:
        return None
    return perplexity_figure(
        inputs.cells, inputs.ppl_column, inputs.cap, curves=inputs.curves.get("ppl")
    )


@register_figure("block_size_k{k}", skip_reason=_plain_skip, description="block sizes at fixed k")
def block_size_k(inputs: PlotInputs) -> Figure | None:
    """Figure 3 (:func:`analysis.figures.block_size_figure`)."""
    return block_size_figure(inputs.cells, inputs.k)


@register_figure("dtype_k{k}", skip_reason=_plain_skip, description="data types at fixed k")
def dtype_k(inputs: PlotInputs) -> Figure | None:
    """Figure 4 (:func:`analysis.figures.dtype_figure`)."""
    return dtype_figure(inputs.cells, inputs.k)


@register_figure(
    "proxy_centering_k{k}",
    skip_reason=_proxy_centering_skip,
    description="block-wise vs proxy vs centering at fixed k",
)
def proxy_centering_k(inputs: PlotInputs) -> Figure | None:
    """Figure 5 (:func:`analysis.figures.proxy_centering_figure`)."""
    return proxy_centering_figure(inputs.cells, inputs.k)


@register_figure(
    "method_k{k}",
    skip_reason=lambda i: _method_skip(i, ACC_COLUMN),
    description="methods at fixed k, accuracy",
)
def method_k(inputs: PlotInputs) -> Figure | None:
    """Figure 6 (:func:`analysis.figures.method_figure`)."""
    return method_figure(inputs.cells, inputs.k)


@register_figure(
    "method_ppl_k{k}",
    skip_reason=lambda i: _method_skip(i, i.ppl_column),
    description="methods at fixed k, perplexity",
)
def method_ppl_k(inputs: PlotInputs) -> Figure | None:
    """Figure 6, perplexity (:func:`analysis.figures.method_figure`)."""
    return method_figure(inputs.cells, inputs.k, inputs.ppl_column) if inputs.ppl_column else None


def _spec_for(name: str, k: int):
    """The ``plot`` figure whose file name at ``k`` is ``name`` (KeyError if none)."""
    for spec in registered_figures("plot"):
        if spec.file_name(k) == name:
            return spec
    return figure_spec(name)


def build_figure(
    name: str,
    cells: pd.DataFrame,
    k: int,
    ppl_column: str | None,
    cap: float,
    curves: dict[str, pd.DataFrame] | None = None,
) -> Figure | None:
    """The ``plot`` figure ``name`` (``{k}`` filled in), or None if the data do not support it.

    ``curves``: ``{"acc": ..., "ppl": ...}`` main curves (:func:`main_curves_for`); computed
    by the figure without per-example results (fixed-rule fallback) if not given.
    """
    return _spec_for(name, k).build(PlotInputs(cells, k, ppl_column, cap, curves or {}))


def figure_skip_reason(
    name: str,
    cells: pd.DataFrame,
    k: int,
    ppl_column: str | None,
    curves: dict[str, pd.DataFrame],
) -> str | None:
    """Why ``plot`` figure ``name`` would have nothing to compare, or None when it has
    something (see the module docstring); None for a figure registered without a check."""
    spec = _spec_for(name, k)
    if spec.skip_reason is None:
        return None
    return spec.skip_reason(PlotInputs(cells, k, ppl_column, float("nan"), curves))
