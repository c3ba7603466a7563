"""One cell, end to end: ``kbit-run`` (execute: load, quantize, write, entry point), its checks
(validate), its record fields (record), its measurements (measure), its results table (report).

The names below are the package's public surface from before it was split into modules; they
are imported on first use (PEP 562), so importing one stage's module never loads the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = "harness.run.execute"
# names whose home is another module of the package (the rest live in execute)
_HOMES = {
    "CellValidator": "harness.run.validate",
    "ValidateCell": "harness.run.validate",
    "quant_request": "harness.run.validate",
    "validate_cell": "harness.run.validate",
    "base_fields": "harness.run.record",
    "cell_fields": "harness.run.record",
    "cell_outcome": "harness.run.record",
    "failed_record": "harness.run.record",
    "quantization_fields": "harness.run.record",
    "perplexity_limit": "harness.run.measure",
}
__all__ = [
    "CellValidator",
    "CellWriteError",
    "ModelCache",
    "ValidateCell",
    "base_fields",
    "cell_fields",
    "cell_outcome",
    "failed_record",
    "load_command_line_plugins",
    "main",
    "perplexity_limit",
    "prepare_command_line",
    "quant_request",
    "quantization_fields",
    "record_cell",
    "run_and_record",
    "run_cell",
    "validate_cell",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES.get(name, _HOME)), name)
