"""HQQ (half-quadratic quantization; Badri & Shaji 2023) as a kbit method, through hqq itself.

HQQ is calibration-free: per group it starts from asymmetric min/max integer quantization
(codes 0..2^k-1, a scale and a zero point) and then refines the scale's companion, the zero
point, with a few proximal (half-quadratic) steps that minimise an l_p<1 norm of the weight
error. kbit calls the library rather than re-implementing it so the numbers *are* HQQ's:
:func:`hqq_fake_quantize` returns exactly ``HQQLinear(...).dequantize()`` (hqq 0.2.8.post1,
its own optimizer defaults: ``optimize_weights_proximal_legacy``, lp_norm 0.7, beta 10,
kappa 1.01, 20 iterations; ``round_zero`` only at 4 bits).

Layout: the weight is in ``nn.Linear`` layout (out, in). With ``axis=1`` (HQQ's default and
kbit's block layout) a group is ``group_size`` consecutive elements of one row, i.e. a block
along the input dimension. With ``axis=0`` HQQ reshapes to (group_size, -1), so a group is
``group_size`` elements of one *column*, rows ``r, r + out/group_size, ...`` (strided).

What HQQ stores (0.2.8.post1, ``BaseQuantizeConfig`` defaults ``quant_zero=False``,
``quant_scale=False``; quantizing zero/scale is deprecated in 0.2.8 and ``HQQLinear`` ignores
it): per group one scale and one zero point, both floats in ``compute_dtype`` (the zero point
is *not* an integer after the optimizer, even where ``round_zero`` rounds its start), plus the
codes bit-packed: 1, 2, 4 and 8 bits exactly; 3 bits ten to an int32 (3.2 bits, padded to
ten groups); 5 and 6 bits one per uint8. See :func:`hqq_bits`. The ``hqq`` method passes its
``scale_format`` as ``scale_dtype`` to :func:`hqq_fake_quantize`, so the scale and zero point
the weights are computed with are exactly the fp16/bf16/fp32 values whose bits are counted.

Caveat of the library: its inverse scale is clamped to 2e4 and set to 1 for groups whose
range is below 1e-4, so HQQ is not scale-invariant for weights of magnitude ~1e-4 and below.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

HQQ_VERSION = "0.2.8.post1"
# Quantizer.SUPPORTED_BITS of hqq 0.2.8 minus 1.58 (ternary, not an integer k); all run on CPU.
HQQ_BITS = (1, 2, 3, 4, 5, 6, 8)
GROUP_MULTIPLE = 8  # BaseQuantizeConfig asserts group_size % 8 == 0
# Bit packing splits the first dim of the reshaped codes (the number of groups for axis=1)
# into this many parts; it fails unless that dim divides evenly. 3 bits pads, 5/6/8 do not pack.
_PACK_PARTS = {1: 8, 2: 4, 4: 2}
# Bits one code occupies in HQQ's container (3-bit: 10 codes per int32; 5/6-bit: one uint8).
_CONTAINER_BITS = {1: 1, 2: 2, 3: 32, 4: 4, 5: 8, 6: 8, 8: 8}


def _hqq_api() -> tuple[Any, Any]:
    """Import hqq on first use: it costs ~2 s and nothing else in kbit needs it at import."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    return HQQLinear, BaseQuantizeConfig


def _effective_group(
    group_size: int | None, in_features: int, out_features: int | None, axis: int
) -> int | None:
    """HQQLinear's rule for ``group_size=None``: the whole row (axis=1) or column (axis=0)."""
    if group_size is not None:
        return group_size
    return in_features if axis == 1 else out_features


def supported(
    bits: int,
    group_size: int | None,
    in_features: int,
    out_features: int | None = None,
    *,
    axis: int = 1,
) -> str | None:
    """``None`` if hqq 0.2.8 quantizes this combination on CPU, else a one-line reason.

    Why a check of our own: hqq refuses with bare ``assert`` messages, and some combinations
    (e.g. 4 bits with an odd number of groups) pass its checks and then fail in bit packing
    with an unrelated shape error. Rules, all verified against the installed library:

    * ``bits`` in :data:`HQQ_BITS` (7 is not; 1.58 is left out as it is not an integer k);
    * ``group_size`` a positive multiple of 8, or ``None`` (one group per row for axis=1);
    * axis=1: ``group_size`` divides ``in_features`` (hqq only asks that it divide the number
      of elements, but then groups straddle rows, which is not a kbit block);
    * axis=0: ``out_features`` is given and ``group_size`` divides it;
    * with ``out_features`` given, axis=1 and bits 1/2/4: the number of groups
      ``out * in / group_size`` divisible by 8/4/2, or bit packing fails.
    """
    if axis not in (0, 1):
        return f"hqq: axis={axis!r} unsupported; allowed: [0, 1]"
    if isinstance(bits, bool) or bits not in HQQ_BITS:
        return f"hqq: bits={bits!r} unsupported; allowed: {list(HQQ_BITS)}"
    if in_features <= 0 or (out_features is not None and out_features <= 0):
        return f"hqq: in_features={in_features}, out_features={out_features}: must be positive"
    if axis == 0 and out_features is None:
        return "hqq: axis=0 groups run along the output dimension; out_features is needed"
    if group_size is not None:
        if isinstance(group_size, bool) or group_size <= 0 or group_size % GROUP_MULTIPLE:
            return (
                f"hqq: group_size={group_size!r} unsupported; "
                f"must be a positive multiple of {GROUP_MULTIPLE} or None"
            )
        dim_name, dim = (
            ("in_features", in_features) if axis == 1 else ("out_features", out_features)
        )
        if dim % group_size:
            return f"hqq: group_size={group_size} does not divide {dim_name}={dim} (axis={axis})"
    if axis == 1 and out_features is not None and bits in _PACK_PARTS:
        groups = out_features * in_features // _effective_group(group_size, in_features, None, 1)
        parts = _PACK_PARTS[bits]
        if groups % parts:
            return (
                f"hqq: bits={bits} packs {parts} groups together; "
                f"{groups} groups ({out_features}x{in_features} / {group_size}) is not a multiple"
            )
    return None


