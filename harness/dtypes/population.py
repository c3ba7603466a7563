"""The block-normalised values of a tensor: what a data-dependent codebook is fitted to.

Block-wise quantization (``harness.quantize.blockwise``) divides each block of a tensor by
its scale (after subtracting its mean, with ``centering``) and clamps to [-1, 1]; a
``quantile`` codebook is fitted to exactly those values. Both need the same block layout,
block means, scale checks and input checks, so they live here, below the quantizer:
``blockwise`` imports them and re-exports :func:`fit_population`, :class:`BlockNormalised`
and :func:`normalised_values`.

``scale_format`` is a name of the scale-format registry (:mod:`harness.kernels.scale_formats`);
the element-grid formats (``mx``, ``nvfp4``, ``ELEMENT_FORMATS``) quantize in a fixed grid and
have no normalised values to fit to. The rules on the layout alone (:func:`layout_problem`)
are the registry's, so planning (``harness.config.rules``) refuses exactly what this refuses.
"""

from __future__ import annotations

import math

import torch

from harness.kernels import native, scale_formats, torch_ops

SCALE_FORMATS = scale_formats.names()
ELEMENT_FORMATS = scale_formats.element_formats()  # quantized in the element grid, ties to even


def layout_problem(block_size: int | None, scale_format: str, centering: bool) -> str:
    """``""`` if a block layout is one every block-wise operation accepts, else one line.

    No tensor needed: planning asks this before any weight exists.
    """
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0
    ):
        return (
            f"block_size={block_size!r}: must be a positive int (e.g. 64..4096) or None "
            "(one scale per tensor)"
        )
    return scale_formats.format_problem(scale_format) or scale_formats.centering_problem(
        scale_format, centering
    )


def check_inputs(
    x: torch.Tensor, block_size: int | None, scale_format: str, centering: bool
) -> None:
    """A clear ValueError for arguments no block-wise operation accepts."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.numel() == 0:
        raise ValueError(
            f"x: the tensor is empty (shape {tuple(x.shape)}); need at least one element"
        )
    problem = layout_problem(block_size, scale_format, centering)
    if problem:
        raise ValueError(problem)


def refuse_element_format(scale_format: str, what: str) -> None:
    """A clear ValueError if ``scale_format`` is an element-grid format (``what`` needs one):
    the registry's :func:`harness.kernels.scale_formats.codebook_problem`."""
    problem = scale_formats.codebook_problem(scale_format, True)
    if problem:
        raise ValueError(problem.replace("a data-dependent codebook", what, 1))


def layout(numel: int, block_size: int | None) -> tuple[int, int, bool]:
    """(block size, number of full blocks, whether a shorter tail block follows)."""
    size = numel if block_size is None else block_size
    return size, numel // size, numel % size != 0


def blocks(flat: torch.Tensor, block_size: int | None) -> list[torch.Tensor]:
    """[full blocks as (n, B)], then the tail as (1, r) if the size does not divide."""
    size, n_full, tail = layout(flat.numel(), block_size)
    parts = []
    if n_full:
        parts.append(flat[: n_full * size].view(n_full, size))
    if tail:
        parts.append(flat[n_full * size :].view(1, -1))
    return parts


def block_mean(xb: torch.Tensor, scale_format: str, centering: bool) -> torch.Tensor | None:
    """Block means [n, 1] rounded to the scale format, or None without centering.

    Summed in float64 outside any compiled kernel, so the mean (and with it every code) is
    the same whichever path quantizes.
    """
    if not centering:
        return None
    mean = xb.sum(dim=1, keepdim=True, dtype=torch.float64).div_(xb.shape[1]).to(torch.float32)
    return torch_ops.round_to_format(mean, scale_format)


