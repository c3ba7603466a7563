"""``hqq``: half-quadratic quantization (Badri & Shaji 2023) through the ``hqq`` library.

Calibration-free: per group of ``block_size`` weights along the input dimension it stores a
scale and a zero point and optimises them (HQQ's proximal solver) instead of taking min/max.
This module only plugs :func:`harness.quantize.hqq.hqq_fake_quantize` into the method registry,
which is the point: a method from a library is one settings class and one function.

What it supports: the ``int`` data type (HQQ's own asymmetric integer grid with a zero point),
bits 2, 3, 4, 5, 6, 8, block sizes that are multiples of 8 (or null: one group per row), with
``centering=false`` (the zero point plays that role). The scale and the zero point are stored in
``scale_format`` (fp16 as HQQ deploys them: its default ``compute_dtype``): HQQ's optimised
values are rounded to it before the weights are dequantized (in float32), so the weights use
exactly what is counted: k bits per weight plus two ``scale_format`` values per block
(``harness.quantize.hqq.hqq_bits``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.kernels.scale_formats import SCALE_FORMATS as REGISTERED_SCALE_FORMATS
from harness.quantize.hqq import HQQ_BITS, hqq_fake_quantize, supported
from harness.quantize.methods.registry import register_method
from harness.quantize.model import (
    QuantizeReport,
    QuantRequest,
    linear_layout,
    new_report,
    pristine_weights,
    selected_modules,
    tensor_entry,
)

DTYPES = ("int",)  # HQQ's grid is its own asymmetric integer grid
# how the scale and zero point are stored (and rounded to before dequantizing): every
# registered scale format whose rounding is a float dtype (a zero point needs a signed float)
_FLOAT_ROUNDINGS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SCALE_DTYPES = {name: _FLOAT_ROUNDINGS[f.rounding] for name, f in REGISTERED_SCALE_FORMATS.items()
                if f.rounding in _FLOAT_ROUNDINGS}  # fmt: skip
SCALE_FORMATS = tuple(SCALE_DTYPES)


@dataclass
class HQQSettings:
    """HQQ's library defaults are used as they are (its optimiser's steps, lp norm, beta)."""

    name: str = "hqq"


def check_request(settings: HQQSettings, request: QuantRequest) -> None:
    """What HQQ can do, refused before any model loads (one line each)."""
    from harness.dtypes import get_spec

    family = get_spec(request.dtype).family
    if family not in DTYPES:
        raise ValueError(f"method=hqq: dtype={request.dtype!r} (family {family!r}); allowed: "
                         "dtype=int (HQQ quantizes to its own asymmetric integer grid)")  # fmt: skip
    if request.bits not in HQQ_BITS or request.bits < 2:
        raise ValueError(f"method=hqq: bits={request.bits}; allowed: "
                         f"{[b for b in HQQ_BITS if b >= 2]}")  # fmt: skip
    if request.block_size is not None and request.block_size % 8:
        raise ValueError(f"method=hqq: block_size={request.block_size}; allowed: a multiple "
                         "of 8, or null (one group per row)")  # fmt: skip
    if request.centering:
        raise ValueError("method=hqq: centering=true; allowed: false (HQQ's zero point "
                         "already offsets each block)")  # fmt: skip
    if request.scale_format not in SCALE_FORMATS:
        raise ValueError(f"method=hqq: scale_format={request.scale_format!r}; allowed: "
                         f"{list(SCALE_FORMATS)} (how its scale and zero point are stored)")  # fmt: skip


@register_method("hqq", HQQSettings, validate=check_request)
def hqq(model: nn.Module, request: QuantRequest) -> QuantizeReport:
    """Every selected weight through HQQ at ``bits`` with groups of ``block_size`` inputs."""
    modules = selected_modules(model, request)
    store = pristine_weights(model, list(modules))
    report = new_report(request, "hqq")
    report.block_offsets = True  # a zero point per block, stored like a centering mean
    with torch.no_grad():
        for name, module in modules.items():
            original = linear_layout(store[name], module).to(module.weight.device)
            rows = kbit_blocks(original, request.block_size)
            problem = supported(request.bits, request.block_size, rows.shape[1], rows.shape[0])
            if problem:
                raise ValueError(f"{name}: {problem}")
            quantized = hqq_fake_quantize(
                rows, request.bits, request.block_size,
                scale_dtype=SCALE_DTYPES[request.scale_format],
            )  # fmt: skip
            linear_layout(module.weight, module).copy_(quantized.reshape(original.shape))
            report.tensors.append(tensor_entry(name, original))
    return report


def kbit_blocks(weight: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """The weight as rows that HQQ's groups (along rows) turn into kbit's blocks.

    kbit's blocks are consecutive ``block_size`` elements of the flattened (out, in) weight, so
    a block may span two rows when ``in`` is not a multiple of it; reshaped to rows of
    ``block_size`` (when it divides the element count), HQQ's groups are exactly those blocks.
    """
    if block_size is None or weight.shape[-1] % block_size == 0:
        return weight
    if weight.numel() % block_size:
        return weight  # ``supported`` names the problem
    return weight.reshape(-1, block_size)