def _linear_around(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding a private copy of ``weight``: hqq reads ``linear.weight.data``
    without copying when it is already float32, so the caller's tensor is never exposed."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return linear


def hqq_fake_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    *,
    axis: int = 1,
    compute_dtype: torch.dtype = torch.float32,
    scale_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """HQQ-quantize then dequantize a weight in Linear layout (out, in); same shape and dtype.

    Exactly ``HQQLinear(linear, BaseQuantizeConfig(nbits=bits, group_size=group_size,
    axis=axis), compute_dtype=compute_dtype, device=<weight's device>,
    del_orig=False).dequantize()`` cast back to ``weight.dtype``. ``compute_dtype`` is the
    dtype HQQ keeps scales and zero points in and dequantizes in (HQQLinear's default,
    float16, is what HQQ deploys). ``scale_dtype``: round the scale and zero point to this
    dtype before dequantizing, with the arithmetic still in ``compute_dtype`` -- HQQ's
    stored values for ``compute_dtype=scale_dtype`` bit for bit (hqq casts them with
    ``.to(compute_dtype)``; its optimizer runs in float32 on the CPU whatever the compute
    dtype), without float16 rounding in the dequantization itself. ``None``: as computed.
    The input is not modified. Raises ``ValueError`` with :func:`supported`'s reason for a
    combination hqq cannot do.
    """
    if weight.dim() != 2:
        raise ValueError(f"hqq: weight must be 2-D (out, in); got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    reason = supported(bits, group_size, in_features, out_features, axis=axis)
    if reason is not None:
        raise ValueError(reason)
    hqq_linear_cls, base_config = _hqq_api()
    config = base_config(nbits=bits, group_size=group_size, axis=axis)
    log.debug("hqq %s: nbits=%s group_size=%s axis=%s on %s", tuple(weight.shape), bits,
              group_size, axis, weight.device)  # fmt: skip
    with torch.no_grad():
        layer = hqq_linear_cls(
            _linear_around(weight),
            config,
            compute_dtype=compute_dtype,
            device=str(weight.device),
            del_orig=False,
        )
        if scale_dtype is not None:
            for key in ("scale", "zero"):
                layer.meta[key] = layer.meta[key].to(scale_dtype).to(compute_dtype)
        return layer.dequantize().to(weight.dtype)


def hqq_bits(
    numel: int,
    bits: int,
    group_size: int,
    scale_bits: int = 16,
    zero_bits: int = 16,
    *,
    packed: bool = False,
) -> float:
    """Bits HQQ stores for one tensor of ``numel`` elements quantized in groups (axis=1).

    ``numel * k + ceil(numel / group_size) * (scale_bits + zero_bits)``: each group keeps one
    scale and one zero point as floats in ``compute_dtype`` (16 + 16 for float16/bfloat16,
    HQQ's deployment setting; pass 32 for float32). The zero point costs a full float, not k
    bits: 0.2.8's ``quant_zero``/``quant_scale`` default to False, are deprecated and ignored
    by ``HQQLinear``, and the optimizer leaves the zero point fractional. Example: 4096 x 4096,
    k = 4, group 64, fp16 -> 4 + 32/64 = 4.5 bits per parameter.

    Codes are counted at k bits (ideal packing, kbit's convention for every method).
    ``packed=True`` counts hqq's real containers instead (axis=1 layout): 3-bit codes go ten
    to an int32 per column of the (groups, group_size) code matrix, padded to ten groups;
    5- and 6-bit codes take one uint8 each; 1/2/4/8 bits are exact.
    """
    if numel <= 0 or group_size <= 0:
        raise ValueError(f"numel={numel}, group_size={group_size}: must be positive")
    if bits not in HQQ_BITS:
        raise ValueError(f"hqq: bits={bits!r} unsupported; allowed: {list(HQQ_BITS)}")
    if scale_bits < 0 or zero_bits < 0:
        raise ValueError(f"scale_bits={scale_bits}, zero_bits={zero_bits}: must be >= 0")
    groups = math.ceil(numel / group_size)
    if not packed:
        codes = numel * bits
    elif bits == 3:
        codes = _CONTAINER_BITS[3] * group_size * math.ceil(groups / 10)
    else:
        codes = numel * _CONTAINER_BITS[bits]
    return float(codes + groups * (scale_bits + zero_bits))
