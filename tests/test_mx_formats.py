"""MX and NVFP4 (scale_format='mx' / 'nvfp4') against torchao's reference implementations.

torchao (a dev-only dependency) quantizes with ``MXTensor.to_mx(x, elem, 32)`` and
``NVFP4Tensor.to_nvfp4(x, per_tensor_scale=...)``; kbit must dequantize to exactly the same
float32 values (max abs difference 0). MXINT8 is not in torchao 0.18, so it is checked
against a brute-force statement of the OCP rule. See docs/dtypes.md, "MX and NVFP4".
"""

from __future__ import annotations

import pytest
import torch
from zoo_fixtures import nano_zoo  # noqa: F401  (session fixture, requested by name below)

from harness.dtypes import codebook
from harness.quantize import dequantize_blockwise, fake_quantize, quantize_blockwise

mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")


def ocp_fp8_code(dtype: torch.dtype) -> torch.Tensor:
    """The OCP FP8 codebook (every finite value of torch's float8 dtype), normalised.

    kbit's float family has no NaN/inf encodings (``fp8_e4m3`` tops out at 480, not 448), so
    the MXFP8 tests pass these codebooks to quantize_blockwise directly.
    """
    v = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)
    v = torch.unique(v[torch.isfinite(v)])
    return (v.double() / v.max()).to(torch.float32)


# id -> (kbit: (dtype, bits, overrides) or an explicit codebook, torchao element dtype)
MX = {
    "mxfp4": (("e2m1", 4), torch.float4_e2m1fn_x2),
    "mxfp6_e3m2": (("fp6_e3m2", 6), "fp6_e3m2"),
    "mxfp6_e2m3": (("fp6_e2m3", 6), "fp6_e2m3"),
    "mxfp8_e4m3": (("fp8_e4m3_ocp", 8), torch.float8_e4m3fn),
    "mxfp8_e5m2": (("fp8_e5m2_ocp", 8), torch.float8_e5m2),
}


@pytest.mark.parametrize("name", ["fp8_e4m3_ocp", "fp8_e5m2_ocp"])
def test_ocp_fp8_entries_are_torchs_finite_values(name):
    """The OCP FP8 entries hold exactly the finite values of torch's float8 dtypes."""
    dtype = {"fp8_e4m3_ocp": torch.float8_e4m3fn, "fp8_e5m2_ocp": torch.float8_e5m2}[name]
    assert torch.equal(codebook(name, 8), ocp_fp8_code(dtype))


def weights(kind: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "zeros_outliers":
        flat = x.view(-1)
        flat[:64] = 0.0  # two all-zero MX blocks (four NVFP4 blocks)
        flat[100:116] = 0.0
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=g)
        flat[idx] *= 50.0  # outliers
        flat[200] = -1e4
    elif kind == "heavy_tailed":  # Student-t with 2 degrees of freedom: weights with long tails
        u = torch.randn(shape, generator=g).square() + torch.randn(shape, generator=g).square()
        x = x / (u / 2).sqrt() * 0.02
    elif kind == "bf16":  # bf16 weights: few mantissa bits, so many exact rounding ties
        x = (x * 0.05).to(torch.bfloat16).to(torch.float32)
    elif kind == "ties":  # every value an exact midpoint of a 3-bit-mantissa grid, both signs
        m = torch.randint(0, 16, shape, generator=g).to(torch.float32) + 0.5
        e = torch.randint(-4, 4, shape, generator=g).to(torch.float32)
        s = torch.randint(0, 2, shape, generator=g).to(torch.float32) * 2 - 1
        x = s * m * torch.exp2(e) / 8
    return x.contiguous()


KINDS = ["normal", "zeros_outliers", "heavy_tailed", "bf16", "ties"]
SHAPES = [(512, 512), (64, 96), (3, 8, 128)]


