"""Quantization: tensor-level block-wise quantizer and model-level application.

``blockwise`` quantizes one tensor (codes + scales, and back); ``model`` applies it to every
quantizable weight of a causal LM from a pristine copy, so one loaded model serves many configs.
"""

from harness.quantize.blockwise import dequantize_blockwise, fake_quantize, quantize_blockwise
from harness.quantize.model import quantize_model, restore_model

__all__ = [
    "dequantize_blockwise",
    "fake_quantize",
    "quantize_blockwise",
    "quantize_model",
    "restore_model",
]
