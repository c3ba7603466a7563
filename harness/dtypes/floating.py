"""``float``: sign + E exponent bits + M mantissa bits, with subnormals.

By default every bit pattern is a finite value (no inf/NaN: all 2^k codes are usable, the
paper's choice). ``special`` reserves codes the way the OCP formats do: ``fn`` (E4M3: only the
all-ones pattern is NaN) or ``ieee`` (E5M2: the top exponent is inf/NaN), so the MX formats'
FP8 elements can be represented exactly.
"""

from __future__ import annotations

import math

import torch

from harness.dtypes.family_registry import register_family
from harness.dtypes.spec import DtypeSpec


def exponent_split(spec: DtypeSpec, bits: int) -> tuple[int, int]:
    """(E, M) for k = ``bits``: explicit fields, else the paper's rule E = ceil(k / 2).

    Appendix C.4 of Dettmers & Zettlemoyer (2022): "at least half the bits, rounded up" for
    the exponent, i.e. E = 2, 2, 3, 3, 4, 4 for k = 3..8 (and E = 1 for k = 2).
    """
    e = spec.exponent_bits if spec.exponent_bits is not None else math.ceil(bits / 2)
    m = spec.mantissa_bits if spec.mantissa_bits is not None else bits - 1 - e
    return e, m


def validate_float(spec: DtypeSpec, bits: int) -> None:
    e, m = exponent_split(spec, bits)
    special = getattr(spec.special, "value", spec.special)
    if special == "ieee" and e < 2:
        raise ValueError(f"special='ieee' needs exponent_bits >= 2 (dtype {spec.name!r}, E={e})")
    if e < 1 or m < 0 or e + m + 1 != bits:
        raise ValueError(
            f"exponent_bits={e}, mantissa_bits={m} do not fit bits={bits} (dtype {spec.name!r}): "
            f"need exponent_bits >= 1, mantissa_bits >= 0 and 1 + exponent_bits + mantissa_bits == bits"
        )


@register_family(
    "float",
    bits=range(2, 9),
    validate=validate_float,
    options=("exponent_bits", "mantissa_bits", "bias", "special"),
)
def float_codebook(spec: DtypeSpec, bits: int, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """Every bit pattern of a sign/E/M float is a finite value (no inf/NaN encodings).

    Exponent field e = 0 encodes subnormals ``2^(1 - bias) * m / 2^M``; e >= 1 encodes
    ``2^(e - bias) * (1 + m / 2^M)``. ``bias`` defaults to 2^(E-1) - 1; it scales every value
    by the same power of two, so it cancels under block absmax normalisation and only matters
    to readers comparing raw magnitudes. So ``fp8_e4m3`` here has max 480 (all 8-bit patterns
    finite), not OCP's 448 (which reserves S.1111.111 for NaN).
    """
    e_bits, m_bits = exponent_split(spec, bits)
    bias = spec.bias if spec.bias is not None else 2 ** (e_bits - 1) - 1
    mant = torch.arange(2**m_bits, dtype=torch.float64) / 2**m_bits
    values = [2.0 ** (1 - bias) * mant]  # subnormals (and zero)
    for e in range(1, 2**e_bits):
        values.append(2.0 ** (e - bias) * (1 + mant))
    special = getattr(spec.special, "value", spec.special)
    if special == "ieee":  # the top exponent encodes inf/NaN
        values = values[:-1]
    pos = torch.cat(values)
    if special == "fn":  # S.1111...1 is NaN: the largest magnitude is not a value
        pos = pos[:-1]
    return torch.cat([-pos, pos])