def kbit_mx(x: torch.Tensor, spec, compile=None) -> torch.Tensor:
    if isinstance(spec, torch.dtype):
        q = quantize_blockwise(x, ocp_fp8_code(spec), 32, scale_format="mx", compile=compile)
        return dequantize_blockwise(q, compile=compile)
    name, bits = spec
    return fake_quantize(x, name, bits, 32, scale_format="mx", compile=compile)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", list(MX))
def test_mx_equals_torchao(fmt, kind, shape):
    spec, elem = MX[fmt]
    x = weights(kind, shape)
    ref = mx_tensor.MXTensor.to_mx(x, elem, block_size=32).dequantize(torch.float32)
    got = kbit_mx(x, spec)
    assert (got - ref).abs().max().item() == 0.0
    assert torch.equal(got, ref)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e3m2", "mxfp6_e2m3"])
def test_mx_quantize_dequantize_equals_fake_quantize(fmt):
    (name, bits), elem = MX[fmt]
    x = weights("bf16", (96, 64), seed=3)
    q = quantize_blockwise(x, codebook(name, bits), 32, scale_format="mx")
    ref = mx_tensor.MXTensor.to_mx(x, elem, block_size=32).dequantize(torch.float32)
    assert torch.equal(dequantize_blockwise(q), ref)
    assert torch.equal(fake_quantize(x, name, bits, 32, scale_format="mx"), ref)
    # the stored scale is the OCP scale times the element max: X * 6 for E2M1, X * 28 / 7.5
    scale = mx_tensor.MXTensor.to_mx(x, elem, block_size=32).scale.view(torch.uint8)
    x_ocp = torch.exp2(scale.to(torch.float32).view(-1) - 127)
    max_elem = {"mxfp4": 6.0, "mxfp6_e3m2": 28.0, "mxfp6_e2m3": 7.5}[fmt]
    assert torch.equal(q.scales, x_ocp * max_elem)


@pytest.mark.parametrize("fmt", list(MX))
def test_mx_paths_are_bit_identical(fmt):
    """Eager torch, torch.compile and the default path (torch on the CPU for quantizing,
    the native kernels for dequantizing) give the same codes, scales and values."""
    spec, _ = MX[fmt]
    code = ocp_fp8_code(spec) if isinstance(spec, torch.dtype) else codebook(*spec)
    x = weights("zeros_outliers", (64, 256), seed=1)
    qs = [
        quantize_blockwise(x, code, 32, scale_format="mx", compile=c) for c in (False, True, None)
    ]
    for q in qs[1:]:
        assert torch.equal(q.codes, qs[0].codes)
        assert torch.equal(q.scales, qs[0].scales)
    deq = [dequantize_blockwise(qs[0], compile=c) for c in (False, True, None)]
    assert torch.equal(deq[0], deq[1]) and torch.equal(deq[0], deq[2])
    assert torch.equal(kbit_mx(x, spec, compile=True), deq[0])


def test_kbit_fp8_e4m3_entry_differs_only_where_ocp_saturates():
    """The shipped ``fp8_e4m3`` entry has every bit pattern finite (max 480). Under the MX
    rule the block max lands in [256, 512): OCP E4M3 saturates anything above 448 to 448,
    kbit's codebook rounds [464, 496) to 480 and saturates at 480. Those are the only
    differences; everything else is exact."""
    x = weights("normal", (512, 512))
    ref = mx_tensor.MXTensor.to_mx(x, torch.float8_e4m3fn, 32).dequantize(torch.float32)
    got = fake_quantize(x, "fp8_e4m3", 8, 32, scale_format="mx")
    scale = ref.view(-1, 32).abs().amax(1, keepdim=True) / 448  # the block's X (max is 448 X)
    diff = (got != ref).view(-1, 32)
    assert diff.any()
    assert torch.equal(ref.view(-1, 32).abs()[diff], (448 * scale.expand(-1, 32))[diff])
    assert torch.equal(got.view(-1, 32).abs()[diff], (480 * scale.expand(-1, 32))[diff])


