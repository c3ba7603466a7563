"""``dynamic``: the dynamic-exponent (dynamic tree) type of Dettmers (2016)."""

from __future__ import annotations

import torch

from harness.dtypes.family_registry import register_family
from harness.dtypes.spec import DtypeSpec


@register_family("dynamic", bits=range(2, 9), options=("signed",))
def dynamic_codebook(
    spec: DtypeSpec, bits: int, tensor: torch.Tensor | None = None
) -> torch.Tensor:
    """Sign bit, exponent = number of leading zeros, an indicator bit, then a linear fraction.

    With ``z`` leading zeros (z = 0..k-2 for the signed type) the remaining ``k - 2 - z``
    bits are a linear fraction: the midpoints of ``2^(k-2-z)`` equal bins of [0.1, 1], scaled
    by ``10^-z``. Plus 0 and 1. Computed with the same float32 steps as bitsandbytes'
    ``create_dynamic_map(signed, max_exponent_bits=k-1, total_bits=k)``, so for k = 8 it is
    bit-identical to ``create_dynamic_map(signed=True)``.
    """
    values: list[torch.Tensor] = []
    for i in range(bits - 1):  # i = k - 2 - z: more leading zeros, fewer fraction bits
        n = 2**i if spec.signed else 2 ** (i + 1)
        boundaries = torch.linspace(0.1, 1, n + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        magnitude = 10 ** (-(bits - 2) + i)
        values.append(magnitude * means)
        if spec.signed:
            values.append(-magnitude * means)
    values.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    return torch.cat(values)
