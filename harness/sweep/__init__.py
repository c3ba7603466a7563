"""Sweeps: expand, compose, plan, the sweeper, the outcome; and ``kbit-status`` (status).

The names below are the package's public surface from before it was split into modules; each
is imported from its module on first use (PEP 562), so importing the package loads none of them.
The flow: :mod:`~harness.sweep.expand` (the grid) -> :mod:`~harness.sweep.compose` (each cell's
config) -> :mod:`~harness.sweep.plan` (validate, deduplicate, resume) -> the launch
(:mod:`~harness.sweep.sweeper`; packed jobs through :mod:`harness.cluster.jobs`) ->
:mod:`~harness.sweep.outcome`. The sweep sits above :mod:`harness.cluster`, which never imports
it (only the ``kbit-download`` command reads a sweep's grid).
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the module that defines it (the stages: errors, expand, compose, plan,
# outcome, sweeper; kbit-status is harness.sweep.status).
_HOMES = {
    "SweepError": "harness.sweep.errors",
    "one_line": "harness.sweep.errors",
    "expand_grid": "harness.sweep.expand",
    "expand_grid_order": "harness.sweep.expand",
    "expand_union": "harness.sweep.expand",
    "CellComposer": "harness.sweep.compose",
    "copy_config": "harness.sweep.compose",
    "MAX_PROBLEMS_SHOWN": "harness.sweep.plan",
    "PROBLEMS_IN_LINE": "harness.sweep.plan",
    "Cell": "harness.sweep.plan",
    "SweepPlan": "harness.sweep.plan",
    "launch_target": "harness.sweep.sweeper",
    "manifest_unless_refused": "harness.sweep.plan",
    "pinned_numerics": "harness.sweep.plan",
    "plan_sweep": "harness.sweep.plan",
    "raise_on_problems": "harness.sweep.plan",
    "read_statuses": "harness.sweep.plan",
    "results_dir_problem": "harness.sweep.plan",
    "write_manifest": "harness.sweep.plan",
    "report_outcome": "harness.sweep.outcome",
    "DEFAULT_MAX_CELLS": "harness.sweep.sweeper",
    "SWEEPER_KEYS": "harness.sweep.sweeper",
    "KbitSweeper": "harness.sweep.sweeper",
    "check_sweeper_settings": "harness.sweep.sweeper",
    "setting_source": "harness.sweep.sweeper",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