def mxint8_reference(x: torch.Tensor) -> torch.Tensor:
    """OCP MXINT8, written out: X = 2^floor(log2 amax) (INT8 is 1.6 fixed point, emax 0);
    element = round-half-even(x / X * 64) saturated to [-127, 127], value = element / 64 * X.

    Tiny blocks follow torchao's E8M0 conventions for the other MX formats: floor(log2 amax)
    is amax's float32 exponent field (-127 for a zero or subnormal amax), the exponent is
    clamped to >= -127 (E8M0's smallest scale, the one stored), and elements are divided by
    max(X, 2^-126), the smallest normal float32.
    """
    xb = x.reshape(-1, 32).to(torch.float64)
    amax = xb.abs().amax(1, keepdim=True)
    field = (amax.to(torch.float32).view(torch.int32) >> 23) & 0xFF
    e = (field - 127).clamp(-127, 127).to(torch.float64)
    X = torch.exp2(e)
    q = torch.round(xb / torch.exp2(e.clamp(min=-126)) * 64).clamp(-127, 127)
    return (q / 64 * X).to(torch.float32).view(x.shape)


def tiny_blocks(exponent: int, seed: int = 0) -> torch.Tensor:
    """Blocks of 32 whose largest value is near 2^exponent (one block 2^-5 smaller, one all
    zero); exponents below -126 put whole blocks in float32's subnormal range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 96, generator=g) * 2.0**exponent
    x[1] *= 2.0**-5
    x[3, :32] = 0.0
    x[3, 32] = 2.0**exponent  # a block whose amax is exactly a power of two
    return x.contiguous()


TINY = [-90, -94, -95, -100, -110, -117, -120, -123, -125, -126, -127, -130, -140, -149]


@pytest.mark.parametrize("exponent", TINY)
@pytest.mark.parametrize("fmt", list(MX))
def test_mx_tiny_blocks_equal_torchao(fmt, exponent):
    """Blocks far below real weights (tiny activations): the E8M0 scale is clamped in the
    element's own units exactly as torchao 0.18 clamps it (issue 21: mxfp8_e5m2 differed for
    amax below 2^-94), on every path."""
    spec, elem = MX[fmt]
    x = tiny_blocks(exponent)
    ref = mx_tensor.MXTensor.to_mx(x, elem, block_size=32).dequantize(torch.float32)
    for compile in (False, None):
        assert torch.equal(kbit_mx(x, spec, compile=compile), ref), (fmt, exponent, compile)
    code = ocp_fp8_code(elem) if isinstance(spec, torch.dtype) else codebook(*spec)
    q = quantize_blockwise(x, code, 32, scale_format="mx")
    assert torch.equal(dequantize_blockwise(q), ref)
    # the stored scale is torchao's E8M0 scale (2^-127 included) times the element max
    scale = mx_tensor.MXTensor.to_mx(x, elem, block_size=32).scale.view(torch.uint8)
    x_ocp = torch.exp2(scale.to(torch.float64).view(-1) - 127)
    assert torch.equal(q.scales.to(torch.float64), x_ocp * ELEMENT_MAX[fmt])


ELEMENT_MAX = {"mxfp4": 6.0, "mxfp6_e3m2": 28.0, "mxfp6_e2m3": 7.5, "mxfp8_e4m3": 448.0,
               "mxfp8_e5m2": 57344.0}  # fmt: skip


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8_e5m2"])
def test_mx_tiny_blocks_compiled_equal_torchao(fmt):
    """torch.compile keeps float32 subnormal scales exact too."""
    spec, elem = MX[fmt]
    for exponent in (-100, -120, -127, -140):
        x = tiny_blocks(exponent, seed=2)
        ref = mx_tensor.MXTensor.to_mx(x, elem, block_size=32).dequantize(torch.float32)
        assert torch.equal(kbit_mx(x, spec, compile=True), ref), (fmt, exponent)


@pytest.mark.parametrize("exponent", TINY)
def test_mxint8_tiny_blocks_follow_the_ocp_rule(exponent):
    x = tiny_blocks(exponent)
    assert torch.equal(fake_quantize(x, "int", 8, 32, scale_format="mx"), mxint8_reference(x))


@pytest.mark.parametrize("kind", KINDS)
def test_mxint8_equals_ocp_rule(kind):
    x = weights(kind, (128, 256))
    assert torch.equal(fake_quantize(x, "int", 8, 32, scale_format="mx"), mxint8_reference(x))


def nvfp4_ref(x: torch.Tensor) -> torch.Tensor:
    pts = nvfp4_tensor.per_tensor_amax_to_scale(x.abs().amax())
    t = nvfp4_tensor.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=pts)
    return t.dequantize(torch.float32)


@pytest.mark.parametrize("shape", [(512, 512), (64, 96), (2, 16, 64)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_nvfp4_equals_torchao(kind, shape):
    x = weights(kind, shape)
    ref = nvfp4_ref(x)
    got = fake_quantize(x, "e2m1", 4, 16, scale_format="nvfp4")
    assert (got - ref).abs().max().item() == 0.0
    assert torch.equal(got, ref)
    q = quantize_blockwise(x, codebook("e2m1", 4), 16, scale_format="nvfp4")
    assert torch.equal(dequantize_blockwise(q), ref)
    pts = nvfp4_tensor.per_tensor_amax_to_scale(x.abs().amax())
    assert q.tensor_scale == pts.item()
    t = nvfp4_tensor.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=pts)
    assert torch.equal(q.scales, t.get_hp_scales().reshape(-1))  # pts * s8 per block


def test_nvfp4_exact_ties_round_to_even():
    """Tensor amax 2688 makes pts = 1; a block amax of 24 makes s8 = 4 and the reciprocal
    1/4 exact, so x / 4 hits every E2M1 midpoint exactly (both signs)."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    row = torch.cat([torch.tensor([24.0]), mids * 4, -mids * 4, torch.tensor([0.0])])
    x = torch.cat([row, torch.full((16,), 2688.0), -row]).view(3, 16)
    got = fake_quantize(x, "e2m1", 4, 16, scale_format="nvfp4")
    ref = nvfp4_ref(x)
    assert torch.equal(got, ref)
    even = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]) * 4  # ties to the even mantissa
    assert torch.equal(got[0, 1:8], even) and torch.equal(got[0, 8:15], -even)


