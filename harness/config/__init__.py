"""The cell's configuration stage: the typed schema and its rules (schema), the cell id (identity), command-line rules (overrides) and one-line refusals (refusals).

The names below are the package's public surface from before it was split into modules; they
are imported on first use (PEP 562), so importing one stage's module never loads the others.
"""

from __future__ import annotations

from harness.reexport import lazy_names

_SCHEMA = "harness.config.schema"
_HOMES = {
    "CELL_BITS": _SCHEMA,
    "CELL_BITS_ALLOWED": _SCHEMA,
    "CELL_FIELDS": _SCHEMA,
    "DEVICES_ALLOWED": _SCHEMA,
    "DEVICE_PATTERN": _SCHEMA,
    "EVAL_FIELDS": _SCHEMA,
    "USER_PATH_FIELDS": _SCHEMA,
    "CellConfig": _SCHEMA,
    "ComputeDtype": _SCHEMA,
    "ConfigError": _SCHEMA,
    "EvalConfig": _SCHEMA,
    "PerplexitySpec": _SCHEMA,
    "ScaleFormat": _SCHEMA,
    "check_bits": _SCHEMA,
    "check_cell": _SCHEMA,
    "check_limit": _SCHEMA,
    "device_problem": _SCHEMA,
    "eval_limit": _SCHEMA,
    "mean_tasks": _SCHEMA,
    "method_settings": _SCHEMA,
    "plain_name": _SCHEMA,
    "register_schema": _SCHEMA,
    "with_user_paths": _SCHEMA,
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_names(__name__, _HOMES)
