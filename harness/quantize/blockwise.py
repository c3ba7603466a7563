"""Block-wise absmax quantization of one tensor to a k-bit codebook, and back.

============  ===============================================================================
block_size    meaning
============  ===============================================================================
``B`` (int)   the flattened tensor is cut into blocks of B consecutive elements (the last,
              *tail* block may be shorter); each block has its own absmax scale
``None``      one scale for the whole tensor (per-tensor quantization)
============  ===============================================================================

Per block: (optionally) the block mean is subtracted (``centering``, the mean rounded to the
scale format and stored); the scale is ``max |x|`` rounded to ``scale_format`` (``fp16``
default, ``bf16``, ``fp32``, or ``e8m0``: a power of two, rounded *up* so values never
clip); values are divided by the stored scale, clamped to [-1, 1] and mapped to the nearest
code. Ties go to the lower code (the more negative value). The stored (rounded) scale and
mean are exactly what dequantization uses, so ``dequantize(quantize(x))`` is reproducible
from the codes alone. A scale that rounds to zero (fp16 underflow, all-zero block) zeroes its
block.

Two more scale formats follow published block formats exactly (``ELEMENT_FORMATS``; see
docs/dtypes.md, "MX and NVFP4"). They quantize in the element format's own grid with
round-to-nearest-*even* and saturation, as the OCP MX spec and torchao do, instead of the
normalised search above:

``mx``     OCP MX shared scale X = 2^(floor(log2 amax) - emax_elem) (E8M0), elements
           x / X saturated to +-max_elem and rounded to nearest even. On kbit's normalised
           codebook (max |code| = 1) the stored scale is X * max_elem, so code * scale is
           the element value times X. ``e8m0`` stays kbit's no-clip variant.
``nvfp4``  NVIDIA NVFP4 (torchao's two-level rule): one FP32 tensor scale
           pts = amax(|x|) / (448 * 6), per block s8 = E4M3(clamp(amax_b / 6 / pts, 2^-6,
           448)), elements x * ((1 / pts) / s8) clamped to +-6 and rounded to nearest even
           E2M1. The stored scale is pts * s8 (what an E2M1 value 0..6 multiplies); the
           codebook must be ``e2m1``.

Both run on the torch path (eager or ``torch.compile``); the native C kernels do not
implement them, so on the CPU ``compile=None`` runs torch here. Dequantization runs on all
three paths. Centering and data-dependent codebooks are refused with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.dtypes import check as check_dtype
from harness.dtypes import codebook, is_data_dependent
from harness.dtypes.population import (
    ELEMENT_FORMATS,  # quantized in the element grid, ties to even
    SCALE_FORMATS,
    BlockNormalised,
    block_parts,
    blocks,
    check_inputs,
    check_stats,
    finite_extremes,
    fit_population,
    flat32,
    join,
    layout,
    layout_problem,
    normalised_values,
    refuse_element_format,
)
from harness.kernels import scale_formats, torch_ops

__all__ = [
    "ELEMENT_FORMATS",
    "SCALE_FORMATS",
    "BlockNormalised",
    "QuantizedTensor",
    "dequantize_blockwise",
    "fake_quantize",
    "fit_population",
    "normalised_values",
    "quantize_blockwise",
    "round_to_format",
    "rounding_problem",
]

MAX_CODES = 256  # codes are stored as uint8


@dataclass
class QuantizedTensor:
    """Codes, scales (and means) of one quantized tensor: everything dequantization needs."""

    codes: torch.Tensor  # uint8 [numel]: index into `code` per element (flattened order)
    scales: torch.Tensor  # float32 [n_blocks]: absmax per block, already rounded to scale_format
    means: torch.Tensor | None  # float32 [n_blocks] when centering, rounded likewise; else None
    code: torch.Tensor  # float32 [<= 2^k]: the sorted codebook
    shape: torch.Size  # original shape
    dtype: torch.dtype  # original dtype (dequantize returns it)
    block_size: int | None  # None = one block for the whole tensor
    scale_format: str
    tensor_scale: float | None = None  # nvfp4: the FP32 per-tensor scale pts (in the scales)


round_to_format = torch_ops.round_to_format


def _check_code(code: torch.Tensor) -> torch.Tensor:
    code = code.detach().to(torch.float32).flatten()
    if not 1 <= code.numel() <= MAX_CODES:
        raise ValueError(f"code: {code.numel()} values; allowed: 1..{MAX_CODES} (uint8 codes)")
    if not bool(torch.isfinite(code).all()) or float(code.abs().max()) > 1:
        raise ValueError("code: values must be finite and within [-1, 1]")
    if bool((code[1:] <= code[:-1]).any()):
        raise ValueError("code: values must be strictly increasing (sorted, unique)")
    return code


def rounding_problem(
    dtype: str,
    bits: int,
    block_size: int | None,
    scale_format: str,
    centering: bool,
    overrides: dict[str, Any] | None = None,
    dtype_dir: str | None = None,
) -> str:
    """``""`` if :func:`fake_quantize` accepts this quantization for any finite tensor, else
    the one line it would raise; no tensor needed (planning asks it before any weight exists).

    The same functions the rounding runs, in its order: the block layout and the scale format
    (:func:`harness.dtypes.population.layout_problem`), a data-dependent codebook with an
    element-grid format (:func:`harness.kernels.scale_formats.codebook_problem`), the data
    type's family rules (building its codebook), and an element-grid format's grid
    (:func:`harness.kernels.torch_ops.format_grid`).
    """
    problem = layout_problem(block_size, scale_format, centering)
    if problem:
        return problem
    overrides = dict(overrides or {})
    try:
        data_dependent = is_data_dependent(dtype, dtype_dir)
        problem = scale_formats.codebook_problem(scale_format, data_dependent, dtype)
        if problem or data_dependent:  # a fitted codebook is built (and checked) per tensor
            check_dtype(dtype, bits, dtype_dir, **overrides)
            return problem
        code = _check_code(codebook(dtype, bits, dtype_dir=dtype_dir, **overrides))
        if scale_formats.get(scale_format).element_grid:
            torch_ops.format_grid(code, scale_format)
    except ValueError as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    return ""


def _part_compile(compile: bool | None, compile_ok: bool, part: torch.Tensor) -> bool | None:
    """The tail block never goes through torch.compile (a kernel per tail length) but may
    take the native kernels, which handle any row length."""
    if compile_ok:
        return compile
    return None if compile is None and torch_ops.native(None, part) is not None else False


def _out_parts(
    out: torch.Tensor | None, x: torch.Tensor, dtype: torch.dtype, block_size: int | None, name: str
) -> list[torch.Tensor | None]:
    """Views of a caller's output buffer matching ``blocks``, or Nones without one.

    The buffer must have x's number of elements and ``dtype``, be contiguous and on x's
    device; writing into it spares allocating (and page-faulting) a fresh result.
    """
    _, n_full, tail = layout(x.numel(), block_size)  # counted: flattening a strided x would copy it
    n_parts = int(n_full > 0) + int(tail)
    if out is None:
        return [None] * n_parts
    if (
        not isinstance(out, torch.Tensor)
        or out.numel() != x.numel()
        or out.dtype != dtype
        or out.device != x.device
        or not out.is_contiguous()
    ):
        got = (
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
            f"{'' if out.is_contiguous() else ', not contiguous'}"
            if isinstance(out, torch.Tensor)
            else type(out).__name__
        )
        raise ValueError(
            f"{name}: got {got}; allowed: a contiguous {dtype} tensor of {x.numel()} elements on {x.device}"
        )
    return blocks(out.view(-1), block_size)


def quantize_blockwise(
    x: torch.Tensor,
    code: torch.Tensor,
    block_size: int | None,
    *,
    scale_format: str = "fp16",
    centering: bool = False,
    compile: bool | None = None,
    out: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` to indices into the sorted codebook ``code`` (see the module docstring).

    ``compile``: which implementation runs. None (default): the native CPU kernels for CPU
    tensors (see ``harness/kernels/native.py``), else ``torch.compile`` for tensors of at least 2^20
    elements (or as ``$KBIT_COMPILE`` says); True: ``torch.compile``; False: eager torch.
    Results are bit-identical whichever runs. ``out``: a uint8 buffer of ``x.numel()``
    elements to hold the codes (saves an allocation when quantizing many tensors).
    """
    check_inputs(x, block_size, scale_format, centering)
    code = _check_code(code).to(x.device)
    if scale_format in ELEMENT_FORMATS:
        return _quantize_elements(x, code, block_size, scale_format, compile, out)
    lut = torch_ops.build_lut(code)
    outs = _out_parts(out, x, torch.uint8, block_size, "out")
    codes, scales, means = [], [], []
    for (xb, mean, compile_ok, dyn), o in zip(
        block_parts(x, block_size, scale_format, centering), outs, strict=True
    ):
        c, scale = torch_ops.quantize_blocks(
            xb,
            mean,
            code,
            lut,
            scale_format,
            compile=_part_compile(compile, compile_ok, xb),
            dynamic_cols=dyn,
            out=o,
        )
        check_stats(xb, scale, mean, scale_format)
        codes.append(c)
        scales.append(scale)
        means.append(mean)
    return QuantizedTensor(
        codes=join(codes) if out is None else out.view(-1),
        scales=join(scales),
        means=join(means) if centering else None,
        code=code,
        shape=x.shape,
        dtype=x.dtype,
        block_size=block_size,
        scale_format=scale_format,
    )