def test_nvfp4_paths_are_bit_identical():
    x = weights("zeros_outliers", (64, 256), seed=2)
    code = codebook("e2m1", 4)
    qs = [quantize_blockwise(x, code, 16, scale_format="nvfp4", compile=c) for c in (False, True)]
    assert torch.equal(qs[0].codes, qs[1].codes) and torch.equal(qs[0].scales, qs[1].scales)
    deq = [dequantize_blockwise(qs[0], compile=c) for c in (False, True, None)]
    assert torch.equal(deq[0], deq[1]) and torch.equal(deq[0], deq[2])
    assert torch.equal(fake_quantize(x, "e2m1", 4, 16, scale_format="nvfp4", compile=True), deq[0])


def test_all_zero_tensor_stays_zero():
    """torchao's NVFP4 divides 0 by a zero tensor scale (NaN); kbit returns zeros."""
    x = torch.zeros(4, 32)
    assert torch.equal(fake_quantize(x, "e2m1", 4, 16, scale_format="nvfp4"), x)
    assert torch.equal(fake_quantize(x, "e2m1", 4, 32, scale_format="mx"), x)


def test_refusals():
    x = torch.randn(64)
    with pytest.raises(ValueError, match=r"nvfp4.*must be FP4 E2M1"):
        fake_quantize(x, "fp6_e3m2", 6, 16, scale_format="nvfp4")
    with pytest.raises(ValueError, match="not a float or int grid"):
        fake_quantize(x, "nf4", 4, 32, scale_format="mx")
    with pytest.raises(ValueError, match="centering=True with scale_format='mx'"):
        fake_quantize(x, "e2m1", 4, 32, scale_format="mx", centering=True)
    with pytest.raises(ValueError, match="scale_format='mx' with a data-dependent codebook"):
        fake_quantize(x, "quantile", 4, 32, scale_format="mx")
    with pytest.raises(ValueError, match="NaN or inf"):
        fake_quantize(torch.tensor([1.0, float("nan")] * 16), "e2m1", 4, 32, scale_format="mx")
    with pytest.raises(ValueError, match="NaN or inf"):
        fake_quantize(torch.tensor([1.0, float("inf")] * 8), "e2m1", 4, 16, scale_format="nvfp4")


