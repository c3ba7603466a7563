"""Where methods are registered: the table of methods and the decorator that fills it.

Why a module of its own: each method module (``blockwise``, ``proxy``, ``gptq``, ``hqq``, a
plugin's) imports :func:`register_method` from here, and the package (``harness.quantize.
methods``) imports the built-in method modules to fill the table; with the table in the package
itself, the package and its method modules would import each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from harness.quantize.blockwise import rounding_problem
from harness.quantize.model import QuantRequest


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its settings schema, the function that applies it, and what it
    declares about itself (the planner, the packer and the runner ask these, never its name).

    * ``needs_calibration``: the method reads calibration token ids (``request.calibration``);
      the runner prepares them and the packer keeps the calibration set with the job.
    * ``validate``: the method's own (settings, request) rules, raising a one-line ValueError;
      asked at planning (``harness.config.rules``) and again before the method runs.
    """

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


def registered() -> dict[str, MethodEntry]:
    """The methods registered so far (``harness.quantize.methods.methods`` first imports the
    built-in ones)."""
    return dict(_METHODS)


def check_rounding(settings: Any, request: QuantRequest) -> None:
    """Refuse, before any model loads, what kbit's block-wise rounding refuses for ``request``.

    The rules are :func:`harness.quantize.blockwise.rounding_problem`, the same function the
    rounding asserts when it runs, so planning and running cannot disagree.
    """
    del settings  # the rounding does not depend on a method's own settings
    problem = rounding_problem(
        request.dtype, request.bits, request.block_size, request.scale_format,
        request.centering, request.dtype_overrides,
    )  # fmt: skip
    if problem:
        raise ValueError(problem)
