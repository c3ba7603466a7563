"""The schema of a data type entry (``conf/dtype/<name>.yaml``).

One flat dataclass for the built-in families: the fields a family does not read stay at their
defaults, and a field set away from its default on a family that does not declare it
(``dtype=int dtype.exponent_bits=3``) is refused by :func:`harness.dtypes.check` with the
family's allowed fields (each family declares its options when it is registered). The class
stays flat because a cell id hashes every field of the composed ``dtype`` node: splitting it
per family would change the id of every stored cell. A family with options of its own
(``table``, a plugin's) extends it with a subclass (:class:`harness.dtypes.table.TableSpec`),
so the built-in entries keep exactly these fields. Hydra validates each YAML entry against it
at compose time (unknown keys and wrong types fail before any job starts), and
:func:`harness.dtypes.codebook` validates the same files with the same class outside Hydra, so
both paths accept exactly the same entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from omegaconf import MISSING


class Special(str, Enum):
    """Which codes of a ``float`` format are reserved for NaN/inf (so are not values)."""

    none = "none"  # every bit pattern is a finite value (kbit's default; fp8_e4m3 max 480)
    fn = "fn"  # OCP E4M3 ("finite, NaN"): only S.1111.111 is NaN (max 448)
    ieee = "ieee"  # OCP E5M2 / IEEE: the top exponent is inf/NaN (max 57344)


class Estimator(str, Enum):
    """How the ``quantile`` family estimates the quantiles of a tensor."""

    exact = "exact"  # exact order statistics of every value (radix-style select, any size)
    approx = "approx"  # quantiles of a seeded random sample of ``sample_size`` values


# Fields every family takes: the entry's name, its family and the one k it may be pinned to.
COMMON_FIELDS = ("name", "family", "bits")


@dataclass
class DtypeSpec:
    """One named data type: a family plus the options that pin its codebook down.

    Fields mirror the keyword arguments of the family functions one-to-one; ``None`` means
    "use the family's rule" (e.g. the exponent split of ``float``, the offset of ``normal``).
    """

    name: str = MISSING  # the value that lands in the results table (`dtype` column)
    family: str = MISSING  # registry key of the family: int|float|dynamic|quantile|normal|table
    bits: int | None = None  # null = any legal k of the family; an int = only this k
    # --- int ---------------------------------------------------------------------------
    asymmetric: bool = False  # int: 2^k levels (two's complement style) instead of 2^k - 1
    # --- float -------------------------------------------------------------------------
    exponent_bits: int | None = None  # E; null = the paper's rule E = ceil(k / 2) (App. C.4)
    mantissa_bits: int | None = None  # M; null = k - 1 - E. If set, E + M + 1 must equal k
    bias: int | None = None  # exponent bias; null = 2^(E-1) - 1 (cancels under absmax scaling)
    special: Special = Special.none  # none | fn | ieee: codes reserved for NaN/inf (OCP FP8)
    # --- dynamic -----------------------------------------------------------------------
    signed: bool = True  # dynamic: a sign bit (unsigned maps cover [0, 1] only)
    # --- normal ------------------------------------------------------------------------
    offset: float | None = None  # NF-k: outermost quantile; null = midpoint rule (nf4: 0.9677083)
    # --- quantile ----------------------------------------------------------------------
    estimator: Estimator = Estimator.exact  # exact | approx
    sample_size: int = 1_048_576  # approx: values sampled from the tensor
    seed: int = 0  # approx: seed of the sample, so a codebook is reproducible
