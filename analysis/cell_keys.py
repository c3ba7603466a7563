"""Cell keys and labels: what makes two cells one configuration, and how a figure names it.

The keys come from the record schema's axis roles (``harness.records.axis_columns``), never from
a hand-kept list: a new axis of the cell schema is in every key, every pairing and every label
that varies it. ``analysis.tables`` re-exports every public name (its documented paths stay).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.load import fill_config_defaults
from harness.records import (
    AXES_COLUMN,
    AXIS_EVALUATION,
    AXIS_NUMERICS,
    AXIS_QUANTIZATION,
    axis_columns,
    method_setting_columns,
)

# A cell's quantization configuration, apart from k: cells that share it form one curve. The
# record schema's quantization axes (harness.records), in their key rank; the generic column
# of the axes without a column of their own (AXES_COLUMN) is in every key where it is set.
QUANT_CONFIG = [c for c in axis_columns(AXIS_QUANTIZATION) if c != AXES_COLUMN]
# How and on what a cell was evaluated. Cells that differ here are different measurements:
# a curve never crosses them, and labels name them whenever the cells shown hold two values.
VARIANT_COLUMNS = axis_columns(AXIS_NUMERICS, AXIS_EVALUATION)
NUMERICS_COLUMNS = axis_columns(AXIS_NUMERICS)
_DIGEST_MIN = 4  # characters of a data digest shown in labels (more where needed to differ)


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


# The plain round-to-nearest method (not named in labels) and the 16-bit baseline's "method".
PLAIN_METHOD = "blockwise"
BASELINE_METHOD = "none"


def _setting_text(value: object) -> str:
    return format(value, "g") if isinstance(value, float) else (
        value if isinstance(value, str) else json.dumps(value))  # fmt: skip


def method_text(method: object, settings: dict) -> str:
    """``gptq{act_order=false,...}``; a method with a single setting as ``proxy(0.02)``; a
    method without settings by its name. The same rule for every method."""
    if len(settings) == 1:
        return f"{method}({_setting_text(next(iter(settings.values())))})"
    return f"{method}{overrides_text(json.dumps(settings))}"


def method_settings_of(cells: pd.DataFrame) -> pd.Series:
    """Each cell's method settings as a dict: its ``method_settings`` JSON, with the values
    of the columns that mirror a method setting (``outlier_fraction``) where the JSON lacks
    them and they are not at their default (stores from before ``method_settings``)."""
    raw = cells["method_settings"] if "method_settings" in cells.columns else None
    out = pd.Series([{} for _ in range(len(cells))], index=cells.index, dtype=object)
    if raw is not None:
        out = raw.map(lambda t: json.loads(t) if isinstance(t, str) and t else {})
    for col, default in method_setting_columns().items():
        if col not in cells.columns:
            continue
        extra = cells[col].where(cells[col].notna() & (cells[col] != default))
        out = pd.Series([d if pd.isna(v) or col in d else {**d, col: v}
                         for d, v in zip(out, extra, strict=True)],
                        index=cells.index, dtype=object)  # fmt: skip
    return out


def _base_labels(cells: pd.DataFrame) -> pd.Series:
    """Data type (with its overrides), block size, scale format, centering, the method with
    its settings, the axes without a record column of their own (where set)."""
    bs = cells["block_size"].map(lambda b: "tensor" if pd.isna(b) else str(int(b)))
    over = cells["dtype_overrides"].map(overrides_text)
    label = (
        cells["dtype"].astype(str) + over + " bs=" + bs + " " + cells["scale_format"].astype(str)
    )
    label = label.where(~cells["centering"].astype(bool), label + " centered")
    settings = method_settings_of(cells)
    method = pd.Series([method_text(m, d) for m, d in zip(cells["method"], settings, strict=True)],
                       index=cells.index, dtype=object)  # fmt: skip
    label = label.where(cells["method"].isin([PLAIN_METHOD, BASELINE_METHOD]), label + " " + method)
    if AXES_COLUMN in cells.columns:
        axes = cells[AXES_COLUMN].map(overrides_text)
        label = label.where(axes == "", label + " " + axes)
    return label.where(cells["method"] != BASELINE_METHOD, "16-bit baseline").astype(object)


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
    return _with_axes(key, cells)


def _with_axes(key: pd.Series, cells: pd.DataFrame) -> pd.Series:
    """``key`` with the cell's generic axes appended where it has any (a store whose cells
    are all at the defaults keeps exactly the keys it always had)."""
    axes = cells[AXES_COLUMN].map(str)
    return key.where(axes == "{}", key + "\x1f" + axes)


def pairing_columns(vary: str | Sequence[str] = ()) -> list[str]:
    """The cell-frame columns two cells must share to be compared as a pair that differs only
    in ``vary`` (e.g. ``"block_size"``, ``"dtype"``): every quantization axis of the record
    schema (:data:`QUANT_CONFIG`, then the generic axes column) except ``vary``. Numerics and
    data (:data:`VARIANT_COLUMNS`) are not in it: a claim compares within one scope of those.
    Group ``fill_config_defaults(cells)`` by ``[model, "bits", *pairing_columns(vary)]``: for
    a store without generic axes this is the grouping (and its order) claims always used.
    """
    varied = {vary} if isinstance(vary, str) else set(vary)
    unknown = varied - {*QUANT_CONFIG, AXES_COLUMN}
    if unknown:
        raise ValueError(
            f"vary={sorted(unknown)}: not a quantization axis; allowed: {QUANT_CONFIG}"
        )
    return [c for c in [*QUANT_CONFIG, AXES_COLUMN] if c not in varied]


def pairing_keys(cells: pd.DataFrame, vary: str | Sequence[str] = ()) -> pd.Series:
    """One string per cell joining its :func:`pairing_columns` values: cells with equal keys
    (and the same model and k) differ at most in ``vary``."""
    cells = fill_config_defaults(cells)
    parts = [cells[c].map(str) for c in pairing_columns(vary)]
    key = pd.Series("", index=cells.index, dtype=object)
    for i, part in enumerate(parts):
        key = key + ("\x1f" if i else "") + part
    return key
