"""The scale-format registry is the one list every consumer reads.

Independent references: the storage widths of the IEEE/bfloat16/E8M0/E4M3 formats (published
format definitions, typed here), torch's own casts for the rounding, and the published bits per
weight of MXFP4 (4.25) and NVFP4 (4.5 + 32 bits per tensor).
"""

from __future__ import annotations

import pytest
import torch

from harness.kernels import scale_formats
from harness.kernels.scale_formats import SCALE_FORMATS, ScaleFormatSpec

# bits of one stored scale by the formats' definitions: IEEE binary16 / bfloat16 / binary32,
# OCP E8M0 (8-bit exponent), NVFP4's E4M3 block scale
PUBLISHED_SCALE_BITS = {"fp16": 16, "bf16": 16, "fp32": 32, "e8m0": 8, "mx": 8, "nvfp4": 8}


def test_registry_lists_the_published_formats_and_widths():
    assert {n: f.bits for n, f in SCALE_FORMATS.items()} == PUBLISHED_SCALE_BITS
    assert scale_formats.element_formats() == ("mx", "nvfp4")
    assert set(scale_formats.mean_formats()) == {"fp16", "bf16", "fp32"}


def test_config_enum_is_derived_from_the_registry():
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    from harness.config.schema import CellConfig, ScaleFormat

    assert [m.value for m in ScaleFormat] == list(SCALE_FORMATS)
    cfg = OmegaConf.structured(CellConfig)
    with pytest.raises(ValidationError, match="fp17"):
        cfg.scale_format = "fp17"


def test_bit_count_reads_the_registry():
    from harness.bits import SCALE_BITS, TENSOR_SCALE_BITS, total_model_bits

    assert SCALE_BITS == PUBLISHED_SCALE_BITS and TENSOR_SCALE_BITS == {"nvfp4": 32}
    n = 4096 * 4096
    mxfp4 = total_model_bits([(n, 4, 32)], 0, scale_format="mx")
    assert mxfp4.bits_per_param == 4.25  # OCP MXFP4
    nvfp4 = total_model_bits([(n, 4, 16)], 0, scale_format="nvfp4")
    assert nvfp4.total_bits == n * 4.5 + 32  # NVFP4: 4.5 bits/param + an FP32 tensor scale


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("fp16", lambda v: v.to(torch.float16).to(torch.float32)),
        ("bf16", lambda v: v.to(torch.bfloat16).to(torch.float32)),
        ("fp32", lambda v: v),
        # the smallest power of two >= v (frexp: v = m * 2^e with 0.5 <= m < 1)
        (
            "e8m0",
            lambda v: torch.where(
                torch.frexp(v).mantissa == 0.5,
                v,
                torch.ldexp(torch.ones_like(v), torch.frexp(v).exponent),
            ),
        ),
    ],
)
def test_rounding_follows_each_formats_rule(name, reference):
    from harness.kernels.torch_ops import round_to_format

    values = torch.tensor([0.3, 1.0, 1.5, 3.0001, 1e-3, 123.456, 2.0**-20])
    assert torch.equal(round_to_format(values, name), reference(values))


def test_element_formats_have_no_block_rounding():
    from harness.kernels.torch_ops import round_to_format

    with pytest.raises(ValueError, match="element"):
        round_to_format(torch.ones(2), "mx")


def test_native_ids_and_hqq_dtypes_come_from_the_registry():
    from harness.kernels.native import SCALE_FORMAT_IDS
    from harness.quantize.methods.hqq import SCALE_DTYPES

    assert set(SCALE_FORMAT_IDS) == {n for n, f in SCALE_FORMATS.items() if not f.element_grid}
    assert len(set(SCALE_FORMAT_IDS.values())) == len(SCALE_FORMAT_IDS)
    want = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    assert want == SCALE_DTYPES


@pytest.mark.parametrize("name", list(SCALE_FORMATS))
def test_centering_rule_matches_what_the_quantizer_does(name):
    """The registry's rule and the quantizer agree: a format refuses centering exactly when
    its spec says it cannot store a mean (and the message says so in one line)."""
    from harness.quantize import fake_quantize

    dtype = "e2m1" if name == "nvfp4" else "int"
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    problem = scale_formats.centering_problem(name, True)
    if SCALE_FORMATS[name].stores_mean:
        assert problem == ""
        fake_quantize(x, dtype, 4, 16, scale_format=name, centering=True)
    else:
        assert "\n" not in problem and "allowed" in problem
        with pytest.raises(ValueError) as err:
            fake_quantize(x, dtype, 4, 16, scale_format=name, centering=True)
        assert str(err.value) == problem


def test_a_new_format_is_one_entry(monkeypatch):
    """A format added to the registry is counted and rounded without touching a consumer."""
    from harness.bits import total_model_bits
    from harness.kernels.torch_ops import round_to_format

    spec = ScaleFormatSpec("bf16_wide", 24, "bfloat16", True, summary="toy: bf16 rounding, 24 bits")
    monkeypatch.setitem(SCALE_FORMATS, "bf16_wide", spec)
    values = torch.tensor([1.2345, 0.1])
    assert torch.equal(round_to_format(values, "bf16_wide"), values.to(torch.bfloat16).float())
    count = total_model_bits([(64, 4, 64)], 0, scale_format="bf16_wide", centering=True)
    assert count.total_bits == 64 * 4 + 2 * 24  # k per weight + a 24-bit scale and mean