# the one-word formats (conf/format/<name>.yaml) and the tuples the tests above check
FORMATS = {
    "mxfp4": ("e2m1", 4, 32, "mx"),
    "mxfp6_e3m2": ("fp6_e3m2", 6, 32, "mx"),
    "mxfp6_e2m3": ("fp6_e2m3", 6, 32, "mx"),
    "mxfp8_e4m3": ("fp8_e4m3_ocp", 8, 32, "mx"),
    "mxfp8_e5m2": ("fp8_e5m2_ocp", 8, 32, "mx"),
    "mxint8": ("int", 8, 32, "mx"),
    "nvfp4": ("e2m1", 4, 16, "nvfp4"),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_one_word_format_composes_to_its_tuple(name):
    """``kbit-run format=NAME`` selects the data type, k, block size and scale format at once."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.config.schema import register_schema

    conf = Path(__file__).resolve().parents[1] / "conf"
    assert sorted(p.stem for p in (conf / "format").glob("*.yaml")) == sorted(FORMATS)
    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["model=x", f"format={name}"])
    GlobalHydra.instance().clear()
    assert (cfg.dtype.name, cfg.bits, cfg.block_size, str(cfg.scale_format)) == FORMATS[name]


def test_format_bits_are_exact():
    """4.25 bits per weight for MX (8-bit scale per 32), 4.5 + 32 per tensor for NVFP4."""
    from harness.bits import QuantizedTensorInfo, total_model_bits

    n = 4096 * 4096
    for name, per_weight, per_tensor in [("mxfp4", 4.25, 0), ("mxint8", 8.25, 0),
                                         ("nvfp4", 4.5, 32)]:  # fmt: skip
        _, bits, block, scale = FORMATS[name]
        count = total_model_bits([QuantizedTensorInfo(n, bits, block, 0)], 0, scale_format=scale)
        assert count.total_bits == n * per_weight + per_tensor, name


@pytest.mark.slow  # the nano zoo family is trained once per session (~20 s)
def test_formats_equal_torchao_on_trained_weights(nano_zoo):  # noqa: F811
    """Real weights: every linear layer of a trained zoo model, MX formats and NVFP4."""
    from transformers import AutoModelForCausalLM

    from harness.models.loading import linear_weight, quantizable_modules

    folder = sorted(nano_zoo.values())[-1]
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    layers = [linear_weight(m).detach().float().contiguous()
              for m in quantizable_modules(model).values()]  # fmt: skip
    usable = [w for w in layers if w.shape[-1] % 32 == 0]
    assert usable
    for w in usable:
        for fmt, (spec, elem) in MX.items():
            ref = mx_tensor.MXTensor.to_mx(w, elem, block_size=32).dequantize(torch.float32)
            assert torch.equal(kbit_mx(w, spec), ref), fmt
        assert torch.equal(fake_quantize(w, "e2m1", 4, 16, scale_format="nvfp4"), nvfp4_ref(w))
