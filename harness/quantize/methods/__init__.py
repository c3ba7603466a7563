"""The method registry: how the selected weights of a model become k-bit values.

*Methods are registered functions, their settings are data*: a method is one module here with a
settings dataclass (its own schema: Hydra checks ``conf/method/<name>.yaml`` and every
``method.<key>=`` override against it when it composes) and one function decorated with
:func:`register_method`. The runner looks the name up once; nothing else branches on it.

==============  =====================================================================
blockwise       round to nearest: kbit's block-wise absmax quantizer on every weight
proxy           block-wise, keeping the top outlier input dimensions of MLP pairs in 16 bit
gptq            GPTQ with kbit's block-wise rounding for any data type (needs calibration)
hqq             HQQ through the ``hqq`` library (int data type, calibration-free)
==============  =====================================================================

A new method: ``harness/quantize/methods/<name>.py`` with a settings dataclass (a ``name``
field equal to the method name, defaults for everything else, value rules in
``__post_init__``) and ``@register_method("<name>", Settings, needs_calibration=...,
validate=...)`` (from :mod:`harness.quantize.methods.registry`) on a function
``(model, request) -> QuantizeReport``; plus ``conf/method/<name>.yaml`` and its tests.
Add the module to :data:`BUILTIN_METHOD_MODULES` (or register it from a plugin).

What a method declares is asked of the registry, never of its name: :func:`needs_calibration`
(the runner and the job packer), its ``validate`` rules (planning: ``harness.config.rules``),
its settings (records: ``QuantizeReport.settings``). Imports run one way: ``registry`` and
``harness.quantize.model`` <- each method module <- this package (which imports the built-in
modules by name and holds :func:`quantize_model`).
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from typing import Any

import torch
from torch import nn

from harness.names import unknown_name
from harness.quantize.methods.registry import (
    MethodEntry,
    check_rounding,
    register_method,
    registered,
)
from harness.quantize.model import (
    QuantizeReport,
    QuantRequest,
    check_finite,
    restore_model,
    settings_dict,
)

BUILTIN_METHOD_MODULES = (
    "harness.quantize.methods.blockwise",
    "harness.quantize.methods.proxy",
    "harness.quantize.methods.gptq",
    "harness.quantize.methods.hqq",
)


def methods() -> dict[str, MethodEntry]:
    """All registered methods by name (the built-in modules imported on first use)."""
    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(module)
    return registered()


def get_method(name: str) -> MethodEntry:
    """The method ``name``, or a one-line error with the closest registered name."""
    known = methods()
    if name not in known:
        raise unknown_name("method", name, known)
    return known[name]


def needs_calibration(name: str) -> bool:
    """Whether method ``name`` reads calibration token ids (its registered declaration).

    The runner prepares the calibration set only then, and the job packer
    (``harness.cluster.packing``) keeps it with the job only then: neither compares names.
    """
    return get_method(name).needs_calibration


def make_settings(name: str, values: dict[str, Any] | None = None) -> Any:
    """The settings dataclass of method ``name`` from plain values (its rules applied)."""
    entry = get_method(name)
    fields = {f.name for f in dataclasses.fields(entry.settings)}
    values = dict(values or {})
    values.setdefault("name", name)
    for key in values:
        if key not in fields:
            raise unknown_name(f"method {name!r} setting", key, sorted(fields))
    return entry.settings(**values)


def check_request(request: QuantRequest) -> None:
    """The method's own rules for ``request`` (its ``validate``), raising a one-line ValueError.

    Asked at planning (``harness.config.rules``) and again by :func:`quantize_model`.
    """
    entry = get_method(request.settings.name)
    if entry.validate is not None:
        entry.validate(request.settings, request)


def quantize_model(
    model: nn.Module,
    dtype: str,
    bits: int,
    block_size: int | None,
    *,
    scale_format: str = "fp16",
    centering: bool = False,
    method: str = "blockwise",
    settings: Any = None,
    outlier_fraction: float | None = None,
    quantize_embeddings: bool = False,
    quantize_head: bool = False,
    dtype_overrides: dict[str, Any] | None = None,
    calibration: torch.Tensor | None = None,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize every selected weight in place with ``method``, from the pristine copies.

    ``settings``: the method's settings (its dataclass, or a dict of its fields; None = its
    defaults). ``outlier_fraction`` is kept as a shorthand for ``method="proxy"``'s setting.
    ``calibration``: (n_samples, seqlen) token ids for methods that need them (gptq).
    ``dtype_overrides`` go to the data type entry (e.g. ``exponent_bits``).
    """
    entry = get_method(method)
    if settings is None or isinstance(settings, dict):
        values = dict(settings or {})
        if outlier_fraction is not None:
            values["outlier_fraction"] = outlier_fraction
        settings = make_settings(method, values)
    if entry.needs_calibration and calibration is None:
        raise ValueError(f"method={method!r} needs calibration token ids; none given")
    request = QuantRequest(
        dtype=dtype,
        bits=bits,
        block_size=block_size,
        scale_format=scale_format,
        centering=centering,
        dtype_overrides=dict(dtype_overrides or {}),
        quantize_embeddings=quantize_embeddings,
        quantize_head=quantize_head,
        settings=settings,
        calibration=calibration,
        progress=progress,
    )
    check_request(request)
    start = time.perf_counter()
    restore_model(model)  # weights outside this config's selection go back to pristine
    report = entry.apply(model, request)
    report.quantize_s = time.perf_counter() - start
    check_finite(model, [t.name for t in report.tensors])
    return report


__all__ = [
    "BUILTIN_METHOD_MODULES",
    "MethodEntry",
    "QuantRequest",
    "check_request",
    "check_rounding",
    "get_method",
    "make_settings",
    "methods",
    "needs_calibration",
    "quantize_model",
    "register_method",
    "settings_dict",
]
