"""The block-wise quantizer against brute force, round trips and the paper's error trends."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.dtypes import codebook
from harness.kernels import torch_ops
from harness.quantize import dequantize_blockwise, fake_quantize, quantize_blockwise
from harness.quantize.blockwise import round_to_format

FIXED = [
    ("int", 3),
    ("int", 8),
    ("int_asym", 4),
    ("float", 5),
    ("e2m1", 4),
    ("dynamic", 8),
    ("nf4", 4),
    ("normal", 6),
]
FORMATS = ["fp16", "bf16", "fp32", "e8m0"]


def brute_force(
    x: torch.Tensor, code: torch.Tensor, block_size, scale_format, centering
) -> torch.Tensor:
    """Independent reference: per block, float64 distance to every code, first minimum wins."""
    flat = x.reshape(-1).float()
    size = flat.numel() if block_size is None else block_size
    out = []
    for start in range(0, flat.numel(), size):
        block = flat[start : start + size]
        mean = torch.zeros(())
        if centering:
            mean = round_to_format(block.double().mean().float().reshape(1), scale_format)[0]
        centred = block - mean if centering else block
        scale = round_to_format(centred.abs().max().reshape(1), scale_format)[0]
        y = (centred / (scale if scale > 0 else 1.0)).clamp(-1, 1)
        idx = (y.double()[:, None] - code.double()[None, :]).abs().argmin(dim=1)
        values = code[idx] * scale
        out.append(values + mean if centering else values)
    return torch.cat(out).view(x.shape)


@st.composite
def cases(draw):
    n = draw(st.integers(1, 300))
    block = draw(st.sampled_from([None, 1, 3, 16, 64, 128, 1000]))
    name, k = draw(st.sampled_from(FIXED))
    fmt = draw(st.sampled_from(FORMATS))
    centering = draw(st.booleans()) and fmt != "e8m0"
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * draw(
        st.sampled_from([1e-3, 1.0, 30.0])
    )
    if draw(st.booleans()):  # exact ties and repeated values
        x = (x * 4).round() / 4
    return x, codebook(name, k), block, fmt, centering


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_dequantized_is_nearest_code_times_block_scale(case):
    x, code, block, fmt, centering = case
    q = quantize_blockwise(x, code, block, scale_format=fmt, centering=centering, compile=False)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == x.numel()
    assert torch.equal(dequantize_blockwise(q), brute_force(x, code, block, fmt, centering))


@settings(max_examples=100, deadline=None)
@given(cases())
def test_codes_stable_under_dequantize_then_quantize(case):
    """Holds when the codebook has both -1 and +1 and the scale is rounded to nearest:
    the block absmax then dequantizes to exactly its stored scale. (e8m0 rounds up, a code
    without -1 shrinks the absmax, and centering shifts the mean: those change scales.)"""
    x, code, block, fmt, _ = case
    if code[0] != -1 or code[-1] != 1 or fmt == "e8m0":
        code, fmt = codebook("int", 4), "fp16"
    q1 = quantize_blockwise(x, code, block, scale_format=fmt, compile=False)
    q2 = quantize_blockwise(dequantize_blockwise(q1), code, block, scale_format=fmt, compile=False)
    assert torch.equal(q1.scales, q2.scales)
    assert torch.equal(q1.codes, q2.codes)


@pytest.mark.parametrize("name", ["int", "nf4", "quantile", "dynamic"])
def test_fake_quantize_equals_quantize_then_dequantize(name):
    x = torch.randn(33, 70, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    k = 4 if name != "dynamic" else 8
    fq = fake_quantize(x, name, k, 64, centering=True)
    assert fq.shape == x.shape and fq.dtype == x.dtype
    from harness.quantize.blockwise import normalised_values

    fitted = normalised_values(x, 64, centering=True) if name == "quantile" else None
    q = quantize_blockwise(x, codebook(name, k, fitted), 64, centering=True)
    assert torch.equal(fq, dequantize_blockwise(q))


def test_quantile_fake_quantize_fits_the_block_normalised_values():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(2)) ** 3  # heavy tails
    fq = fake_quantize(x, "quantile", 3, 64)
    assert fq.unique().numel() > 8  # many scales
    q_err = (fq - x).pow(2).mean()
    assert q_err < (fake_quantize(x, "int", 3, 64) - x).pow(2).mean()


# ------------------------------------------------------------------------ the kernel
def threshold_probes(thr: torch.Tensor, code: torch.Tensor, n_random: int) -> torch.Tensor:
    """y exactly on, just above and just below every finite threshold, every code, +-0, +-1,
    and seeded uniform values: where a nearest-code search can go wrong."""
    y = torch.cat(
        [
            torch.tensor([1.0, -1.0, 0.0, -0.0]),
            thr,
            torch.nextafter(thr, torch.full_like(thr, 2.0)),
            torch.nextafter(thr, torch.full_like(thr, -2.0)),
            code,
            torch.rand(n_random, generator=torch.Generator().manual_seed(1)) * 2 - 1,
        ]
    )
    return y.clamp(-1, 1)


@pytest.mark.parametrize(("name", "k"), [*FIXED, ("float", 8), ("fp8_e5m2", 8), ("quantile", 8)])
def test_lookup_table_equals_searchsorted_at_every_threshold(name, k):
    code = codebook(name, k, torch.randn(5000, generator=torch.Generator().manual_seed(k)))
    lut = torch_ops.build_lut(code)
    assert lut is not None
    thr = lut.thresholds[:-1]
    y = threshold_probes(thr, code, 100_000)
    ref = torch.searchsorted(thr, y, side="left")
    assert torch.equal(
        torch_ops.code_index(y, lut.table, lut.thresholds, lut.shift, lut.nbins), ref
    )


def test_too_fine_codebook_falls_back_to_searchsorted():
    code = torch.tensor([-1.0, 0.0, 0.5, 0.5 + 2e-6, 0.5 + 4e-6, 1.0])  # thresholds 2e-6 apart
    assert torch_ops.build_lut(code) is None
    x = torch.tensor([0.5 + 1e-6, 0.5 + 1.1e-6, 0.5 + 3e-6, 0.5 + 2.9e-6, 1.0, -0.4, 0.25])
    q = quantize_blockwise(x, code, None, scale_format="fp32")
    assert torch.equal(dequantize_blockwise(q), brute_force(x, code, None, "fp32", False))


def test_ties_go_to_the_lower_code():
    code = codebook("int", 3)  # levels i/3
    x = torch.tensor([1.0, 0.5 / 3, -0.5 / 3, 1.5 / 3, -1.5 / 3])
    q = quantize_blockwise(x, code, None, scale_format="fp32")
    y = x / x.abs().max()
    expected = torch.searchsorted(torch_ops.thresholds(code)[:-1], y, side="left")
    assert torch.equal(q.codes.long(), expected)


COMPILE_CASES = [
    ("nf4", 4, 64, "fp16", False),
    ("dynamic", 8, 128, "bf16", True),
    ("float", 5, None, "e8m0", False),
    ("int", 4, 4096, "fp32", True),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "k", "block", "fmt", "centering"), COMPILE_CASES)
def test_compiled_and_eager_paths_agree(name, k, block, fmt, centering):
    x = (
        torch.randn(257, 1000, generator=torch.Generator().manual_seed(3)) * 7
    )  # tail at B=64/128/4096
    code = codebook(name, k)
    kw = {"scale_format": fmt, "centering": centering}
    eager = quantize_blockwise(x, code, block, compile=False, **kw)
    compiled = quantize_blockwise(x, code, block, compile=True, **kw)
    assert torch.equal(eager.codes, compiled.codes) and torch.equal(eager.scales, compiled.scales)
    assert torch.equal(
        dequantize_blockwise(eager, compile=False), dequantize_blockwise(compiled, compile=True)
    )
    fq_c = fake_quantize(x, name, k, block, compile=True, **kw)
    assert torch.equal(fq_c, fake_quantize(x, name, k, block, compile=False, **kw))


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch_ops, "_COMPILED", {})
    monkeypatch.setattr(torch_ops, "_BROKEN", set())
    monkeypatch.setattr(torch, "compile", broken)
    x = torch.randn(64, 64)
    with caplog.at_level("WARNING"):
        got = fake_quantize(x, "nf4", 4, 64, compile=True)
    assert "no compiler here" in caplog.text
    assert torch.equal(got, fake_quantize(x, "nf4", 4, 64, compile=False))


# ------------------------------------------------------------------------ the paper's trends
FAMILIES = ["int", "int_asym", "float", "dynamic", "normal", "quantile", "quantile_approx"]


@pytest.fixture(scope="module")
def gaussian():
    return torch.randn(65_536, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", FAMILIES)
def test_error_falls_as_k_grows(name, gaussian):
    mse = [
        float((fake_quantize(gaussian, name, k, 64) - gaussian).pow(2).mean()) for k in range(3, 9)
    ]
    assert all(a > b for a, b in itertools.pairwise(mse)), mse


@pytest.mark.parametrize("name", [*FAMILIES, "nf4", "e2m1"])
def test_small_blocks_no_worse_than_large(name, gaussian):
    k = 4
    err = {
        b: float((fake_quantize(gaussian, name, k, b) - gaussian).pow(2).mean()) for b in (64, 4096)
    }
    assert err[64] <= err[4096], err


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("block", [0, -64, 2.5, True])
def test_bad_block_size(block):
    with pytest.raises(ValueError, match=rf"block_size={block!r}.*positive int"):
        fake_quantize(torch.randn(10), "int", 4, block)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values(bad):
    x = torch.randn(300)
    x[123] = bad
    with pytest.raises(ValueError, match=r"x: contains 1 NaN or inf.*finite values only"):
        quantize_blockwise(x, codebook("int", 4), 64)
    with pytest.raises(ValueError, match="NaN or inf"):
        fake_quantize(x, "quantile", 4, 64)


def test_empty_tensor():
    with pytest.raises(ValueError, match=r"x: the tensor is empty.*at least one element"):
        fake_quantize(torch.empty(0, 5), "int", 4, 64)


def test_bad_scale_format_and_centering_with_e8m0():
    with pytest.raises(
        ValueError,
        match=r"scale_format='fp8'.*allowed: \['fp16', 'bf16', 'fp32', 'e8m0', 'mx', 'nvfp4'\]",
    ):
        fake_quantize(torch.randn(10), "int", 4, 64, scale_format="fp8")
    with pytest.raises(ValueError, match="centering=True with scale_format='e8m0'"):
        fake_quantize(torch.randn(10), "int", 4, 64, scale_format="e8m0", centering=True)


def test_fp16_scale_overflow_is_reported():
    with pytest.raises(ValueError, match=r"scale_format='fp16' cannot hold block absmax 100000"):
        fake_quantize(torch.full((8,), 1e5), "int", 4, 64)
    assert torch.equal(
        fake_quantize(torch.full((8,), 1e5), "int", 4, 64, scale_format="fp32"),
        torch.full((8,), 1e5),
    )


def test_bad_codebook():
    with pytest.raises(ValueError, match="strictly increasing"):
        quantize_blockwise(torch.randn(10), torch.tensor([0.5, -1.0, 1.0]), 4)
    with pytest.raises(ValueError, match="within"):
        quantize_blockwise(torch.randn(10), torch.tensor([-2.0, 1.0]), 4)


def test_e8m0_scale_is_the_next_power_of_two():
    s = torch.tensor([1.0, 0.75, 0.5, 3e-3, 1e-40, 0.0])
    assert torch.equal(
        round_to_format(s, "e8m0"), torch.tensor([1.0, 1.0, 0.5, 2.0**-8, 2.0**-126, 0.0])
    )


# ------------------------------------------------------------- MX: brute force of the OCP rule
def mx_brute_force(x: torch.Tensor, e_bits: int, m_bits: int, block: int) -> torch.Tensor:
    """OCP MX in float64 by enumeration: X = 2^(floor(log2 amax) - emax_elem), each x / X
    saturated to +-max and sent to the nearest element value, ties to the even mantissa."""
    bias = 2 ** (e_bits - 1) - 1
    mags = [2.0 ** (1 - bias) * m / 2**m_bits for m in range(2**m_bits)]
    mags += [2.0 ** (e - bias) * (1 + m / 2**m_bits) for e in range(1, 2**e_bits) for m in range(2**m_bits)]  # fmt: skip
    vmax, emax = max(mags), math.floor(math.log2(max(mags)))
    out = []
    for row in x.double().view(-1, block).tolist():
        amax = max(abs(v) for v in row)
        scale = 2.0 ** max(math.floor(math.log2(amax)) - emax, -126) if amax > 0 else 1.0
        res = []
        for v in row:
            z = min(abs(v) / scale, vmax)
            best = min(range(len(mags)), key=lambda i: (abs(z - mags[i]), i % 2))  # even wins ties
            res.append(math.copysign(mags[best] * scale, v) if mags[best] else 0.0)
        out.append(res)
    return torch.tensor(out, dtype=torch.float32).view(x.shape)


@pytest.mark.parametrize(("e_bits", "m_bits"), [(2, 1), (3, 2), (2, 3), (4, 3), (1, 2), (3, 1)])
def test_mx_equals_brute_force_on_every_path(e_bits, m_bits):
    k = 1 + e_bits + m_bits
    g = torch.Generator().manual_seed(k)
    x = torch.randn(24, 32, generator=g)
    x[0] = 0.0  # an all-zero block
    x[1] = (torch.randint(-40, 40, (32,), generator=g) / 8.0).to(torch.float32)  # exact ties
    x[2, 5] = 300.0  # an outlier
    x = x.to(torch.bfloat16).to(torch.float32)  # few mantissa bits: many more ties
    ref = mx_brute_force(x, e_bits, m_bits, 32)
    kw = {"exponent_bits": e_bits, "mantissa_bits": m_bits}
    for compile in (False, True, None):
        got = fake_quantize(x, "float", k, 32, scale_format="mx", compile=compile, **kw)
        assert torch.equal(got, ref), (compile, (got - ref).abs().max())
    q = quantize_blockwise(x, codebook("float", k, **kw), 32, scale_format="mx")
    assert torch.equal(dequantize_blockwise(q), ref)
    assert torch.equal(dequantize_blockwise(q, compile=False), ref)
