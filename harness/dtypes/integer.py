"""``int``: linear (uniform) codebooks, the paper's integer data type."""

from __future__ import annotations

import torch

from harness.dtypes.family_registry import register_family
from harness.dtypes.spec import DtypeSpec


@register_family("int", bits=range(2, 9), options=("asymmetric",))
def int_codebook(spec: DtypeSpec, bits: int, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """Evenly spaced levels in [-1, 1].

    Symmetric (default): 2^k - 1 levels ``i / (2^(k-1) - 1)`` for ``|i| <= 2^(k-1) - 1`` —
    equal numbers of positive and negative values, as in the paper; one code is unused so
    that +absmax and -absmax are both exact. Asymmetric: all 2^k levels ``i / 2^(k-1)`` for
    ``-2^(k-1) <= i < 2^(k-1)`` (two's complement: -1 exact, the top level is 1 - 2^(1-k)).
    """
    half = 2 ** (bits - 1)
    if spec.asymmetric:
        return torch.arange(-half, half, dtype=torch.float64) / half
    return torch.arange(-(half - 1), half, dtype=torch.float64) / (half - 1)
