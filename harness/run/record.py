"""A cell's record fields: identity, configuration, numerics and provenance of every row.

Why a module of its own: the same fields are built three times (the trial record of every cell
validated by a sweep plan, the rows of a cell that ran, the one row of a cell that failed) and
must agree. The configuration columns come from the cell schema's declarations
(:mod:`harness.config.axes`): a field with a record column of its own fills it here, an axis
without one reaches the generic ``axes`` column (:func:`harness.config.axes.record_axes`), and
the columns that mirror a method setting (``outlier_fraction``) are filled from whichever
method's settings have it (:func:`harness.records.mirrored_settings`): no method is named here.
"""

from __future__ import annotations

import json
import traceback
from typing import Any

from omegaconf import DictConfig, OmegaConf

import harness.config.schema as cell_schema
from harness.config.axes import record_axes
from harness.config.identity import Resolved, cell_id, dtype_overrides
from harness.config.schema import method_settings
from harness.models.loading import guess_family
from harness.provenance import provenance_fields
from harness.quantize.methods import settings_dict
from harness.records import (
    BASELINE_BITS,
    STATUS_FAILED,
    STATUS_OK,
    Record,
    mirrored_settings,
)


def plugins_field() -> str:
    """The ``plugins`` column: the plugins this process loaded (name -> version or file
    digest, ``harness.plugins.loaded()``) as sorted JSON; ``"{}"`` when none (or before the
    plugin loader exists)."""
    try:
        from harness.plugins import loaded
    except ImportError:
        return "{}"
    return json.dumps(loaded(), sort_keys=True)


def base_fields(cfg: DictConfig, resolved: Resolved, with_config: bool = True) -> dict[str, Any]:
    """Identity, configuration, numerics and provenance fields shared by every row of a cell.

    ``with_config=False`` leaves out the config YAML (always a storable string, and the
    slowest field to build): validation builds a trial record of every cell of a sweep.
    """
    quant = quantization_fields(cfg)
    fields = cell_fields(cfg, resolved, cell_id(cfg, resolved), quant)
    if with_config:
        fields["config"] = OmegaConf.to_yaml(cfg, resolve=True)
    return fields


def quantization_fields(cfg: DictConfig) -> dict[str, Any]:
    """The record fields a cell's method and data type determine ("none" at 16 bits).

    Reads only ``bits`` (is it the baseline?), ``method`` and ``dtype``. The columns that
    mirror a method setting take the method's value when its settings have one.
    """
    if cfg.bits == BASELINE_BITS:
        return dict(method="none", dtype="none", dtype_family="none", dtype_overrides="{}",
                    method_settings="{}", **mirrored_settings({}))  # fmt: skip
    settings = settings_dict(method_settings(cfg)) or {}
    return dict(
        method=str(cfg.method.name), dtype=str(cfg.dtype.name),
        dtype_family=str(cfg.dtype.family),
        dtype_overrides=json.dumps(dtype_overrides(cfg), sort_keys=True),
        method_settings=json.dumps(settings, sort_keys=True), **mirrored_settings(settings),
    )  # fmt: skip


def cell_fields(
    cell: Any, resolved: Resolved, cid: str, quant: dict[str, Any], data_digest: str | None = None,
    provenance: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """:func:`base_fields` without the config YAML, from the cell id and
    :func:`quantization_fields`. ``cell``: the config, or the same as plain data
    (``OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)``: item access only).
    ``data_digest``, ``provenance``: already computed (else computed here)."""
    baseline = cell["bits"] == BASELINE_BITS
    return dict(
        sweep=str(cell["sweep"]), cell_id=cid, model=str(cell["model"]),
        model_family=cell.get("model_family") or guess_family(str(cell["model"])),
        **quant, bits=cell["bits"], block_size=None if baseline else cell["block_size"],
        scale_format=str(cell["scale_format"]), centering=bool(cell["centering"]),
        axes=record_axes(cell_schema.CellConfig, cell, baseline),
        device_class=resolved.device_class, compute_dtype=resolved.compute_dtype,
        data_digest=resolved.data_digest if data_digest is None else data_digest,
        trust_remote_code=bool(cell["trust_remote_code"]), seed=cell["seed"], config="",
        plugins=plugins_field(),
        **(provenance_fields() if provenance is None else provenance),
    )  # fmt: skip


def failed_record(cfg: DictConfig, exc: BaseException, wall_s: float, resolved: Resolved) -> Record:
    """The single row a cell writes when it fails after validation."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
    return Record(**base_fields(cfg, resolved), status=STATUS_FAILED,
                  error=f"{type(exc).__name__}: {exc}\n{tb}", wall_s=wall_s)  # fmt: skip


def cell_outcome(records: list[Record]) -> str:
    """``failed`` when any row failed (a half-trustworthy cell is not ok), else ``ok``."""
    return STATUS_FAILED if any(r.status != STATUS_OK for r in records) else STATUS_OK
