"""``proxy``: outlier-dependent quantization through proxy quantization (Dettmers & Zettlemoyer
2022, section 3), found from the weights alone.

The hidden units of layer i whose weight rows have the largest standard deviation (top
``outlier_fraction``) are taken as outlier dimensions; the matching input columns of layer
i + 1 are kept in 16 bit. The other columns are quantized as usual, with the kept columns
zeroed first so the outliers do not inflate the block scales. The layer pairing per family is
:data:`PROXY_PAIRS` here, with the method that is its only reader (the MLP's two matrices;
docs/methods.md says what that covers and what it does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.models.loading import decoder_layers
from harness.quantize.methods.registry import check_rounding, register_method
from harness.quantize.model import (
    QuantizeReport,
    QuantRequest,
    linear_layout,
    new_report,
    pristine_weights,
    quantize_each,
    selected_modules,
)

# Proxy (outlier-dependent) quantization, per model_type: (sources, target) suffixes inside one
# decoder block. The hidden units of layer i are the *outputs* of the source(s); the matching
# *input* dimensions of layer i + 1 (the target) are kept in 16 bit. We pair the MLP's two
# matrices, where the paper's outlier features live and where output unit j of the first matrix
# feeds exactly input dimension j of the second (after an element-wise activation). Attention
# is left unpaired: with fused QKV and per-head layouts the mapping is not one-to-one.
# Llama's hidden unit j is silu(gate_j) * up_j: both sources are ranked together.
PROXY_PAIRS: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "gpt_neox": [(("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h")],
    "gpt2": [(("mlp.c_fc",), "mlp.c_proj")],
    "opt": [(("fc1",), "fc2")],
    "bloom": [(("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h")],
    "llama": [(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")],
    "mistral": [(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")],
    "qwen2": [(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")],
}


@dataclass
class ProxySettings:
    """Proxy quantization's one setting."""

    name: str = "proxy"
    outlier_fraction: float = 0.02  # share of input dimensions kept in 16 bit (the paper: 2%)

    def __post_init__(self) -> None:
        fraction = self.outlier_fraction
        if isinstance(fraction, bool) or not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"method.outlier_fraction={fraction!r}; allowed: 0 < f < 1")


def proxy_pairs(model: nn.Module) -> list[tuple[list[str], str]]:
    """(source module names, target module name) per block for proxy quantization."""
    arch = model.config.model_type
    if arch not in PROXY_PAIRS:
        raise ValueError(
            f"method=proxy: architecture={arch!r} has no layer pairing; allowed: {sorted(PROXY_PAIRS)}"
        )
    prefix, layers = decoder_layers(model)
    modules = dict(model.named_modules())
    pairs = []
    for i in range(len(layers)):
        for sources, target in PROXY_PAIRS[arch]:
            names = [f"{prefix}.{i}.{s}" for s in sources]
            tname = f"{prefix}.{i}.{target}"
            missing = [n for n in [*names, tname] if n not in modules]
            if missing:
                raise ValueError(f"method=proxy: modules {missing} not found in {arch!r}")
            pairs.append((names, tname))
    return pairs


def outlier_columns(sources: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Indices of the top ``fraction`` hidden units by weight-row std (product over sources)."""
    score = torch.ones(sources[0].shape[0], dtype=torch.float64)
    for w in sources:
        score *= w.to(torch.float64).std(dim=1)
    k = min(score.numel(), max(1, round(fraction * score.numel())))
    return torch.topk(score, k).indices.sort().values


@register_method("proxy", ProxySettings, validate=check_rounding)
def proxy(model: nn.Module, request: QuantRequest) -> QuantizeReport:
    """Block-wise, with each pair's target keeping its outlier input columns in 16 bit."""
    modules = selected_modules(model, request)
    all_modules = dict(model.named_modules())
    pairs = proxy_pairs(model)
    sources = [s for src, _ in pairs for s in src]
    store = pristine_weights(model, [*modules, *sources], all_modules)
    keep = {}
    for names, target in pairs:
        if target in modules:
            weights = [linear_layout(store[s], all_modules[s]) for s in names]
            keep[target] = outlier_columns(weights, request.settings.outlier_fraction)
    return quantize_each(model, request, new_report(request, "proxy"), keep)
