"""Bit accounting: how many bits a (partly) quantized model occupies, counted one way.

Every figure's x-axis is "total model bits", so it is computed once, here, and stored in each
record (``total_model_bits``, ``bits_per_param``); analysis never re-derives it.

What a scale costs is read from the scale-format registry (:mod:`harness.kernels.scale_formats`:
``bits`` per block scale or mean, ``tensor_scale_bits`` once per tensor, ``stores_mean``), so
a new format is counted without touching this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from harness.kernels.scale_formats import SCALE_FORMATS, centering_problem, format_problem

SCALE_BITS = {name: f.bits for name, f in SCALE_FORMATS.items()}
# Scales stored once per quantized tensor on top of the block scales: NVFP4's FP32 scale.
TENSOR_SCALE_BITS = {name: f.tensor_scale_bits for name, f in SCALE_FORMATS.items()
                     if f.tensor_scale_bits}  # fmt: skip
# scale formats that cannot store a block mean
NO_MEAN_FORMATS = tuple(name for name, f in SCALE_FORMATS.items() if not f.stores_mean)
UNQUANTIZED_BITS = 16  # parameters kept in 16-bit floats (embeddings, norms, biases, outliers)
CODEBOOK_VALUE_BITS = 16  # one stored codebook value (data-dependent types only)


@dataclass(frozen=True)
class QuantizedTensorInfo:
    """One tensor stored in k bits: what its storage cost depends on."""

    n_elements: int  # elements stored in k bits (outliers kept in 16 bit excluded)
    bits: int  # k
    block_size: int | None  # elements per absmax block; None = one scale for the tensor
    codebook_size: int = 0  # values of a per-tensor codebook stored with it (quantile: 2^k)


@dataclass(frozen=True)
class BitCount:
    total_bits: int  # every parameter of the model, in bits
    bits_per_param: float  # total_bits / n_params
    n_params: int  # quantized + unquantized + outlier parameters


def _as_info(entry: QuantizedTensorInfo | tuple) -> QuantizedTensorInfo:
    info = entry if isinstance(entry, QuantizedTensorInfo) else QuantizedTensorInfo(*entry)
    if info.n_elements < 0:
        raise ValueError(f"n_elements={info.n_elements}: must be >= 0")
    if info.bits < 1:
        raise ValueError(f"bits={info.bits}: must be a positive int (k)")
    if info.block_size is not None and info.block_size <= 0:
        raise ValueError(
            f"block_size={info.block_size}: must be a positive int or None (one scale per tensor)"
        )
    return info


def total_model_bits(
    quantized: Iterable[QuantizedTensorInfo | tuple],
    unquantized_params: int,
    *,
    scale_format: str = "fp16",
    centering: bool = False,
    outlier_params: int = 0,
) -> BitCount:
    """Total bits and bits per parameter of a model, by the paper's accounting.

    ``sum_t [ n_t * k_t + blocks_t * s * (2 if centering else 1) + codebook_t * 16 + g ]
    + 16 * (unquantized_params + outlier_params)``, divided by all parameters for bits/param.

    Conventions:

    * ``quantized``: one entry per k-bit tensor, a :class:`QuantizedTensorInfo` or a tuple
      ``(n_elements, bits, block_size[, codebook_size])``. Every parameter must be counted
      exactly once: in an entry, in ``unquantized_params`` or in ``outlier_params``.
    * blocks_t = ceil(n_t / B): the tail block stores a full scale; ``block_size=None`` is
      one scale for the whole tensor.
    * s = scale bits of ``scale_format``: fp16 = bf16 = 16, fp32 = 32, e8m0 = 8, mx = 8
      (the E8M0 shared exponent), nvfp4 = 8 (the E4M3 block scale). With ``centering`` each
      block also stores its mean in the same format (e8m0, mx and nvfp4 cannot).
    * g = per-tensor scale bits: 32 for nvfp4 (its FP32 tensor scale), else 0. MXFP4
      (k = 4, B = 32, mx) is 4.25 bits/param; NVFP4 (k = 4, B = 16) is 4.5 bits/param plus
      32 bits per tensor.
    * ``unquantized_params`` (embeddings, norms, biases, ...) and ``outlier_params``
      (input dimensions kept in 16 bit by proxy quantization, *not* part of any entry's
      ``n_elements``) cost 16 bits each.
    * Codebooks: fixed data types (int, float, dynamic, normal, nf4, ...) are shared constants
      and cost nothing; a data-dependent codebook (quantile) is stored per tensor as
      ``codebook_size`` 16-bit values (pass 2^k). The paper ignores it; it is < 0.01 bit/param
      for any weight matrix above ~0.5M elements at k = 8.
    * Integer codes are counted at exactly k bits (ideal packing), as in the paper.

    Example: one 4096 x 4096 tensor, k = 4, B = 64, fp16 scales: 4 + 16 / 64 = 4.25 bits/param.
    """
    problem = format_problem(scale_format) or centering_problem(scale_format, centering)
    if problem:
        raise ValueError(problem)
    if unquantized_params < 0 or outlier_params < 0:
        raise ValueError(
            f"unquantized_params={unquantized_params}, outlier_params={outlier_params}: must be >= 0"
        )
    spec = SCALE_FORMATS[scale_format]
    per_block = spec.bits * (2 if centering else 1)
    per_tensor = spec.tensor_scale_bits
    total = UNQUANTIZED_BITS * (unquantized_params + outlier_params)
    n_params = unquantized_params + outlier_params
    for entry in quantized:
        info = _as_info(entry)
        if info.n_elements == 0:
            continue
        blocks = 1 if info.block_size is None else math.ceil(info.n_elements / info.block_size)
        total += (
            info.n_elements * info.bits
            + blocks * per_block
            + info.codebook_size * CODEBOOK_VALUE_BITS
            + per_tensor
        )
        n_params += info.n_elements
    if n_params == 0:
        raise ValueError(
            "no parameters: quantized is empty and unquantized_params + outlier_params == 0"
        )
    return BitCount(total_bits=total, bits_per_param=total / n_params, n_params=n_params)
