"""Sweeps: the planning sweeper (plan) and ``kbit-status`` (status).

The names below are the package's public surface from before it was split into modules; they
are imported on first use (PEP 562), so importing one stage's module never loads the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = "harness.sweep.plan"
__all__ = [
    "DEFAULT_MAX_CELLS",
    "MAX_PROBLEMS_SHOWN",
    "PROBLEMS_IN_LINE",
    "SWEEPER_KEYS",
    "Cell",
    "CellComposer",
    "KbitSweeper",
    "SweepError",
    "SweepPlan",
    "check_sweeper_settings",
    "copy_config",
    "expand_grid",
    "expand_grid_order",
    "expand_union",
    "launch_target",
    "manifest_unless_refused",
    "one_line",
    "pinned_numerics",
    "plan_sweep",
    "raise_on_problems",
    "read_statuses",
    "report_outcome",
    "results_dir_problem",
    "setting_source",
    "write_manifest",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME), name)
