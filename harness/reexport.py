"""A package's public names, imported from their modules on first use (PEP 562).

Why: a stage package (``harness.config``, ``harness.models``, ``harness.zoo``, ...) keeps the
public names it had before it was split into modules, and importing one of its modules must
not import the others (checking a ``kbit-zoo`` command line must not wait for transformers).
Each package declares ``{name: module}`` once and installs the two hooks::

    _HOMES = {"load_model": "harness.models.loading", ...}
    __all__ = sorted(_HOMES)
    __getattr__, __dir__ = lazy_names(__name__, _HOMES)

``tests/test_layers.py`` reads the same map: a name imported from the package is an import of
the module the map names.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(
    package: str, homes: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package`` for the names in ``homes``."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(homes[name]), name)

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(homes))

    return __getattr__, __dir__
