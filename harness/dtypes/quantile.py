"""``quantile``: a codebook fitted to the tensor's own distribution (equal-mass bins).

With Q the empirical quantile function (linear interpolation between order statistics, as
``torch.quantile``) of ``tensor / max|tensor|`` and n = 2^k, the codes are
``q_i = (Q(i / (n + 1)) + Q((i + 1) / (n + 1))) / 2`` (the SRAM-quantiles definition of
Dettmers et al., 2022, "8-bit optimizers") for i = 1..n-1, plus an exact zero, all divided
by their largest magnitude so that max |v| = 1. Why i = 1..n-1 and the zero: the set is then
symmetric in probability (i = 0 would bring in the minimum Q(0) with no counterpart at the
top; measured on N(0, 1) at k = 4 and B = 64 that doubles the MSE), and 2^k - 1 quantiles
plus zero is what bitsandbytes' ``create_quantile_map`` stores. ``torch.quantile`` refuses
inputs above 16M elements and a full sort is slow, so two estimators are provided:

* ``exact``: a two-pass histogram select. Pass 1 counts values per bucket of a fine uniform
  grid; the buckets holding the wanted ranks are then the only values gathered and sorted
  (pass 2). Exact order statistics at any size, memory proportional to one chunk.
* ``approx``: quantiles of a seeded uniform random sample (``sample_size`` values, with
  replacement); reproducible, and its cost does not grow with the tensor.
"""

from __future__ import annotations

import torch

from harness.dtypes.registry import register_family
from harness.dtypes.spec import DtypeSpec, Estimator

_CHUNK = 1 << 22  # elements per pass-1/pass-2 chunk: a few MB, cache friendly
_BUCKETS = 1 << 16  # uniform buckets over [-1, 1] for the histogram select
_MAX_SAMPLE = 1 << 26  # a sample is sorted in memory


def _bucket(values: torch.Tensor) -> torch.Tensor:
    """Bucket of each value in [-1, 1]; both passes call exactly this (consistent rounding)."""
    return ((values + 1.0) * (_BUCKETS / 2)).to(torch.int32).clamp_(0, _BUCKETS - 1)


def _chunks(flat: torch.Tensor, scale: float):
    for chunk in flat.split(_CHUNK):
        if scale == 1.0 and chunk.dtype == torch.float32:  # already normalised (fake_quantize)
            yield chunk.clamp(-1.0, 1.0)
        else:
            yield (chunk.to(torch.float32) / scale).clamp_(-1.0, 1.0)


def _native_lib(flat: torch.Tensor, scale: float):
    """The compiled kernels for an already-normalised float32 CPU tensor, else None.

    Only for ``scale == 1`` (what fake_quantize fits on): dividing by another Python scalar
    is left to torch, so the two paths cannot round differently.
    """
    from harness.quantize import _native  # the kernels live with the quantizer

    if scale != 1.0 or flat.dtype != torch.float32 or not _native.usable(flat):
        return None
    return _native.library()


def order_statistics(flat: torch.Tensor, ranks: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Exact values at 0-based ``ranks`` of ``flat / scale`` (clamped to [-1, 1]), any size."""
    from harness.quantize import _native

    lib = _native_lib(flat, scale)
    if lib is not None:
        hist = _native.histogram(lib, flat, scale, _BUCKETS)
    else:
        hist = torch.zeros(_BUCKETS, dtype=torch.int64, device=flat.device)
        for chunk in _chunks(flat, scale):
            hist += torch.bincount(_bucket(chunk), minlength=_BUCKETS)
    cum = hist.cumsum(0)
    ranks = ranks.to(device=flat.device, dtype=torch.int64)
    bucket_of_rank = torch.searchsorted(cum, ranks, right=True)
    wanted = torch.zeros(_BUCKETS, dtype=torch.bool, device=flat.device)
    wanted[bucket_of_rank] = True
    if lib is not None:
        picked = [_native.select(lib, flat, scale, wanted, int(hist[wanted].sum()))]
    else:
        picked = [chunk[wanted[_bucket(chunk).long()]] for chunk in _chunks(flat, scale)]
    selected = torch.sort(torch.cat(picked)).values
    # Selected buckets occupy contiguous runs of `selected`, in bucket order.
    start_in_selected = torch.cumsum(hist * wanted, 0) - hist * wanted
    below_bucket = cum - hist
    return selected[start_in_selected[bucket_of_rank] + ranks - below_bucket[bucket_of_rank]]


def _interpolated(n: int, num: int, den: int, values_at) -> torch.Tensor:
    """Q(i / den), i = 0..num, linearly interpolated (torch.quantile's default) from
    ``values_at(ranks)`` of a population of n; positions are computed in integers."""
    pos_num = torch.arange(num + 1, dtype=torch.int64) * (n - 1)
    lo = pos_num // den
    frac = (pos_num % den).to(torch.float64) / den
    hi = torch.clamp(lo + 1, max=n - 1)
    values = values_at(torch.cat([lo, hi])).to(torch.float64).cpu()
    v_lo, v_hi = values[: lo.numel()], values[lo.numel() :]
    return v_lo + (v_hi - v_lo) * frac


def exact_quantiles(flat: torch.Tensor, num: int, den: int, scale: float = 1.0) -> torch.Tensor:
    """Q(i / den) for i = 0..num of ``flat / scale``, exactly, at any size."""
    return _interpolated(flat.numel(), num, den, lambda r: order_statistics(flat, r, scale))


def sampled_quantiles(
    flat: torch.Tensor, num: int, den: int, spec: DtypeSpec, scale: float
) -> torch.Tensor:
    """The same quantiles of a seeded uniform sample (with replacement) of ``flat / scale``.

    The sample's order statistics come from the histogram select, not a sort: same values,
    several times faster for a 1M sample.
    """
    gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    idx = torch.randint(flat.numel(), (spec.sample_size,), generator=gen).to(flat.device)
    sample = (flat.take(idx).to(torch.float32) / scale).clamp_(-1.0, 1.0)
    return _interpolated(sample.numel(), num, den, lambda r: order_statistics(sample, r))


def validate_quantile(spec: DtypeSpec, bits: int) -> None:
    if not 1 <= spec.sample_size <= _MAX_SAMPLE:
        raise ValueError(
            f"sample_size={spec.sample_size} (dtype {spec.name!r}) must be in [1, {_MAX_SAMPLE}]"
        )


@register_family("quantile", bits=range(2, 9), needs_tensor=True, validate=validate_quantile)
def quantile_codebook(
    spec: DtypeSpec, bits: int, tensor: torch.Tensor | None = None
) -> torch.Tensor:
    """Equal-mass codebook of ``tensor / max|tensor|`` (see the module docstring)."""
    if tensor is None or tensor.numel() == 0:
        raise ValueError(
            f"tensor: dtype {spec.name!r} needs a non-empty tensor to fit its codebook"
        )
    flat = tensor.detach().flatten()
    absmax = float(torch.maximum(flat.max(), -flat.min()))  # max |v| without a |flat| copy
    if absmax != absmax or absmax == float("inf"):
        raise ValueError(f"tensor: max |value| is {absmax}; allowed: finite values only")
    if absmax == 0.0:  # nothing to fit: any codebook with a zero is exact
        return torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    den = 2**bits + 1
    if spec.estimator == Estimator.approx and flat.numel() > spec.sample_size:
        q = sampled_quantiles(flat, den - 1, den, spec, absmax)
    else:
        q = exact_quantiles(flat, den - 1, den, absmax)
    return torch.cat([(q[1:-1] + q[2:]) / 2, torch.zeros(1, dtype=q.dtype)])
