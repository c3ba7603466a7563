"""Quantization: tensor-level block-wise quantizer and model-level application.

``blockwise`` quantizes one tensor (codes + scales, and back); ``model`` holds what every
method shares (the pristine copies of a causal LM's weights, so one loaded model serves many
configs, the request and the report); ``methods`` is the method registry and
:func:`quantize_model`, which applies a registered method.
"""

from harness.quantize.blockwise import dequantize_blockwise, fake_quantize, quantize_blockwise
from harness.quantize.methods import quantize_model
from harness.quantize.model import restore_model

__all__ = [
    "dequantize_blockwise",
    "fake_quantize",
    "quantize_blockwise",
    "quantize_model",
    "restore_model",
]
