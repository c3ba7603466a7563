"""Exact nearest-code search at memory speed: a bit-pattern lookup table plus one compare.

Why not ``torch.searchsorted``: it is ~100x slower than a copy on CPU. Instead, for a sorted
codebook with decision thresholds t_j (midpoints between neighbouring codes), the code of a
normalised value y in [-1, 1] is ``#{j : t_j < y}`` (ties go to the lower code). The float32
bit pattern of |y| is monotone in |y|, so ``bits(|y|) >> shift`` is a bucket index on a
log-spaced grid (fine near zero, 2^-(23-shift) relative width elsewhere). A table gives, per
bucket, the code at the bucket's edge; when each bucket holds at most one threshold, a single
comparison ``y > t[c]`` completes the search exactly. :func:`build_lut` picks the coarsest
grid with that property (and returns ``None`` if none up to 2^21 buckets has it; the caller
then uses ``searchsorted``). Every step is exact IEEE arithmetic (one division, compares,
integer ops), so eager and ``torch.compile`` runs give bit-identical codes.

Why one module: the lookup table, the block-scale rounding and the MX/NVFP4 element grids are
the cores that ``torch.compile`` traces together (each quantize/fake/dequantize core calls the
search and the rounding), and the native kernels reproduce exactly this file; split, the
bit-identity between the three paths would be checked across modules for no reader's gain.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass

import torch

from harness.kernels import native as native_kernels
from harness.kernels import scale_formats

log = logging.getLogger(__name__)

_ONE_BITS = 0x3F800000  # float32 bit pattern of 1.0
_MIN_MANTISSA_BITS, _MAX_MANTISSA_BITS = 7, 13
COMPILE_ENV = "KBIT_COMPILE"  # "0": never compile, "1": always, unset: large tensors only
COMPILE_MIN_NUMEL = 1 << 20


@dataclass(frozen=True)
class Lut:
    """Lookup structures of one codebook (all on the codebook's device)."""

    table: torch.Tensor  # int32 [2 * nbins]: candidate code per signed bucket
    thresholds: torch.Tensor  # float32 [n]: t_0..t_{n-2}, then +inf
    shift: int  # bucket = bits(|y|) >> shift
    nbins: int  # buckets per sign; index = nbins + b (y >= 0) or nbins - 1 - b (y < 0)
    packed: torch.Tensor  # int32 [2 * nbins]: candidate code and in-bucket cut (native path)
    keys16: torch.Tensor | None  # int32 [15]: finite keys padded with INT32_MAX, if n <= 16


def threshold_keys(t: torch.Tensor) -> torch.Tensor:
    """Integer keys that order as the float32 thresholds do (-0.0 and 0.0 share key 0).

    The native kernels compare y with a threshold as integers: cheaper than a float compare
    after a gather, and identical for every non-NaN value.
    """
    bits = t.view(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits).contiguous()


def thresholds(code: torch.Tensor) -> torch.Tensor:
    """Float32 decision thresholds that reproduce exact nearest-code search with ties down.

    The true midpoint is formed in float64 and rounded *down* to float32: for every float32
    y, ``y > round_down(m)`` iff ``y > m``, so the comparison decides exactly as the exact
    midpoint would, and a y exactly on a representable midpoint goes to the lower code.
    """
    c = code.to(torch.float64)
    mid = (c[:-1] + c[1:]) / 2
    t = mid.to(torch.float32)
    t = torch.where(
        t.to(torch.float64) > mid, torch.nextafter(t, torch.full_like(t, -float("inf"))), t
    )
    return torch.cat([t, torch.full((1,), float("inf"), dtype=torch.float32, device=code.device)])


def _edges(nbins: int, shift: int, device: torch.device) -> torch.Tensor:
    """Lower edges of the positive buckets 0..nbins (the last one is an upper sentinel)."""
    b = torch.arange(nbins + 1, dtype=torch.int64, device=device) << shift
    return b.to(torch.int32).view(torch.float32)


def build_lut(code: torch.Tensor) -> Lut | None:
    """The coarsest exact lookup table for ``code``, or None if the codes are too close.

    Cached per codebook (values and device): a sweep quantizes hundreds of weights with
    the same codebook, and building costs about a millisecond.
    """
    values = code.detach().to("cpu", torch.float32).contiguous()
    return _cached_lut(values.numpy().tobytes(), str(code.device))


@functools.lru_cache(maxsize=64)
def _cached_lut(values: bytes, device: str) -> Lut | None:
    code = torch.frombuffer(bytearray(values), dtype=torch.float32).to(device)
    return _build_lut(code)


def _packed(table: torch.Tensor, keys: torch.Tensor, shift: int, nbins: int) -> torch.Tensor:
    """One int32 per bucket for the native kernels: ``(c << 17) | (cut + 1)``.

    In bucket b all magnitudes share their bits above ``shift``, so y's key k (see
    :func:`threshold_keys`) is ``kmin + u`` with u = the low ``shift`` bits of |y| for a
    positive bucket, or of ~|y| for a negative one. Then ``k > K`` (K: the key of the one
    threshold that can fall in the bucket) is ``u > K - kmin``: with cut = K - kmin clamped
    to [-1, 2^shift - 1], the code is ``c + (u > cut)``, one lookup instead of two.
    """
    b = torch.arange(nbins, dtype=torch.int64, device=table.device)
    kmin_pos = b << shift
    kmin_neg = -(((b + 1) << shift) - 1)
    kmin = torch.cat([kmin_neg.flip(0), kmin_pos])
    c = table.long()
    cut = (keys.long()[c] - kmin).clamp(-1, (1 << shift) - 1)
    return ((c << 17) | (cut + 1)).to(torch.int32).contiguous()


def _build_lut(code: torch.Tensor) -> Lut | None:
    t = thresholds(code)
    finite = t[:-1]
    for mbits in range(_MIN_MANTISSA_BITS, _MAX_MANTISSA_BITS + 1):
        shift = 23 - mbits
        nbins = (_ONE_BITS >> shift) + 1
        lo = _edges(nbins, shift, code.device)
        hi = lo[1:]
        lo = lo[:-1]
        # Positive bucket b holds y in [lo, hi); negative bucket b holds y in (-hi, -lo].
        below_lo = torch.searchsorted(finite, lo, side="left")
        in_pos = torch.searchsorted(finite, hi, side="left") - below_lo
        upto_neg_hi = torch.searchsorted(finite, -hi, side="right")
        in_neg = torch.searchsorted(finite, -lo, side="right") - upto_neg_hi
        if int(in_pos.max()) <= 1 and int(in_neg.max()) <= 1:
            table = torch.cat([upto_neg_hi.flip(0), below_lo]).to(torch.int32)
            keys = threshold_keys(t)
            keys16 = None
            if keys.numel() <= 16:  # <= 16 codes: at most 15 finite thresholds
                pad = torch.full((16 - keys.numel(),), 2**31 - 1, dtype=torch.int32)
                keys16 = torch.cat([keys[:-1], pad.to(keys.device)]).contiguous()
            packed = _packed(table, keys, shift, nbins)
            return Lut(table.contiguous(), t, shift, nbins, packed, keys16)
    log.info("codebook too fine for a %d-bit lookup table; using searchsorted", _MAX_MANTISSA_BITS)
    return None


def code_index(
    y: torch.Tensor, table: torch.Tensor, thr: torch.Tensor, shift: int, nbins: int
) -> torch.Tensor:
    """Nearest-code index (int64) of normalised ``y`` (in [-1, 1]) via the lookup table."""
    b = y.abs().view(torch.int32) >> shift
    idx = torch.where(y < 0, nbins - 1 - b, nbins + b).clamp(0, 2 * nbins - 1)
    c = table[idx.long()].long()
    return c + (y > thr[c]).long()


def round_to_format(values: torch.Tensor, scale_format: str) -> torch.Tensor:
    """Round float32 ``values`` to what ``scale_format`` stores (returned as float32).

    The rule is the format's ``rounding`` in :mod:`harness.kernels.scale_formats`.
    """
    rounding = scale_formats.get(scale_format).rounding
    if rounding == "float32":
        return values
    if rounding in _CAST_DTYPES:
        return values.to(_CAST_DTYPES[rounding]).to(torch.float32)
    if rounding == "pow2_up":
        # Power of two >= value: carry a non-zero mantissa into the exponent, drop the mantissa.
        # A NaN stays NaN (the carry would wrap it to 0 and hide it from the NaN check).
        bits = values.abs().view(torch.int32)
        rounded = ((bits + 0x007FFFFF) & 0x7F800000).view(torch.float32)
        return torch.where(torch.isnan(values), values, rounded)
    raise ValueError(
        f"scale_format={scale_format!r} has no block-scale rounding (it quantizes in its element "
        f"grid); allowed: {[n for n, f in scale_formats.SCALE_FORMATS.items() if not f.element_grid]}"
    )


# a scale format's ``rounding`` that is a cast to this torch dtype and back
_CAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def block_scale(centred: torch.Tensor, scale_format: str) -> torch.Tensor:
    """Absmax per row [n, 1], rounded to the scale format (NaN/inf propagate for the caller)."""
    return round_to_format(centred.abs().amax(dim=1, keepdim=True), scale_format)


def normalise(centred: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """centred / scale clamped to [-1, 1]; a zero scale leaves zeros (its block is all zero)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (centred / safe).clamp(-1.0, 1.0)


def normalise_core(
    xb: torch.Tensor, mean: torch.Tensor | None, scale_format: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised values [n, B], scales [n, 1]): what the codebook sees, for fitting it."""
    centred = xb if mean is None else xb - mean
    scale = block_scale(centred, scale_format)
    return normalise(centred, scale), scale


def quantize_core(
    xb: torch.Tensor,
    mean: torch.Tensor | None,
    table: torch.Tensor,
    thr: torch.Tensor,
    shift: int,
    nbins: int,
    scale_format: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``xb`` [n, B] (block means [n, 1] or None) -> (uint8 codes [n, B], scales [n, 1])."""
    centred = xb if mean is None else xb - mean
    scale = block_scale(centred, scale_format)
    codes = code_index(normalise(centred, scale), table, thr, shift, nbins).to(torch.uint8)
    return codes, scale


def fake_core(
    xb: torch.Tensor,
    mean: torch.Tensor | None,
    table: torch.Tensor,
    thr: torch.Tensor,
    shift: int,
    nbins: int,
    scale_format: str,
    code: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize then dequantize in one pass (no code tensor is materialised when compiled)."""
    centred = xb if mean is None else xb - mean
    scale = block_scale(centred, scale_format)
    out = code[code_index(normalise(centred, scale), table, thr, shift, nbins)] * scale
    return (out if mean is None else out + mean), scale


def dequantize_core(
    codes: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor | None, code: torch.Tensor
) -> torch.Tensor:
    """Codes [n, B] -> code[codes] * scale (+ mean), float32 [n, B]."""
    out = code[codes.long()] * scale
    return out if mean is None else out + mean


_COMPILED: dict[str, object] = {}
_BROKEN: set[str] = set()


def _use_compile(numel: int, compile: bool | None) -> bool:
    if compile is not None:
        return compile
    env = os.environ.get(COMPILE_ENV)
    if env is not None:
        return env not in ("0", "false", "False", "")
    return numel >= COMPILE_MIN_NUMEL


def run(fn, *args, numel: int, compile: bool | None = None, dynamic_cols: bool = False):
    """Call ``fn`` through ``torch.compile`` when wanted and working, else eagerly.

    Row counts (and codebook sizes) are compiled as dynamic dimensions, the block size as a
    constant (one specialised kernel per block size; ``dynamic_cols`` for per-tensor
    blocks of any length). Compilation failures (no C++ compiler, no Triton, ...) fall back
    to eager once per kernel with a warning; results do not depend on the path taken.
    """
    name = fn.__name__
    if not _use_compile(numel, compile) or name in _BROKEN:
        return fn(*args)
    if name not in _COMPILED:
        # Without emulate_precision_casts inductor may drop the fp16/bf16 round trip of the
        # scales, and compiled codes would differ from eager ones.
        _COMPILED[name] = torch.compile(
            fn, dynamic=False, options={"emulate_precision_casts": True}
        )
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    if dynamic_cols:
        torch._dynamo.maybe_mark_dynamic(tensors[0], 1)
    try:
        return _COMPILED[name](*args)
    except Exception as exc:  # any backend failure: the eager path computes the same values
        log.warning(
            "torch.compile of %s failed (%s: %s); using eager", name, type(exc).__name__, exc
        )
        _BROKEN.add(name)
        return fn(*args)


def _searchsorted_index(y: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The reference search (#thresholds < y), for codebooks too fine for a lookup table."""
    return torch.searchsorted(thresholds(code)[:-1], y.contiguous(), side="left")


def native(compile: bool | None, *tensors: torch.Tensor | None):
    """The compiled CPU kernels when the caller left the path to us and they can run, else None.

    ``compile=None`` (auto) prefers them on the CPU; ``compile=False`` asks for the eager torch
    reference and ``compile=True`` for ``torch.compile``, so tests can compare all three.
    """
    if compile is not None or not native_kernels.usable(*tensors):
        return None
    return native_kernels.library()


def quantize_blocks(
    xb: torch.Tensor,
    mean: torch.Tensor | None,
    code: torch.Tensor,
    lut: Lut | None,
    scale_format: str,
    *,
    compile: bool | None,
    dynamic_cols: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes [n, B], scales [n, 1]) of blocks ``xb``; written into ``out`` if given."""
    lib = None if lut is None else native(compile, xb, mean, out)
    if lib is not None:
        codes = out if out is not None else torch.empty(xb.shape, dtype=torch.uint8)
        return codes, native_kernels.quantize_rows(lib, xb, mean, lut, scale_format, codes)
    if lut is None:
        centred = xb if mean is None else xb - mean
        scale = block_scale(centred, scale_format)
        codes = _searchsorted_index(normalise(centred, scale), code).to(torch.uint8)
    else:
        args = (xb, mean, lut.table, lut.thresholds, lut.shift, lut.nbins, scale_format)
        codes, scale = run(
            quantize_core, *args, numel=xb.numel(), compile=compile, dynamic_cols=dynamic_cols
        )
    return (codes if out is None else out.copy_(codes)), scale


def fake_blocks(
    xb: torch.Tensor,
    mean: torch.Tensor | None,
    code: torch.Tensor,
    lut: Lut | None,
    scale_format: str,
    *,
    compile: bool | None,
    dynamic_cols: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized float32 [n, B], scales [n, 1]) of blocks ``xb``; into ``out`` if given."""
    lib = None if lut is None else native(compile, xb, mean, out, code)
    if lib is not None:
        result = out if out is not None else torch.empty_like(xb)
        return result, native_kernels.fake_rows(lib, xb, mean, lut, scale_format, code, result)
    if lut is None:
        codes, scale = quantize_blocks(xb, mean, code, None, scale_format, compile=False)
        result = dequantize_core(codes, scale, mean, code)
    else:
        args = (xb, mean, lut.table, lut.thresholds, lut.shift, lut.nbins, scale_format, code)
        result, scale = run(
            fake_core, *args, numel=xb.numel(), compile=compile, dynamic_cols=dynamic_cols
        )
    return (result if out is None else out.copy_(result)), scale


def dequantize_blocks(
    codes: torch.Tensor,
    scale: torch.Tensor,
    mean: torch.Tensor | None,
    code: torch.Tensor,
    *,
    compile: bool | None,
    dynamic_cols: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """code[codes] * scale (+ mean), float32 [n, B]; written into ``out`` if given."""
    lib = native(compile, codes, scale, mean, code, out)
    if lib is not None:
        result = out if out is not None else torch.empty(codes.shape, dtype=torch.float32)
        native_kernels.dequantize_rows(lib, codes, scale, mean, code, result)
        return result
    args = (codes, scale, mean, code)
    result = run(
        dequantize_core, *args, numel=codes.numel(), compile=compile, dynamic_cols=dynamic_cols
    )
    return result if out is None else out.copy_(result)


# ------------------------------------------------------------ element-space formats: MX, NVFP4
# The OCP MX and NVIDIA NVFP4 rules are stated in the element format's own units (E2M1
# values 0, 0.5, ..., 6; scales that are powers of two or E4M3 values) and round to nearest
# with ties to *even*. kbit's normalised search (x / scale, nearest code, ties down) cannot
# reproduce that bit for bit: dividing by 2^e * 6 rounds, and ties go the other way for
# negative values. So these formats quantize in the element grid instead (see ElementGrid)
# and dequantize as grid value * grid scale, both exact float32 operations.

ELEMENT_FORMATS = scale_formats.element_formats()  # mx, nvfp4
NVFP4_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
NVFP4_E4M3_TINY = 2.0**-6  # torch.finfo(torch.float8_e4m3fn).tiny (torchao's E4M3_EPS)
NVFP4_E2M1_MAX = 6.0
_E2M1_GRID = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)  # E2M1 magnitudes in units of 0.5


@dataclass(frozen=True)
class ElementGrid:
    """A codebook as integers of its smallest step: ``code_i = grid_i / n_max``.

    For a float codebook (subnormals included) every value is a whole multiple of the
    smallest positive value u (the subnormal step); the grid is value / u, exact integers
    with at most 8 significant bits, and n_max = max / u. The MX exponent of the largest
    power of two, emax = floor(log2 n_max), is then emax_elem - log2 u: the MX scale
    2^(floor(log2 amax) - emax) in grid units times the grid value is the same number as
    OCP's 2^(floor(log2 amax) - emax_elem) times the element value, whatever u is.
    """

    grid: torch.Tensor  # float32 [n]: sorted signed grid values (exact integers)
    n_max: float  # largest grid value
    emax: int  # floor(log2(n_max))
    inv_p2: float  # 2^-ceil(log2(n_max)): grid / p2 lies in [-1, 1], exactly
    zero: int  # index of the zero code (ties go to the even distance from it)
    lut: Lut  # exact nearest-code table of grid * inv_p2
    unit_exp: int = 0  # log2 u: the grid step in the element's own units (see unit_exponent)


def _round_significant(r: torch.Tensor, bits: int) -> torch.Tensor:
    """float64 r rounded to ``bits`` significant bits (r > 0)."""
    e = torch.floor(torch.log2(r))
    q = torch.exp2(e - (bits - 1))
    return torch.round(r / q) * q


def element_grid(code: torch.Tensor) -> ElementGrid:
    """The grid of a normalised codebook (cached), or ValueError if it has none.

    Codes are float32 roundings of value / max, so value / u is recovered from code /
    min_positive_code by rounding to 8 significant bits (the float32 error is ~2^-23
    relative, far below the gap between 8-bit numbers) and checked: every code must be
    the float32 rounding of grid / n_max, and the grid symmetric with an exact zero.
    """
    values = code.detach().to("cpu", torch.float32).contiguous()
    grid = _cached_grid(values.numpy().tobytes())
    if grid is None:
        raise ValueError(
            "scale_format='mx'/'nvfp4': the codebook is not a float or int grid (every value "
            "a whole multiple of the smallest positive one, symmetric, with an exact 0); "
            "allowed: float entries (e2m1, e3m2, e2m3, fp8_*) and int"
        )
    return grid if code.device.type == "cpu" else _grid_to(grid, code.device)


def _grid_to(g: ElementGrid, device) -> ElementGrid:
    lut = build_lut((g.grid * g.inv_p2).to(device))
    return ElementGrid(g.grid.to(device), g.n_max, g.emax, g.inv_p2, g.zero, lut, g.unit_exp)


def unit_exponent(grid: torch.Tensor) -> int:
    """log2 of the grid step u in element units, by the OCP conventions (0 if neither applies).

    The MX scale's E8M0 clamp acts on X = 2^(floor(log2 amax) - emax_elem) in the element's
    own units, which a normalised codebook does not carry; it is read from the grid's shape:

    * an *int* grid (every integer 1..n_max): MXINT8's fixed point, elements in (-2, 2) with
      emax_elem = 0, so u = 2^-emax (MXINT8: 2^-6);
    * a *float* grid with subnormals (integers 1 .. 2^(M+1), then steps of 2, 4, ...): M
      mantissa bits, top exponent field T = emax - M + 1, E = ceil(log2(T + 1)) exponent bits
      (with or without OCP's reserved inf/NaN codes), bias 2^(E-1) - 1, u = 2^(1 - bias - M)
      (E2M1: 2^-1, E3M2: 2^-4, E2M3: 2^-3, E4M3: 2^-9, E5M2: 2^-16).

    A float entry with a non-default ``bias`` has another u than this; it only matters for
    blocks whose largest value is below about 2^(emax_elem - 127).
    """
    pos = grid[grid > 0].to(torch.float64)
    if pos.numel() == 0 or float(pos[0]) != 1.0:
        return 0
    emax = math.floor(math.log2(float(pos.max())))
    steps = pos[1:] - pos[:-1]
    if bool((steps == 1).all()):
        return -emax
    first = int(torch.nonzero(steps != 1)[0])  # pos[first] is 2^(M + 1) for a float grid
    top = float(pos[first])
    if top < 2 or top != 2.0 ** round(math.log2(top)) or float(steps[first]) != 2.0:
        return 0
    m = round(math.log2(top)) - 1
    e = math.ceil(math.log2(emax - m + 2))
    return 1 - (2 ** (e - 1) - 1) - m


@functools.lru_cache(maxsize=64)
def _cached_grid(values: bytes) -> ElementGrid | None:
    code = torch.frombuffer(bytearray(values), dtype=torch.float32).to(torch.float64)
    pos = code[code > 0]
    if pos.numel() == 0 or int((code == 0).sum()) != 1:
        return None
    grid = torch.zeros_like(code)
    nz = code != 0
    grid[nz] = torch.sign(code[nz]) * _round_significant(code[nz].abs() / pos.min(), 8)
    n_max = float(grid.abs().max())
    if not torch.equal((grid / n_max).to(torch.float32), code.to(torch.float32)):
        return None
    if not torch.equal(grid, -grid.flip(0)) or n_max >= 2**60:
        return None
    emax = math.floor(math.log2(n_max))
    inv_p2 = 2.0 ** -math.ceil(math.log2(n_max))
    grid32 = grid.to(torch.float32)
    lut = build_lut(grid32 * inv_p2)
    if lut is None:
        return None
    zero = int((grid < 0).sum())
    return ElementGrid(grid32, n_max, emax, inv_p2, zero, lut, unit_exponent(grid))


def nvfp4_grid(code: torch.Tensor) -> ElementGrid:
    """The grid of ``code``, which must be E2M1 (NVFP4's element format)."""
    g = element_grid(code)
    if g.grid.numel() != 15 or g.grid[7:].tolist() != list(_E2M1_GRID):
        dtype, bits = scale_formats.get("nvfp4").element_dtype or ("e2m1", 4)
        raise ValueError(
            f"scale_format='nvfp4': the codebook must be FP4 E2M1 (dtype {dtype!r}, bits={bits}); "
            f"got {code.numel()} codes; allowed: dtype={dtype} bits={bits}"
        )
    return g


def grid_index(
    z: torch.Tensor, table, thr, shift: int, nbins: int, zero: int, inv_p2: float
) -> torch.Tensor:
    """Index of the grid value nearest to ``z`` (already within +-n_max), ties to even.

    z * inv_p2 is exact (a power of two), the table search sends a tie to the lower code,
    and a tie whose lower code is an odd distance from zero moves up: for float grids the
    even distance is the even mantissa (IEEE round-to-nearest-even, as torch's float8
    casts and torchao's FP4/FP6 casts round), for int grids the even integer.
    """
    y = z * inv_p2
    c = code_index(y, table, thr, shift, nbins)
    tie = (y == thr[c]) & (((c - zero) & 1) == 1)
    return c + tie.long()


def pow2(n: torch.Tensor) -> torch.Tensor:
    """2^n as float32 for int32 ``n``, exactly, subnormals included (n >= 128 gives inf, n below
    -149 the smallest subnormal 2^-149)."""
    normal = ((n.clamp(-126, 128) + 127) << 23).view(torch.float32)
    sub = (torch.ones_like(n) << (n + 149).clamp(0, 22)).view(torch.float32)
    return torch.where(n >= -126, normal, sub)


def mx_scale(xb: torch.Tensor, emax: int, unit_exp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (divisor, stored scale), both in grid units, float32 [n, 1]: torchao 0.18's rule.

    X = 2^s with s = floor(log2 amax) - emax_elem (amax's float32 exponent field, as torchao
    reads it: -127 for a zero or subnormal amax; emax_elem = emax + unit_exp), s clamped to
    E8M0's range [-127, 128] (128: NaN). The stored scale is X (times u, into grid units);
    elements are x / max(X, 2^-126) -- torchao divides by at least the smallest normal float
    but stores (and dequantizes with) 2^-127, so a block with s = -127 comes back halved, as it
    does in torchao. A NaN or inf amax gives inf (refused by the caller's NaN/inf check).
    """
    amax = xb.abs().amax(dim=1, keepdim=True)
    s = (((amax.view(torch.int32) >> 23) & 0xFF) - 127 - (emax + unit_exp)).clamp(-127, 128)
    bad = ~torch.isfinite(amax)
    inf = torch.full_like(amax, float("inf"))
    stored = torch.where(bad, inf, pow2(s + unit_exp))
    divisor = torch.where(bad, inf, pow2(s.clamp(min=-126) + unit_exp))
    return divisor, stored


def mx_core(xb, table, thr, shift: int, nbins: int, zero: int, inv_p2: float, emax: int,
            n_max: float, unit_exp: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(grid indices int64 [n, B], stored grid scales G [n, 1]): x / divisor saturated, to
    nearest even (see :func:`mx_scale` for the divisor)."""
    divisor, g = mx_scale(xb, emax, unit_exp)
    z = (xb / divisor).clamp(-n_max, n_max)
    return grid_index(z, table, thr, shift, nbins, zero, inv_p2), g


def mx_quantize_core(xb, table, thr, shift, nbins, zero, inv_p2, emax, n_max, unit_exp):
    idx, g = mx_core(xb, table, thr, shift, nbins, zero, inv_p2, emax, n_max, unit_exp)
    return idx.to(torch.uint8), g


def mx_fake_core(xb, table, thr, shift, nbins, zero, inv_p2, emax, n_max, unit_exp, grid):
    idx, g = mx_core(xb, table, thr, shift, nbins, zero, inv_p2, emax, n_max, unit_exp)
    return grid[idx] * g, g


def format_grid(code: torch.Tensor, scale_format: str) -> ElementGrid:
    """The element grid ``scale_format`` quantizes ``code`` in, or ValueError (one line).

    A format that requires one element codebook (NVFP4: E2M1, its ``element_dtype`` in
    :mod:`harness.kernels.scale_formats`) checks for exactly that grid; the others (MX) take
    any float or int grid.
    """
    if scale_formats.get(scale_format).element_dtype is not None:
        return nvfp4_grid(code)
    return element_grid(code)


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """torchao's per_tensor_amax_to_scale: amax(|x|) / (448 * 6), float32 (0-dim)."""
    return x.abs().amax().to(torch.float32) / (NVFP4_E4M3_MAX * NVFP4_E2M1_MAX)


def nvfp4_core(xb, pts, table, thr, shift: int, nbins: int, zero: int, inv_p2: float
               ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(E2M1 grid indices [n, B], block scales T = pts * s8 [n, 1]), torchao's two-level rule.

    s8 = E4M3(clamp(amax / 6 / pts, 2^-6, 448)); elements = x * ((1 / pts) / s8), clamped
    to +-6 and rounded to nearest even (in grid units of 0.5: times 2, exact).
    """
    amax = xb.abs().amax(dim=1, keepdim=True)
    scaled = (amax / NVFP4_E2M1_MAX) / pts
    s8 = scaled.clamp(NVFP4_E4M3_TINY, NVFP4_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    data = (xb * ((1.0 / pts) / s8)).clamp(-NVFP4_E2M1_MAX, NVFP4_E2M1_MAX)
    idx = grid_index(data * 2.0, table, thr, shift, nbins, zero, inv_p2)
    return idx, pts * s8


def nvfp4_quantize_core(xb, pts, table, thr, shift, nbins, zero, inv_p2):
    idx, t = nvfp4_core(xb, pts, table, thr, shift, nbins, zero, inv_p2)
    return idx.to(torch.uint8), t


def nvfp4_fake_core(xb, pts, table, thr, shift, nbins, zero, inv_p2, elem):
    idx, t = nvfp4_core(xb, pts, table, thr, shift, nbins, zero, inv_p2)
    return elem[idx] * t, t


def element_blocks(
    xb: torch.Tensor,
    g: ElementGrid,
    scale_format: str,
    pts: torch.Tensor | None,
    *,
    fake: bool,
    compile: bool | None,
    dynamic_cols: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MX / NVFP4 blocks: (codes uint8 or dequantized float32 [n, B], grid scales [n, 1]).

    The grid scale multiplies the grid value (mx: G; nvfp4: T = pts * s8, which multiplies
    the E2M1 value = grid / 2). Torch only (eager or compiled): the native C kernels do
    not implement these formats, so ``compile=None`` takes the torch path on the CPU too.
    """
    lut = g.lut
    search = (lut.table, lut.thresholds, lut.shift, lut.nbins, g.zero, g.inv_p2)
    if scale_format == "mx":
        args = (xb, *search, g.emax, g.n_max, g.unit_exp)
        fn = mx_fake_core if fake else mx_quantize_core
        if fake:
            args = (*args, g.grid)
    else:
        args = (xb, pts, *search)
        fn = nvfp4_fake_core if fake else nvfp4_quantize_core
        if fake:
            args = (*args, g.grid * 0.5)
    return run(fn, *args, numel=xb.numel(), compile=compile, dynamic_cols=dynamic_cols)
