"""Models: where a model's files are (files), how it loads (loading), where its layers go (placement) and how many tokens it was trained on (training_tokens).

The names below are the package's public surface from before it was split into modules; they
are imported on first use (PEP 562), so importing one stage's module never loads the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = "harness.models.loading"
__all__ = [
    "PROXY_PAIRS",
    "CheckpointMismatch",
    "LoadedModel",
    "check_loading_info",
    "count_params",
    "decoder_layers",
    "embedding_modules",
    "guess_family",
    "is_conv1d",
    "linear_weight",
    "load_model",
    "proxy_pairs",
    "quantizable_modules",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME), name)
