"""``normal``: NF-k, the normal-float codebooks of QLoRA (Dettmers et al., 2023)."""

from __future__ import annotations

import torch

from harness.dtypes.family_registry import register_family
from harness.dtypes.spec import DtypeSpec


def default_offset(bits: int) -> float:
    """QLoRA's rule: the mean of the outermost quantile centres of 2^k - 1 and 2^k bins.

    For k = 4: (1 - 1/30 + 1 - 1/32) / 2 = 0.9677083, the published NF4 offset.
    """
    n = 2**bits
    return 1 - (1 / (2 * (n - 1)) + 1 / (2 * n)) / 2


def validate_normal(spec: DtypeSpec, bits: int) -> None:
    if spec.offset is not None and not 0.5 < spec.offset < 1:
        raise ValueError(f"offset={spec.offset} (dtype {spec.name!r}) must lie in (0.5, 1)")


@register_family("normal", bits=range(2, 9), validate=validate_normal, options=("offset",))
def normal_codebook(spec: DtypeSpec, bits: int, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """Quantiles of N(0, 1): 2^(k-1) positive, 2^(k-1) - 1 negative, and an exact zero.

    Generalises bitsandbytes' ``create_normal_map(offset, use_extra_value=True)``: the
    positive half takes ``ppf(linspace(offset, 0.5, 2^(k-1) + 1))`` without its last point,
    the negative half ``-ppf(linspace(offset, 0.5, 2^(k-1)))`` likewise; then / max.
    """
    offset = spec.offset if spec.offset is not None else default_offset(bits)
    half = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    return torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos])
