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

from typing import Protocol

import numpy as np
import torch

from harness.dtypes.family_registry import register_family
from harness.dtypes.spec import DtypeSpec, Estimator
from harness.kernels import native

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


class Population(Protocol):
    """Values to fit a codebook to, possibly never materialised (max |value| must be 1).

    :class:`harness.dtypes.population.BlockNormalised` is one for the block-normalised
    values of a weight: the fused kernels recompute them from the weight in each pass
    instead of writing a full-size normalised copy.
    """

    def numel(self) -> int: ...

    def histogram(self, buckets: int) -> torch.Tensor:
        """int64 counts of :func:`_bucket` over every value."""

    def select(self, wanted: torch.Tensor, total: int) -> torch.Tensor:
        """Every value whose bucket is ``wanted`` (``total`` of them), any order."""

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 values at flat indices ``idx``."""


class TensorPopulation:
    """``clamp(flat / scale, -1, 1)`` of a tensor, in chunks (torch) or native kernels."""

    def __init__(self, flat: torch.Tensor, scale: float = 1.0) -> None:
        self.flat, self.scale = flat, scale
        self._lib = _native_lib(flat, scale)

    def numel(self) -> int:
        return self.flat.numel()

    def histogram(self, buckets: int) -> torch.Tensor:
        if self._lib is not None:
            return native.histogram(self._lib, self.flat, self.scale, buckets)
        hist = torch.zeros(buckets, dtype=torch.int64, device=self.flat.device)
        for chunk in _chunks(self.flat, self.scale):
            hist += torch.bincount(_bucket(chunk), minlength=buckets)
        return hist

    def select(self, wanted: torch.Tensor, total: int) -> torch.Tensor:
        if self._lib is not None:
            return native.select(self._lib, self.flat, self.scale, wanted, total)
        return torch.cat([c[wanted[_bucket(c).long()]] for c in _chunks(self.flat, self.scale)])

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        values = self.flat.take(idx.to(self.flat.device)).to(torch.float32)
        return (values / self.scale).clamp_(-1.0, 1.0)


def _native_lib(flat: torch.Tensor, scale: float):
    """The compiled kernels for an already-normalised float32 CPU tensor, else None.

    Only for ``scale == 1`` (what fake_quantize fits on): dividing by another Python scalar
    is left to torch, so the two paths cannot round differently.
    """
    if scale != 1.0 or flat.dtype != torch.float32 or not native.usable(flat):
        return None
    return native.library()


def _sorted(values: torch.Tensor) -> torch.Tensor:
    """Ascending copy. On the CPU through numpy, whose vectorised sort (x86-simd-sort) is
    about 15x faster than torch.sort on the few 100K values a select keeps; same values."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(values.numpy()))
    return torch.sort(values).values


def select_ranks(pop: Population, ranks: torch.Tensor) -> torch.Tensor:
    """Exact values at 0-based ``ranks`` of a population: the two-pass histogram select."""
    hist = pop.histogram(_BUCKETS)
    device = hist.device
    cum = hist.cumsum(0)
    ranks = ranks.to(device=device, dtype=torch.int64)
    bucket_of_rank = torch.searchsorted(cum, ranks, right=True)
    wanted = torch.zeros(_BUCKETS, dtype=torch.bool, device=device)
    wanted[bucket_of_rank] = True
    selected = _sorted(pop.select(wanted, int(hist[wanted].sum())))
    # Selected buckets occupy contiguous runs of `selected`, in bucket order.
    start_in_selected = torch.cumsum(hist * wanted, 0) - hist * wanted
    below_bucket = cum - hist
    return selected[start_in_selected[bucket_of_rank] + ranks - below_bucket[bucket_of_rank]]


def order_statistics(flat: torch.Tensor, ranks: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Exact values at 0-based ``ranks`` of ``flat / scale`` (clamped to [-1, 1]), any size."""
    return select_ranks(TensorPopulation(flat, scale), ranks)


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
    pop = TensorPopulation(flat, scale)
    return _interpolated(pop.numel(), num, den, lambda r: select_ranks(pop, r))


def sampled_quantiles(pop: Population, num: int, den: int, spec: DtypeSpec) -> torch.Tensor:
    """The same quantiles of a seeded uniform sample (with replacement) of the population.

    The sample's order statistics come from the histogram select, not a sort: same values,
    several times faster for a 1M sample.
    """
    gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    idx = torch.randint(pop.numel(), (spec.sample_size,), generator=gen)
    sample = pop.take(idx)
    return _interpolated(sample.numel(), num, den, lambda r: order_statistics(sample, r))


def validate_quantile(spec: DtypeSpec, bits: int) -> None:
    if not 1 <= spec.sample_size <= _MAX_SAMPLE:
        raise ValueError(
            f"sample_size={spec.sample_size} (dtype {spec.name!r}) must be in [1, {_MAX_SAMPLE}]"
        )


@register_family(
    "quantile",
    bits=range(2, 9),
    needs_tensor=True,
    validate=validate_quantile,
    options=("estimator", "sample_size", "seed"),
)
def quantile_codebook(
    spec: DtypeSpec, bits: int, tensor: torch.Tensor | Population | None = None
) -> torch.Tensor:
    """Equal-mass codebook of ``tensor / max|tensor|`` (see the module docstring), or of a
    :class:`Population` already normalised to max |v| = 1."""
    if tensor is None or tensor.numel() == 0:
        raise ValueError(
            f"tensor: dtype {spec.name!r} needs a non-empty tensor to fit its codebook"
        )
    if isinstance(tensor, torch.Tensor):
        flat = tensor.detach().flatten()
        absmax = float(torch.maximum(flat.max(), -flat.min()))  # max |v| without a |flat| copy
        if absmax != absmax or absmax == float("inf"):
            raise ValueError(f"tensor: max |value| is {absmax}; allowed: finite values only")
        if absmax == 0.0:  # nothing to fit: any codebook with a zero is exact
            return torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
        pop: Population = TensorPopulation(flat, absmax)
    else:
        pop = tensor  # already normalised to max |v| = 1
    den = 2**bits + 1
    if spec.estimator == Estimator.approx and pop.numel() > spec.sample_size:
        q = sampled_quantiles(pop, den - 1, den, spec)
    else:
        q = _interpolated(pop.numel(), den - 1, den, lambda r: select_ranks(pop, r))
    return torch.cat([(q[1:-1] + q[2:]) / 2, torch.zeros(1, dtype=q.dtype)])
