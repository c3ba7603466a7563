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
``__post_init__``) and ``@register_method("<name>", Settings)`` on a function
``(model, request) -> QuantizeReport``; plus ``conf/method/<name>.yaml`` and its tests.
Add the module to :data:`BUILTIN_METHOD_MODULES` (or import it before composing).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harness.names import unknown_name

BUILTIN_METHOD_MODULES = (
    "harness.quantize.methods.blockwise",
    "harness.quantize.methods.proxy",
    "harness.quantize.methods.gptq",
    "harness.quantize.methods.hqq",
)


@dataclass
class QuantRequest:
    """Everything a method needs besides the model: the data type, the layout, its settings."""

    dtype: str
    bits: int
    block_size: int | None
    scale_format: str = "fp16"
    centering: bool = False
    dtype_overrides: dict[str, Any] = field(default_factory=dict)
    quantize_embeddings: bool = False
    quantize_head: bool = False
    settings: Any = None  # the method's settings dataclass instance
    calibration: torch.Tensor | None = None  # (n_samples, seqlen) token ids, when needed
    progress: bool = True


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its settings schema and the function that applies it."""

    name: str
    settings: type
    apply: Callable[[nn.Module, QuantRequest], Any]
    needs_calibration: bool = False
    validate: Callable[[Any, QuantRequest], None] | None = None  # extra (settings, request) rules


_METHODS: dict[str, MethodEntry] = {}


def register_method(
    name: str,
    settings: type,
    *,
    needs_calibration: bool = False,
    validate: Callable[[Any, QuantRequest], None] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn(model, request) -> QuantizeReport`` as method ``name``.

    ``settings`` is a dataclass whose ``name`` field defaults to ``name``; ``validate`` checks a
    (settings, request) pair before any model loads (e.g. the data types a method supports).
    """
    names = {f.name: f for f in dataclasses.fields(settings)}
    if "name" not in names or names["name"].default != name:
        raise ValueError(f"method {name!r}: its settings need a field name = {name!r}")

    def wrap(fn: Callable) -> Callable:
        if name in _METHODS and _METHODS[name].apply is not fn:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = MethodEntry(name, settings, fn, needs_calibration, validate)
        return fn

    return wrap


def check_rounding(settings: Any, request: QuantRequest) -> None:
    """Refuse, before any model loads, what kbit's block-wise rounding refuses for ``request``.

    Why a probe rather than a list of rules: the rounding kernels are the authority on what
    they accept (a scale format that stores no mean with ``centering``, an element format with
    a codebook that is not its grid, a data-dependent codebook with ``mx``, ...). Running them
    on a small probe tensor laid out in the request's blocks raises exactly their one-line
    refusal now instead of after the model has loaded, and cannot drift from them. Costs about
    a millisecond; a sweep's validator runs it once per distinct quantization.
    """
    del settings  # the rounding does not depend on a method's own settings
    from harness.quantize.blockwise import fake_quantize

    size = request.block_size if request.block_size is not None else 64
    probe = torch.linspace(-1.0, 1.0, min(4 * size, 1 << 16))
    fake_quantize(
        probe, request.dtype, request.bits, request.block_size,
        scale_format=request.scale_format, centering=request.centering,
        **(request.dtype_overrides or {}),
    )  # fmt: skip


def methods() -> dict[str, MethodEntry]:
    """All registered methods by name (the built-in modules imported on first use)."""
    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(module)
    return dict(_METHODS)


def get_method(name: str) -> MethodEntry:
    """The method ``name``, or a one-line error with the closest registered name."""
    known = methods()
    if name not in known:
        raise unknown_name("method", name, known)
    return known[name]


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


def settings_dict(settings: Any) -> dict[str, Any]:
    """A settings instance as plain data without its name (for records and labels)."""
    data = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    data.pop("name", None)
    return {k: (v.value if hasattr(v, "value") else v) for k, v in data.items()}


__all__ = [
    "BUILTIN_METHOD_MODULES",
    "MethodEntry",
    "QuantRequest",
    "check_rounding",
    "get_method",
    "make_settings",
    "methods",
    "register_method",
    "settings_dict",
]