def finite_extremes(t: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def check_stats(
    xb: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor | None, scale_format: str
) -> None:
    """NaN/inf in the tensor, or a scale/mean the format cannot hold -> a clear ValueError.

    The fast test: max and min propagate NaN, so both finite means every entry is.
    """
    if finite_extremes(scale) and (mean is None or finite_extremes(mean)):
        return
    bad = int((~torch.isfinite(xb)).sum())
    if bad:
        raise ValueError(f"x: contains {bad} NaN or inf values; allowed: finite values only")
    absmax = float(xb.abs().max())
    raise ValueError(
        f"scale_format={scale_format!r} cannot hold block absmax {absmax:.6g}; allowed: a wider format (bf16, fp32)"
    )


def flat32(x: torch.Tensor) -> torch.Tensor:
    """``x`` flattened as float32, detached (no copy for a contiguous float32 ``x``)."""
    return x.detach().reshape(-1).to(torch.float32)


def block_parts(x: torch.Tensor, block_size: int | None, scale_format: str, centering: bool):
    """Yield (blocks, means, compile_ok, dynamic_cols) for the full blocks, then the tail.

    The tail (one short block) always runs eagerly: compiling it would specialise a kernel
    for every tail length.
    """
    parts = blocks(flat32(x), block_size)
    for i, xb in enumerate(parts):
        is_tail = block_size is not None and i == len(parts) - 1 and xb.shape[1] != block_size
        yield xb, block_mean(xb, scale_format, centering), not is_tail, block_size is None


def join(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The per-part results flattened into one tensor (no copy for a single part)."""
    flat = [p.reshape(-1) for p in pieces]
    return flat[0] if len(flat) == 1 else torch.cat(flat)


def normalised_values(
    x: torch.Tensor,
    block_size: int | None,
    *,
    scale_format: str = "fp16",
    centering: bool = False,
    compile: bool | None = None,
) -> torch.Tensor:
    """What the codebook sees: per block (x - mean) / scale, clamped to [-1, 1], flattened."""
    check_inputs(x, block_size, scale_format, centering)
    refuse_element_format(scale_format, "normalised values")
    pieces = []
    for xb, mean, compile_ok, dyn in block_parts(x, block_size, scale_format, centering):
        y, scale = torch_ops.run(
            torch_ops.normalise_core,
            xb,
            mean,
            scale_format,
            numel=xb.numel(),
            compile=compile if compile_ok else False,
            dynamic_cols=dyn,
        )
        check_stats(xb, scale, mean, scale_format)
        pieces.append(y)
    return join(pieces)


class BlockNormalised:
    """The block-normalised values of a tensor as a quantile ``Population``, never written out.

    What :func:`normalised_values` would return, element for element (same scales, same
    division, same clamp), but the native kernels recompute each value from the tensor
    in every pass of the histogram select, and a sample reads just its own elements.
    """

    def __init__(self, lib, x: torch.Tensor, block_size: int | None, scale_format: str,
                 centering: bool) -> None:  # fmt: skip
        self.lib, self.flat = lib, flat32(x)
        self.block = self.flat.numel() if block_size is None else block_size
        self.parts = []
        ymax = []
        for xb in blocks(self.flat, block_size):
            mean = block_mean(xb, scale_format, centering)
            scale, row_max = native.block_scales(lib, xb, mean, scale_format)
            check_stats(xb, scale, mean, scale_format)
            self.parts.append((xb, mean, scale))
            ymax.append(row_max)
        self.absmax = float(torch.cat(ymax).max())
        self.scales = torch.cat([p[2].view(-1) for p in self.parts])
        self.means = torch.cat([p[1].view(-1) for p in self.parts]) if centering else None

    def numel(self) -> int:
        return self.flat.numel()

    def histogram(self, buckets: int) -> torch.Tensor:
        return native.fit_histogram(self.lib, self.parts, buckets)

    def select(self, wanted: torch.Tensor, total: int) -> torch.Tensor:
        return native.fit_select(self.lib, self.parts, wanted, total)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        return native.fit_take(self.lib, self.flat, self.means, self.scales, self.block, idx)


def fit_population(
    x: torch.Tensor,
    block_size: int | None,
    *,
    scale_format: str = "fp16",
    centering: bool = False,
    compile: bool | None = None,
):
    """What a data-dependent codebook is fitted to: x's block-normalised values.

    A :class:`BlockNormalised` when the native kernels run and the values reach max |v| = 1
    (a block whose scale rounds up to above its absmax stays below 1; if every block does,
    the codebook divides by their maximum, and the materialised tensor keeps that exact).
    """
    refuse_element_format(scale_format, "a data-dependent codebook")
    lib = torch_ops.native(compile, x)
    if lib is not None:
        pop = BlockNormalised(lib, x, block_size, scale_format, centering)
        if pop.absmax == 1.0:
            return pop
    return normalised_values(
        x, block_size, scale_format=scale_format, centering=centering, compile=compile
    )
