"""``blockwise``: round to nearest with block-wise absmax scales (the paper's main method)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from harness.quantize.methods.registry import check_rounding, register_method
from harness.quantize.model import QuantizeReport, QuantRequest, new_report, quantize_each


@dataclass
class BlockwiseSettings:
    """No settings of its own: the data type, block size and scale format say everything."""

    name: str = "blockwise"


@register_method("blockwise", BlockwiseSettings, validate=check_rounding)
def blockwise(model: nn.Module, request: QuantRequest) -> QuantizeReport:
    """Every selected weight, each value to the nearest code of its block's scaled codebook."""
    return quantize_each(model, request, new_report(request, "blockwise"))
