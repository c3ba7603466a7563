"""Models: where a model's files are (files), what a checkpoint holds (checkpoint), whether its tensors fit config.json (weights), how it loads (loading), where its layers go (placement) and how many tokens it was trained on (training_tokens).

The names below are the package's public surface from before it was split into modules; they
are imported on first use (PEP 562), so importing one stage's module never loads the others.
"""

from __future__ import annotations

from harness.reexport import lazy_names

_LOADING = "harness.models.loading"
# Each public name and the module that defines it. The proxy method's layer pairs moved to the
# method (a layer above this package); the old names still resolve, for old scripts.
_HOMES = {
    "CheckpointMismatch": _LOADING,
    "LoadedModel": _LOADING,
    "check_loading_info": _LOADING,
    "count_params": _LOADING,
    "decoder_layers": _LOADING,
    "embedding_modules": _LOADING,
    "guess_family": _LOADING,
    "is_conv1d": _LOADING,
    "linear_weight": _LOADING,
    "load_model": _LOADING,
    "quantizable_modules": _LOADING,
    "PROXY_PAIRS": "harness.quantize.methods.proxy",
    "proxy_pairs": "harness.quantize.methods.proxy",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_names(__name__, _HOMES)
