"""The compiled CPU kernels (harness/kernels/native.c) against the torch reference path.

Every result must be bit-identical to the eager torch code (``compile=False``), which the
tests in test_blockwise.py check against brute force; here hypothesis drives the same cases
through the native path (the default on the CPU, ``compile=None``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_blockwise import brute_force, cases, threshold_probes

from harness.dtypes import codebook
from harness.dtypes import quantile as quantile_mod
from harness.kernels import native
from harness.quantize import dequantize_blockwise, fake_quantize, quantize_blockwise

pytestmark = pytest.mark.skipif(
    native.library() is None, reason="no C compiler: the torch path is tested elsewhere"
)


def _assert_same(x, code, block, fmt, centering):
    kw = {"scale_format": fmt, "centering": centering}
    ref = quantize_blockwise(x, code, block, compile=False, **kw)
    nat = quantize_blockwise(x, code, block, **kw)
    assert torch.equal(nat.codes, ref.codes)
    assert torch.equal(nat.scales, ref.scales)
    deq = dequantize_blockwise(nat)
    assert torch.equal(deq, dequantize_blockwise(ref, compile=False))
    assert torch.equal(deq, brute_force(x, code, block, fmt, centering))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_native_quantize_equals_eager_and_brute_force(case):
    _assert_same(*case)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.sampled_from(["int", "nf4", "dynamic", "float", "normal"]))
def test_native_fake_quantize_equals_eager(case, name):
    x, _, block, fmt, centering = case
    k = 8 if name == "dynamic" else 4
    kw = {"scale_format": fmt, "centering": centering}
    assert torch.equal(
        fake_quantize(x, name, k, block, **kw),
        fake_quantize(x, name, k, block, compile=False, **kw),
    )


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "e8m0", "fp32"])
@pytest.mark.parametrize(("name", "k"), [("int", 3), ("nf4", 4), ("int", 8), ("dynamic", 8)])
def test_native_on_extreme_magnitudes(fmt, name, k):
    """fp16 subnormal scales, values near the format limits, all-zero and signed-zero blocks,
    exact threshold ties; both search strategies (<= 16 codes compare, else table)."""
    g = torch.Generator().manual_seed(k)
    rows = [
        torch.randn(64, generator=g) * 1e-6,  # fp16 subnormal absmax
        torch.randn(64, generator=g).clamp(-1, 1)
        * 5e4,  # near the fp16 maximum (room for centering)
        torch.zeros(64),
        -torch.zeros(64),
        (torch.randn(64, generator=g) * 8).round() / 8,  # exact ties
        torch.randn(64, generator=g) * 3e-39,  # float32 subnormals
    ]
    x = torch.cat(rows).view(len(rows), 64).repeat(300, 1)  # large enough to use threads
    if fmt == "bf16" or fmt == "e8m0":
        x[1] *= 1e4
    _assert_same(x, codebook(name, k), 64, fmt, False)
    if fmt != "e8m0":
        _assert_same(x, codebook(name, k), 64, fmt, True)


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp32", "e8m0"])
@pytest.mark.parametrize("compile", [None, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_rejected_in_every_scale_format(bad, compile, fmt):
    """Both paths; e8m0 once rounded a NaN absmax to 0 in torch, which hid it."""
    x = torch.randn(128, 64)
    x[77, 5] = bad
    kw = {"scale_format": fmt, "compile": compile}
    with pytest.raises(ValueError, match="x: contains 1 NaN or inf"):
        quantize_blockwise(x, codebook("nf4", 4), 64, **kw)
    with pytest.raises(ValueError, match="x: contains 1 NaN or inf"):
        fake_quantize(x, "dynamic", 8, 64, **kw)


def test_out_buffers_are_written_and_returned():
    x = torch.randn(70, 33, generator=torch.Generator().manual_seed(5))
    code = codebook("nf4", 4)
    codes = torch.empty(x.numel(), dtype=torch.uint8)
    q = quantize_blockwise(x, code, 64, out=codes)
    assert q.codes.data_ptr() == codes.data_ptr()  # full blocks and the tail share the buffer
    assert torch.equal(q.codes, quantize_blockwise(x, code, 64, compile=False).codes)
    dst = torch.full_like(x, float("nan"))
    got = dequantize_blockwise(q, out=dst)
    assert got.data_ptr() == dst.data_ptr() and got.shape == x.shape
    assert torch.equal(dst, dequantize_blockwise(q, compile=False))
    dst.fill_(float("nan"))
    assert fake_quantize(x, "nf4", 4, 64, out=dst).data_ptr() == dst.data_ptr()
    assert torch.equal(dst, fake_quantize(x, "nf4", 4, 64, compile=False))
    half = x.to(torch.bfloat16)  # a non-float32 buffer goes through a copy, same values
    hdst = torch.empty_like(half)
    assert torch.equal(
        fake_quantize(half, "int", 4, 64, out=hdst), fake_quantize(half, "int", 4, 64)
    )


@pytest.mark.parametrize(
    "out",
    [
        torch.empty(10, dtype=torch.float32),
        torch.empty(70 * 33, dtype=torch.float64),
        torch.empty(33, 70).t(),
    ],
)
def test_bad_out_buffer_names_the_field(out):
    x = torch.randn(70, 33)
    with pytest.raises(ValueError, match=r"out: got .*allowed: a contiguous torch.float32 tensor"):
        fake_quantize(x, "int", 4, 64, out=out)


def test_quantile_histogram_select_equals_the_torch_path(monkeypatch):
    y = torch.randn(300_000, generator=torch.Generator().manual_seed(7)).clamp(-4, 4) / 4
    ranks = torch.randint(y.numel(), (600,), generator=torch.Generator().manual_seed(8))
    fast = quantile_mod.order_statistics(y, ranks)
    assert torch.equal(fast, torch.sort(y).values[ranks])  # brute force
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert torch.equal(quantile_mod.order_statistics(y, ranks), fast)
    for name in ("quantile", "quantile_approx"):
        monkeypatch.setenv(native.NATIVE_ENV, "0")
        ref = codebook(name, 5, y, sample_size=50_000)
        monkeypatch.delenv(native.NATIVE_ENV)
        assert torch.equal(codebook(name, 5, y, sample_size=50_000), ref)


@pytest.mark.parametrize("centering", [False, True])
@pytest.mark.parametrize(("shape", "block"), [((300, 70), 64), ((257, 513), 128), ((999,), None)])
def test_block_normalised_population_equals_the_materialised_values(shape, block, centering):
    """Histogram, select and sample reads (the native fitting kernels) against the values the
    torch path writes out, with tail blocks, one block per tensor, and more indices than
    one thread takes."""
    from harness.dtypes.population import BlockNormalised, normalised_values

    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) ** 3
    pop = BlockNormalised(native.library(), x, block, "fp16", centering)
    ref = normalised_values(x, block, centering=centering, compile=False).reshape(-1)
    idx = torch.randint(x.numel(), (200_000,), generator=torch.Generator().manual_seed(4))
    assert torch.equal(pop.take(idx), ref[idx])
    buckets, bucket = quantile_mod._BUCKETS, quantile_mod._bucket(ref).long()
    hist = pop.histogram(buckets)
    assert torch.equal(hist, torch.bincount(bucket, minlength=buckets))
    wanted = torch.zeros(buckets, dtype=torch.bool)
    wanted[::7] = True
    picked = pop.select(wanted, int(hist[wanted].sum()))
    in_wanted = ref[wanted[bucket]]
    assert torch.equal(picked.sort().values, in_wanted.sort().values)


def test_build_failure_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    x = torch.randn(64, 64)
    with caplog.at_level("WARNING"):
        got = fake_quantize(x, "nf4", 4, 64)
    assert "native quantization kernels unavailable" in caplog.text
    assert torch.equal(got, fake_quantize(x, "nf4", 4, 64, compile=False))


def test_build_goes_through_an_atomic_rename_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    lib = native.library()
    assert lib is not None and lib.kbit_abi() == native.ABI
    built = list((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left behind
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_compile", lambda *a: pytest.fail("rebuilt a cached library"))
    assert native.library() is not None


@pytest.mark.parametrize(
    ("name", "k"),
    [("int", 8), ("dynamic", 8), ("float", 8), ("fp8_e5m2", 8), ("normal", 6), ("nf4", 4),
     ("quantile", 8)],
)  # fmt: skip
def test_native_codes_at_every_threshold_equal_searchsorted(name, k):
    """y exactly on, just above and just below every decision threshold, every code, +-0 and
    +-1: with an fp32 scale of exactly 1 the kernel sees these y unchanged."""
    from harness.kernels import torch_ops

    code = codebook(name, k, torch.randn(5000, generator=torch.Generator().manual_seed(k)))
    thr = torch_ops.thresholds(code)[:-1]
    y = threshold_probes(thr, code, 200_000)
    q = quantize_blockwise(y, code, None, scale_format="fp32")
    assert float(q.scales[0]) == 1.0
    assert torch.equal(q.codes.long(), torch.searchsorted(thr, y, side="left"))


def test_kernels_run_in_a_forked_child():
    """A child forked after the thread pool started must not wait on the parent's threads.

    The child only quantizes (its torch ops there are too small to go parallel): torch's own
    intra-op pool can hang in a forked child, which is not what this tests.
    """
    import multiprocessing

    x = torch.randn(512, 256)  # large enough for kbit's pool
    expected = fake_quantize(x, "int", 4, 64)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_fake_int4_as_numpy, (x,)).get(timeout=60)
    assert torch.equal(torch.from_numpy(got), expected)


def _fake_int4_as_numpy(x):
    """numpy, not a tensor: torch pickles tensors across processes through shared fds."""
    return fake_quantize(x, "int", 4, 64).numpy()


@pytest.mark.parametrize(
    ("name", "k", "block", "fmt"),
    [
        ("e2m1", 4, 32, "mx"),
        ("fp6_e3m2", 6, 32, "mx"),
        ("int", 8, 32, "mx"),
        ("e2m1", 4, 16, "nvfp4"),
    ],
)
def test_mx_and_nvfp4_default_path_equals_eager(name, k, block, fmt):
    """mx / nvfp4 quantize on the torch path even on the CPU (the C kernels do not implement
    them); their QuantizedTensors dequantize through the native kernels, bit-identically."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(40, 96, generator=g).to(torch.bfloat16).to(torch.float32)  # + a tail block
    x = torch.cat([x.view(-1), torch.randn(7, generator=g)])
    code = codebook(name, k)
    ref = quantize_blockwise(x, code, block, scale_format=fmt, compile=False)
    nat = quantize_blockwise(x, code, block, scale_format=fmt)
    assert torch.equal(nat.codes, ref.codes) and torch.equal(nat.scales, ref.scales)
    deq = dequantize_blockwise(nat)
    assert torch.equal(deq, dequantize_blockwise(ref, compile=False))
    assert torch.equal(deq, fake_quantize(x, name, k, block, scale_format=fmt))
