"""The cell's configuration stage: the typed schema and its rules (schema), the cell id (identity), command-line rules (overrides) and one-line refusals (refusals).

The names below are the package's public surface from before it was split into modules; they
are imported on first use (PEP 562), so importing one stage's module never loads the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = "harness.config.schema"
__all__ = [
    "CELL_BITS",
    "CELL_BITS_ALLOWED",
    "CELL_FIELDS",
    "DEVICES_ALLOWED",
    "DEVICE_PATTERN",
    "EVAL_FIELDS",
    "USER_PATH_FIELDS",
    "CellConfig",
    "ComputeDtype",
    "ConfigError",
    "EvalConfig",
    "PerplexitySpec",
    "ScaleFormat",
    "check_bits",
    "check_cell",
    "check_limit",
    "device_problem",
    "eval_limit",
    "mean_tasks",
    "method_settings",
    "plain_name",
    "register_schema",
    "with_user_paths",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME), name)
