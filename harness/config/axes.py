"""Each axis of a cell declared once: every field of the cell schema carries its role.

Why: the cell id's dropped fields, the quantization fields a 16-bit baseline leaves out, the
validator's memo keys, the user paths, the fields a format fixes and the record's columns used
to be separate hand-kept lists; a new axis had to be added to each, and one forgotten list
merged two configurations (or kept a wrong cached verdict) silently. Now a field of
:class:`harness.config.schema.CellConfig` is declared with ``field(metadata=axis(role, ...))``,
which stores its role and flags in the dataclass field's metadata, and every list is derived from it here:

================  ===========================================================================
identity          what is measured: ``model``, ``bits``, ``seed``; in the cell id
quantization      how the weights are stored: dropped from the id of the 16-bit baseline
numerics          how the forward passes run (``device``, ``compute_dtype``: *resolved*, the
                  id holds the device class and the dtype the model runs in)
evaluation        what the cell is measured on (``eval``; ``data_root``: resolved into the
                  data sources)
run_only          where and under which name a run is kept (``results_dir``, ``sweep``, the
                  plot label, ``plugins``): never in the cell id
================  ===========================================================================

Flags: ``resolved`` (the id holds its resolution, not the value), ``user_path`` (``~`` and
``$VAR`` expanded, :func:`harness.files.user_path`), ``format`` (a ``format=`` entry fixes it),
``model_input`` (read when the model folder is inspected or loaded), ``column`` (the record
column(s) that carry it; an axis without a column of its own reaches the record through the
generic ``axes`` column, :func:`record_axes`, as sorted JSON of its non-default values).

This module reads dataclass metadata only (no Hydra, no torch): every function takes the
schema class (results cached per class), so the schema module itself can declare its fields
with :func:`axis`, and the users look the schema class up when they run (a test may extend it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from enum import Enum
from typing import Any


class Role(str, Enum):
    """What a cell field is to the measurement (see the module docstring)."""

    identity = "identity"
    quantization = "quantization"
    numerics = "numerics"
    evaluation = "evaluation"
    run_only = "run_only"

    def __str__(self) -> str:
        return str(self.value)


# The roles whose fields are result-determining: in the cell id (unless resolved) and, where
# they have no record column of their own, in the record's generic ``axes`` column.
RESULT_ROLES = (Role.identity, Role.quantization, Role.numerics, Role.evaluation)


def axis(
    role: Role,
    *,
    column: str | tuple[str, ...] | None = None,
    resolved: bool = False,
    user_path: bool = False,
    format: bool = False,
    model_input: bool = False,
) -> dict[str, Any]:
    """The metadata of a cell-schema field: its role and flags (the one declaration), as in
    ``bits: int = field(default=4, metadata=axis(Role.identity, column="bits", format=True))``.

    ``column``: the record column(s) that carry the field (None: the generic ``axes`` column
    carries it when its value is not the default).
    """
    columns = (column,) if isinstance(column, str) else tuple(column or ())
    return {"role": Role(role), "column": columns, "resolved": resolved,
            "user_path": user_path, "format": format, "model_input": model_input}  # fmt: skip


@functools.cache
def _fields(schema: type) -> tuple[dataclasses.Field, ...]:
    out = tuple(f for f in dataclasses.fields(schema) if "role" in f.metadata)
    missing = [f.name for f in dataclasses.fields(schema) if "role" not in f.metadata]
    if missing:
        raise TypeError(f"{schema.__name__}: fields {missing} have no role; "
                        "declare them with field(metadata=axis(...))")  # fmt: skip
    return out


def role_of(schema: type, name: str) -> Role:
    """The role of field ``name`` of ``schema`` (KeyError for an unknown field)."""
    for f in _fields(schema):
        if f.name == name:
            return f.metadata["role"]
    raise KeyError(name)


@functools.cache
def names(schema: type, *roles: Role) -> tuple[str, ...]:
    """Fields of ``schema`` with one of ``roles`` (all fields when none given), in order."""
    return tuple(f.name for f in _fields(schema) if not roles or f.metadata["role"] in roles)


@functools.cache
def flagged(schema: type, flag: str) -> tuple[str, ...]:
    """Fields of ``schema`` with ``flag`` set (``resolved``, ``user_path``, ``format``,
    ``model_input``), in declaration order."""
    return tuple(f.name for f in _fields(schema) if f.metadata.get(flag))


@functools.cache
def non_result_fields(schema: type) -> tuple[str, ...]:
    """Fields the cell id drops: run-only fields and the resolved ones (their resolution is
    hashed instead), plus Hydra's own ``hydra`` node."""
    dropped = [f.name for f in _fields(schema)
               if f.metadata["role"] == Role.run_only or f.metadata["resolved"]]  # fmt: skip
    return (*dropped, "hydra")


@functools.cache
def quantization_fields(schema: type) -> tuple[str, ...]:
    """Fields the 16-bit baseline's id leaves out (one baseline whatever the data type)."""
    return names(schema, Role.quantization)


@functools.cache
def columnless_axes(schema: type) -> tuple[str, ...]:
    """Result-determining fields (not resolved) without a record column of their own: the
    record carries them in its generic ``axes`` column (:func:`record_axes`)."""
    return tuple(f.name for f in _fields(schema)
                 if f.metadata["role"] in RESULT_ROLES and not f.metadata["resolved"]
                 and not f.metadata["column"])  # fmt: skip


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return getattr(f.default, "value", f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def record_axes(schema: type, cell: Any, baseline: bool) -> str:
    """The record's ``axes`` column: sorted JSON of the column-less axes whose value is not
    the schema's default (``"{}"`` when none), so a store written before an axis existed (every
    cell at the default) groups and pairs exactly as one written after it. ``cell``: the config
    or the same as plain data; the baseline leaves its quantization axes out (as its id does).
    """
    skip = set(quantization_fields(schema)) if baseline else set()
    wanted = set(columnless_axes(schema)) - skip
    out = {}
    for f in _fields(schema):
        if f.name not in wanted:
            continue
        value = cell.get(f.name, None) if hasattr(cell, "get") else getattr(cell, f.name, None)
        value = getattr(value, "value", value)
        if value is not None and not isinstance(value, str | int | float | bool):
            from omegaconf import OmegaConf

            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True, enum_to_str=True)
        if value != _default(f):
            out[f.name] = value
    return json.dumps(out, sort_keys=True, default=str)
