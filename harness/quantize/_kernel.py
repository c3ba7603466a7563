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
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

from harness.quantize import _native

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
    """Round float32 ``values`` to what ``scale_format`` stores (returned as float32)."""
    if scale_format == "fp32":
        return values
    if scale_format == "fp16":
        return values.to(torch.float16).to(torch.float32)
    if scale_format == "bf16":
        return values.to(torch.bfloat16).to(torch.float32)
    if scale_format == "e8m0":
        # Power of two >= value: carry a non-zero mantissa into the exponent, drop the mantissa.
        # A NaN stays NaN (the carry would wrap it to 0 and hide it from the NaN check).
        bits = values.abs().view(torch.int32)
        rounded = ((bits + 0x007FFFFF) & 0x7F800000).view(torch.float32)
        return torch.where(torch.isnan(values), values, rounded)
    raise ValueError(f"scale_format={scale_format!r} is unknown; allowed: fp16, bf16, fp32, e8m0")


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
    if compile is not None or not _native.usable(*tensors):
        return None
    return _native.library()


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
        return codes, _native.quantize_rows(lib, xb, mean, lut, scale_format, codes)
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
        return result, _native.fake_rows(lib, xb, mean, lut, scale_format, code, result)
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
        _native.dequantize_rows(lib, codes, scale, mean, code, result)
        return result
    args = (codes, scale, mean, code)
    result = run(
        dequantize_core, *args, numel=codes.numel(), compile=compile, dynamic_cols=dynamic_cols
    )
    return result if out is None else out.copy_(result)
