"""Scale formats, declared once: how each block's scale (and mean) is stored and counted.

Why one table: the formats were listed in six places (the config enum, the population
checks, the bit count, the rounding kernels, the native kernels' ids, HQQ's scale dtypes),
and a seventh format would have had to be added to each. Everything a consumer needs to know
about a format is a field of :class:`ScaleFormatSpec` here; the typed config's
``ScaleFormat`` enum (``harness.config.schema``), the bit count (``harness.bits``), the
rounding (``harness.kernels.torch_ops.round_to_format``), the native kernels' ids
(``harness.kernels.native``), the population checks (``harness.dtypes.population``), GPTQ's
and HQQ's support and the planning rules (``harness.config.rules``) all read it.

Plain data and the standard library only: the kernels may import nothing above torch, numpy
and the standard library (``tests/test_layers.py``), and this sits beside them.

A new format: one entry in :data:`SCALE_FORMATS` (its rounding rule is either an existing
``rounding`` name or a new branch in ``torch_ops.round_to_format``), then
``tests/test_scale_formats.py`` (copy a row of its tables) and docs/dtypes.md.

The rules that depend on the format alone are the ``*_problem`` functions below: each returns
``""`` when the combination is fine, else one line naming the field, the value and what is
allowed. Planning (``harness.config.rules``) raises them before any model loads; the kernels
assert the very same functions at run time, so each rule lives in one place.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleFormatSpec:
    """One scale format: storage cost, rounding rule and what it can hold."""

    name: str
    bits: int  # bits of one stored block scale (and of one block mean with centering)
    # how a scale is rounded to what is stored: "float32" | "float16" | "bfloat16" (a cast),
    # "pow2_up" (a power of two rounded up, so nothing clips), "element" (the element grid)
    rounding: str
    stores_mean: bool  # can store a signed block mean (``centering``)
    # quantizes in the element format's own grid (OCP MX, NVFP4: ties to even, saturating)
    # instead of kbit's normalised nearest-code search; refuses data-dependent codebooks
    element_grid: bool = False
    tensor_scale_bits: int = 0  # a second-level scale stored once per tensor (NVFP4: FP32)
    native_id: int | None = None  # the id native.c knows it by; None = the torch path only
    # the element codebook the format requires, as (dtype entry, bits); None = any grid
    element_dtype: tuple[str, int] | None = None
    summary: str = ""


SCALE_FORMATS: dict[str, ScaleFormatSpec] = {
    spec.name: spec
    for spec in (
        ScaleFormatSpec("fp16", 16, "float16", True, native_id=1,
                        summary="IEEE half-precision absmax (the default)"),
        ScaleFormatSpec("bf16", 16, "bfloat16", True, native_id=2,
                        summary="bfloat16 absmax"),
        ScaleFormatSpec("fp32", 32, "float32", True, native_id=0,
                        summary="float32 absmax"),
        ScaleFormatSpec("e8m0", 8, "pow2_up", False, native_id=3,
                        summary="power of two rounded up so nothing clips (kbit's)"),
        ScaleFormatSpec("mx", 8, "element", False, element_grid=True,
                        summary="OCP MX: E8M0 = 2^(floor(log2 amax) - emax_elem), "
                                "elements saturate"),
        ScaleFormatSpec("nvfp4", 8, "element", False, element_grid=True, tensor_scale_bits=32,
                        element_dtype=("e2m1", 4),
                        summary="NVFP4: an E4M3 scale per block times one FP32 scale per "
                                "tensor"),
    )
}  # fmt: skip


def names() -> tuple[str, ...]:
    """Every scale format, in declaration order (the config enum's order)."""
    return tuple(SCALE_FORMATS)


def element_formats() -> tuple[str, ...]:
    """The formats that quantize in their element grid (``mx``, ``nvfp4``)."""
    return tuple(n for n, s in SCALE_FORMATS.items() if s.element_grid)


def mean_formats() -> tuple[str, ...]:
    """The formats that can store a block mean (what ``centering`` allows)."""
    return tuple(n for n, s in SCALE_FORMATS.items() if s.stores_mean)


def format_problem(scale_format: str) -> str:
    """``""`` for a known format, else the one-line refusal."""
    if scale_format in SCALE_FORMATS:
        return ""
    return f"scale_format={scale_format!r} is unknown; allowed: {list(SCALE_FORMATS)}"


def get(scale_format: str) -> ScaleFormatSpec:
    """The spec of ``scale_format``; ValueError (one line) for an unknown name."""
    problem = format_problem(scale_format)
    if problem:
        raise ValueError(problem)
    return SCALE_FORMATS[scale_format]


def centering_problem(scale_format: str, centering: bool) -> str:
    """``centering`` needs a format that can store a signed block mean."""
    if not centering or format_problem(scale_format) or SCALE_FORMATS[scale_format].stores_mean:
        return ""
    why = (
        "an unsigned power of two cannot store a block mean"
        if SCALE_FORMATS[scale_format].rounding == "pow2_up"
        else "the format stores no block mean"
    )
    return (
        f"centering=True with scale_format={scale_format!r}: {why}; allowed: "
        f"centering=False, or scale_format {', '.join(mean_formats())}"
    )


def codebook_problem(scale_format: str, data_dependent: bool, dtype: str = "") -> str:
    """An element-grid format quantizes in a fixed grid: no data-dependent codebook."""
    if not data_dependent or format_problem(scale_format):
        return ""
    if not SCALE_FORMATS[scale_format].element_grid:
        return ""
    what = f"dtype={dtype!r} (a data-dependent codebook)" if dtype else "a data-dependent codebook"
    return (
        f"scale_format={scale_format!r} with {what}: the format quantizes in a fixed element "
        "grid; allowed: a fixed codebook (float, int entries), or scale_format "
        f"{', '.join(n for n in SCALE_FORMATS if not SCALE_FORMATS[n].element_grid)}"
    )
