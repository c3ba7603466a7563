"""HQQ through hqq itself: equal to the library, better than round-to-nearest, honest limits.

The RTN reference is written here (asymmetric min/max per group, float zero point: the
group's min and max are exactly on the grid), independent of both hqq and kbit's quantizer.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

from harness.quantize.hqq import HQQ_BITS, hqq_bits, hqq_fake_quantize, supported

hqq_quantize = pytest.importorskip("hqq.core.quantize")

log = logging.getLogger(__name__)


def library(weight: torch.Tensor, bits, group_size, axis=1, compute_dtype=torch.float32):
    """What hqq itself returns, called as its README does, on a fresh Linear."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = weight.clone()
    layer = hqq_quantize.HQQLinear(
        linear,
        hqq_quantize.BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=axis),
        compute_dtype=compute_dtype,
        device="cpu",
        del_orig=False,
    )
    return layer


def rtn_asym(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Plain asymmetric min/max round-to-nearest per group of a row, codes 0..2^k-1."""
    groups = weight.double().reshape(-1, group_size)
    lo = groups.amin(dim=1, keepdim=True)
    hi = groups.amax(dim=1, keepdim=True)
    step = (hi - lo).clamp_min(1e-12) / (2**bits - 1)
    codes = ((groups - lo) / step).round().clamp(0, 2**bits - 1)
    return (codes * step + lo).reshape(weight.shape).to(weight.dtype)


def rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.double() - exact.double()).norm() / exact.double().norm()).item()


def weights(kind: str, shape=(128, 256), seed: int = 0) -> torch.Tensor:
    """Weight-like tensors: Gaussian, heavy-tailed (Student-t 3, Laplace), outlier columns."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=gen) * 0.02
    if kind == "student_t3":
        normal = torch.randn(shape, generator=gen)
        chi2 = torch.randn((3, *shape), generator=gen).pow(2).sum(0)
        return normal / (chi2 / 3).sqrt() * 0.02
    if kind == "laplace":
        uniform = torch.rand(shape, generator=gen) - 0.5
        return -0.02 * uniform.sign() * torch.log1p(-2 * uniform.abs())
    if kind == "outlier_columns":
        w = torch.randn(shape, generator=gen) * 0.02
        w[:, :: shape[1] // 4] *= 20
        return w
    raise ValueError(kind)


@pytest.mark.parametrize(
    ("bits", "group_size", "axis"),
    [(b, g, a) for b in (2, 3, 4, 8) for g in (32, 64) for a in (1, 0)]
    + [(1, 64, 1), (5, 64, 1), (6, 128, 1), (4, None, 1), (4, None, 0)],
)
def test_matches_library(bits, group_size, axis):
    w = weights("normal", seed=bits)
    ours = hqq_fake_quantize(w, bits, group_size, axis=axis)
    theirs = library(w, bits, group_size, axis).dequantize()
    assert ours.shape == w.shape and ours.dtype == w.dtype
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("compute_dtype", [torch.float16, torch.bfloat16])
def test_matches_library_low_precision(compute_dtype):
    """bf16 weight and half-precision scales/zeros: same values, weight's dtype back."""
    w = weights("laplace").to(torch.bfloat16)
    ours = hqq_fake_quantize(w, 4, 64, compute_dtype=compute_dtype)
    theirs = library(w, 4, 64, compute_dtype=compute_dtype).dequantize()
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs.to(torch.bfloat16))


def test_group_none_is_one_group_per_row():
    w = weights("normal")
    assert torch.equal(hqq_fake_quantize(w, 4, None), hqq_fake_quantize(w, 4, w.shape[1]))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("kind", ["normal", "student_t3", "laplace", "outlier_columns"])
@pytest.mark.parametrize("group_size", [32, 128])
def test_error_below_rtn(bits, kind, group_size):
    """HQQ's point: the optimized zero point beats plain min/max RTN at the same k and group."""
    w = weights(kind, seed=7)
    err_hqq = rel_err(hqq_fake_quantize(w, bits, group_size), w)
    err_rtn = rel_err(rtn_asym(w, bits, group_size), w)
    log.info("%s k=%d g=%d: hqq %.4f rtn %.4f", kind, bits, group_size, err_hqq, err_rtn)
    assert err_hqq < err_rtn


def test_rtn_reference_is_sane():
    """The reference keeps each group's min and max and uses at most 2^k levels per group."""
    w = weights("normal")
    q = rtn_asym(w, 3, 64).reshape(-1, 64)
    g = w.reshape(-1, 64)
    assert torch.allclose(q.amin(1), g.amin(1)) and torch.allclose(q.amax(1), g.amax(1))
    assert max(len(row.unique()) for row in q) <= 8


def test_input_not_modified():
    w = weights("outlier_columns")
    before = w.clone()
    param = nn.Parameter(w)  # requires_grad weight, as a model holds it
    out = hqq_fake_quantize(param, 4, 64)
    assert torch.equal(w, before) and param.data_ptr() == w.data_ptr()
    assert out.data_ptr() != w.data_ptr() and not out.requires_grad


def test_supported_messages():
    assert supported(4, 64, 4096) is None
    assert supported(4, 64, 4096, 11008) is None
    assert supported(4, None, 100) is None
    assert supported(7, 64, 4096) == "hqq: bits=7 unsupported; allowed: [1, 2, 3, 4, 5, 6, 8]"
    assert supported(1.58, 64, 4096).startswith("hqq: bits=1.58 unsupported")
    assert supported(True, 64, 4096).startswith("hqq: bits=True unsupported")
    assert supported(4, 12, 4096) == (
        "hqq: group_size=12 unsupported; must be a positive multiple of 8 or None"
    )
    assert supported(4, 0, 4096).startswith("hqq: group_size=0 unsupported")
    assert supported(4, 48, 4096) == "hqq: group_size=48 does not divide in_features=4096 (axis=1)"
    assert supported(4, 64, 4096, axis=0) == (
        "hqq: axis=0 groups run along the output dimension; out_features is needed"
    )
    assert supported(4, 64, 128, 96, axis=0) == (
        "hqq: group_size=64 does not divide out_features=96 (axis=0)"
    )
    assert supported(4, 64, 64, 3) == (
        "hqq: bits=4 packs 2 groups together; 3 groups (3x64 / 64) is not a multiple"
    )
    assert supported(4, 64, 64, 2, axis=2) == "hqq: axis=2 unsupported; allowed: [0, 1]"


def test_unsupported_raises_before_hqq():
    with pytest.raises(ValueError, match=r"hqq: bits=7 unsupported"):
        hqq_fake_quantize(weights("normal"), 7, 64)
    with pytest.raises(ValueError, match=r"hqq: bits=4 packs 2 groups"):
        hqq_fake_quantize(torch.randn(3, 64), 4, 64)
    with pytest.raises(ValueError, match=r"must be 2-D"):
        hqq_fake_quantize(torch.randn(64), 4, 64)


def _library_accepts(bits, group_size, out_features, in_features, axis) -> bool:
    try:
        w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
        out = library(w, bits, group_size, axis).dequantize()
    except (AssertionError, RuntimeError):
        return False
    return out.shape == w.shape and bool(torch.isfinite(out).all())


def test_supported_agrees_with_library():
    """Every small shape hqq itself quantizes (axis=1, groups within rows) is accepted, and
    every one it fails on is refused. Group sizes that straddle rows (hqq accepts them) are
    refused on purpose, so those are left out of the comparison."""
    shapes = [(1, 64), (3, 64), (5, 64), (7, 8), (3, 24), (10, 32), (16, 48)]
    outcomes = set()
    for (out_f, in_f), bits, group in itertools.product(shapes, HQQ_BITS, (8, 16, 32, 64, None)):
        if group is not None and in_f % group:
            continue
        ours = supported(bits, group, in_f, out_f) is None
        assert ours == _library_accepts(bits, group, out_f, in_f, 1), (bits, group, out_f, in_f)
        outcomes.add(ours)
    assert outcomes == {True, False}  # the grid has both kinds


def test_bits_hand_example():
    n = 4096 * 4096
    assert hqq_bits(n, 4, 64) == n * 4 + (n // 64) * 32  # 4.5 bits per parameter
    assert hqq_bits(n, 4, 64) / n == 4.5
    assert hqq_bits(n, 3, 128, 32, 32) / n == 3.5  # float32 compute dtype: 64 bits per group
    assert hqq_bits(100, 2, 64) == 200 + 2 * 32  # tail group stores a full scale and zero
    assert hqq_bits(n, 5, 64, packed=True) / n == 8.5  # one uint8 per 5-bit code
    assert hqq_bits(640, 3, 64, packed=True) == 32 * 64 + 10 * 32  # 10 groups, one int32 row
    with pytest.raises(ValueError, match="bits=7"):
        hqq_bits(n, 7, 64)


@pytest.mark.parametrize(
    ("bits", "out_features", "group_size"),
    [(b, 40, 16) for b in HQQ_BITS] + [(3, 3, 64), (5, 3, 64)],  # (3, 3, 64): int32 padding
)
def test_packed_bits_match_what_hqq_stores(bits, out_features, group_size):
    """packed=True equals the bytes of hqq's W_q plus its fp16 scale and zero tensors."""
    w = torch.randn(out_features, 64, generator=torch.Generator().manual_seed(1))
    layer = library(w, bits, group_size, compute_dtype=torch.float16)
    meta = layer.meta
    assert not meta["quant_zero"] and not meta["quant_scale"]
    stored = layer.W_q.numel() * layer.W_q.element_size() * 8
    stored += sum(meta[k].numel() * meta[k].element_size() * 8 for k in ("scale", "zero"))
    assert meta["scale"].dtype == meta["zero"].dtype == torch.float16
    assert hqq_bits(w.numel(), bits, group_size, packed=True) == stored


def test_zero_point_is_a_float():
    """Why hqq_bits counts the zero point at 16 bits: it is stored fractional, even at 4 bits."""
    layer = library(weights("normal"), 4, 64, compute_dtype=torch.float16)
    zero = layer.meta["zero"]
    assert not torch.equal(zero, zero.round())


def test_import_does_not_load_hqq():
    code = "import sys, harness.quantize.hqq; print('hqq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