def dequantize_blockwise(
    q: QuantizedTensor, *, compile: bool | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``code[codes] * scale (+ mean)`` per block, in the original shape and dtype.

    ``compile`` as in :func:`quantize_blockwise`. ``out``: a contiguous tensor of the
    original dtype and number of elements to write into (returned, viewed as the shape).
    """
    code, all_scales = q.code.to(q.codes.device), q.scales
    if q.scale_format in ELEMENT_FORMATS:  # grid value * grid scale, as quantized
        g = torch_ops.element_grid(code)
        code = g.grid if q.scale_format == "mx" else g.grid * 0.5
        all_scales = q.scales / g.n_max if q.scale_format == "mx" else q.scales
    direct = out is not None and q.dtype == torch.float32
    outs = _out_parts(out, q.codes, q.dtype, q.block_size, "out")
    pieces, block = [], 0
    for i, cb in enumerate(parts := blocks(q.codes, q.block_size)):
        rows = slice(block, block + cb.shape[0])
        scale = all_scales[rows].view(-1, 1)
        mean = None if q.means is None else q.means[rows].view(-1, 1)
        is_tail = q.block_size is not None and i == len(parts) - 1 and cb.shape[1] != q.block_size
        pieces.append(
            torch_ops.dequantize_blocks(
                cb,
                scale,
                mean,
                code,
                compile=_part_compile(compile, not is_tail, cb),
                dynamic_cols=q.block_size is None,
                out=outs[i] if direct else None,
            )
        )
        block += cb.shape[0]
    if direct:
        return out.view(q.shape)
    result = join(pieces).view(q.shape).to(q.dtype)
    return result if out is None else out.view(q.shape).copy_(result)


def fake_quantize(
    x: torch.Tensor,
    dtype: str,
    bits: int,
    block_size: int | None,
    *,
    scale_format: str = "fp16",
    centering: bool = False,
    compile: bool | None = None,
    dtype_dir: str | None = None,
    out: torch.Tensor | None = None,
    **overrides: Any,
) -> torch.Tensor:
    """Quantize ``x`` with data type ``dtype`` at k = ``bits`` and dequantize it again.

    Same shape and dtype as ``x``; equal to ``dequantize_blockwise(quantize_blockwise(...))``
    but fused into one pass. Data-dependent types (``quantile``) fit their codebook to the
    block-normalised values of ``x`` itself. ``overrides`` go to the data type entry.
    ``compile`` as in :func:`quantize_blockwise`; ``out``: a contiguous tensor of x's dtype
    and number of elements to write the result into (returned, viewed as x's shape).
    """
    check_inputs(x, block_size, scale_format, centering)
    direct = out is not None and x.dtype == torch.float32
    outs = _out_parts(out, x, x.dtype, block_size, "out")
    fitted = None
    if is_data_dependent(dtype, dtype_dir):
        refuse_element_format(scale_format, "a data-dependent codebook")
        fitted = fit_population(
            x, block_size, scale_format=scale_format, centering=centering, compile=compile
        )
    code = codebook(dtype, bits, fitted, dtype_dir=dtype_dir, **overrides).to(x.device)
    del fitted
    if scale_format in ELEMENT_FORMATS:
        result = join(_element_pieces(x, code, block_size, scale_format, compile, fake=True)[0])
        result = result.view(x.shape).to(x.dtype)
        _out_parts(out, x, x.dtype, block_size, "out")  # checks the buffer
        return result if out is None else out.view(x.shape).copy_(result)
    lut = torch_ops.build_lut(code)
    pieces = []
    for (xb, mean, compile_ok, dyn), o in zip(
        block_parts(x, block_size, scale_format, centering), outs, strict=True
    ):
        result, scale = torch_ops.fake_blocks(
            xb,
            mean,
            code,
            lut,
            scale_format,
            compile=_part_compile(compile, compile_ok, xb),
            dynamic_cols=dyn,
            out=o if direct else None,
        )
        check_stats(xb, scale, mean, scale_format)
        pieces.append(result)
    if direct:
        return out.view(x.shape)
    result = join(pieces).view(x.shape).to(x.dtype)
    return result if out is None else out.view(x.shape).copy_(result)


def _element_pieces(
    x: torch.Tensor,
    code: torch.Tensor,
    block_size: int | None,
    scale_format: str,
    compile: bool | None,
    *,
    fake: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], float | None]:
    """(codes or dequantized values per part, stored scales per part, nvfp4 tensor scale)."""
    g = torch_ops.format_grid(code, scale_format)
    if scale_format == "nvfp4":
        pts = torch_ops.nvfp4_tensor_scale(flat32(x)).view(1, 1)
        if not finite_extremes(pts):
            check_stats(flat32(x).view(1, -1), pts, None, scale_format)
        # An all-zero tensor: torchao divides 0 by 0 (NaN); kbit keeps it zero.
        pts = torch.where(pts > 0, pts, torch.ones_like(pts))
    else:
        pts = None
    values, scales = [], []
    for xb, _, compile_ok, dyn in block_parts(x, block_size, scale_format, False):
        result, gs = torch_ops.element_blocks(
            xb, g, scale_format, pts, fake=fake, compile=compile if compile_ok else False,
            dynamic_cols=dyn,
        )  # fmt: skip
        check_stats(xb, gs, None, scale_format)
        values.append(result)
        scales.append(gs * g.n_max if scale_format == "mx" else gs)
    return values, scales, None if pts is None else float(pts)


def _quantize_elements(
    x: torch.Tensor,
    code: torch.Tensor,
    block_size: int | None,
    scale_format: str,
    compile: bool | None,
    out: torch.Tensor | None,
) -> QuantizedTensor:
    """quantize_blockwise for the element-grid formats (mx, nvfp4)."""
    _out_parts(out, x, torch.uint8, block_size, "out")  # checks the buffer
    codes, scales, pts = _element_pieces(x, code, block_size, scale_format, compile, fake=False)
    flat = join(codes)
    return QuantizedTensor(
        codes=flat if out is None else out.view(-1).copy_(flat),
        scales=join(scales),
        means=None,
        code=code,
        shape=x.shape,
        dtype=x.dtype,
        block_size=block_size,
        scale_format=scale_format,
        tensor_scale=pts,
    )
