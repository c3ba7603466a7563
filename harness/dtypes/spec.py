"""The schema of a data type entry (``conf/dtype/<name>.yaml``).

One flat dataclass for every family: the fields a family does not read stay at their
defaults. Hydra validates each YAML entry against it at compose time (unknown keys and
wrong types fail before any job starts), and :func:`harness.dtypes.codebook` validates the
same files with the same class outside Hydra, so both paths accept exactly the same entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from omegaconf import MISSING


class Estimator(str, Enum):
    """How the ``quantile`` family estimates the quantiles of a tensor."""

    exact = "exact"  # exact order statistics of every value (radix-style select, any size)
    approx = "approx"  # quantiles of a seeded random sample of ``sample_size`` values


@dataclass
class DtypeSpec:
    """One named data type: a family plus the options that pin its codebook down.

    Fields mirror the keyword arguments of the family functions one-to-one; ``None`` means
    "use the family's rule" (e.g. the exponent split of ``float``, the offset of ``normal``).
    """

    name: str = MISSING  # the value that lands in the results table (`dtype` column)
    family: str = MISSING  # registry key of the family function: int|float|dynamic|quantile|normal
    bits: int | None = None  # null = any legal k of the family; an int = only this k
    # --- int ---------------------------------------------------------------------------
    asymmetric: bool = False  # int: 2^k levels (two's complement style) instead of 2^k - 1
    # --- float -------------------------------------------------------------------------
    exponent_bits: int | None = None  # E; null = the paper's rule E = ceil(k / 2) (App. C.4)
    mantissa_bits: int | None = None  # M; null = k - 1 - E. If set, E + M + 1 must equal k
    bias: int | None = None  # exponent bias; null = 2^(E-1) - 1 (cancels under absmax scaling)
    # --- dynamic -----------------------------------------------------------------------
    signed: bool = True  # dynamic: a sign bit (unsigned maps cover [0, 1] only)
    # --- normal ------------------------------------------------------------------------
    offset: float | None = None  # NF-k: outermost quantile; null = midpoint rule (nf4: 0.9677083)
    # --- quantile ----------------------------------------------------------------------
    estimator: Estimator = Estimator.exact  # exact | approx
    sample_size: int = 1_048_576  # approx: values sampled from the tensor
    seed: int = 0  # approx: seed of the sample, so a codebook is reproducible
