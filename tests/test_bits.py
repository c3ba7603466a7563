"""Bit accounting on hand-computed cases."""

from __future__ import annotations

import pytest

from harness.bits import QuantizedTensorInfo, total_model_bits


def test_k4_b64_fp16_is_4_25_bits_per_param():
    count = total_model_bits([(4096 * 4096, 4, 64)], 0)
    assert count.total_bits == 4096 * 4096 * 4 + (4096 * 4096 // 64) * 16
    assert count.bits_per_param == 4.25
    assert count.n_params == 4096 * 4096


def test_mixed_model_by_hand():
    # 1000 params at k=3, B=64 (16 blocks, tail counted in full), bf16 scales + centering;
    # a 128-element tensor at k=8 with one scale per tensor; 500 unquantized; 20 outliers.
    count = total_model_bits(
        [QuantizedTensorInfo(1000, 3, 64), (128, 8, None)],
        500,
        scale_format="bf16",
        centering=True,
        outlier_params=20,
    )
    expected = (1000 * 3 + 16 * 32) + (128 * 8 + 1 * 32) + 16 * 520
    assert count.total_bits == expected
    assert count.n_params == 1648
    assert count.bits_per_param == pytest.approx(expected / 1648)


@pytest.mark.parametrize(
    ("fmt", "bpp"), [("fp16", 8.25), ("bf16", 8.25), ("fp32", 8.5), ("e8m0", 8.125)]
)
def test_scale_formats(fmt, bpp):
    assert total_model_bits([(6400, 8, 64)], 0, scale_format=fmt).bits_per_param == bpp


@pytest.mark.parametrize(
    ("k", "block", "fmt", "bpp"),
    [
        (4, 32, "mx", 4.25),  # MXFP4: 4 + 8 / 32
        (6, 32, "mx", 6.25),  # MXFP6
        (8, 32, "mx", 8.25),  # MXFP8, MXINT8
        (4, 16, "nvfp4", 4.5 + 32 / 6400),  # NVFP4: 4 + 8 / 16, + one FP32 per tensor
    ],
)
def test_mx_and_nvfp4_bits(k, block, fmt, bpp):
    assert total_model_bits([(6400, k, block)], 0, scale_format=fmt).bits_per_param == bpp


def test_nvfp4_counts_one_fp32_scale_per_tensor_by_hand():
    # two tensors: 4096 x 4096 and a 1000-element one (63 blocks of 16, tail counted in full)
    count = total_model_bits([(4096 * 4096, 4, 16), (1000, 4, 16)], 10, scale_format="nvfp4")
    t1 = 4096 * 4096 * 4 + (4096 * 4096 // 16) * 8 + 32
    t2 = 1000 * 4 + 63 * 8 + 32
    assert count.total_bits == t1 + t2 + 10 * 16
    # MX: 8 bits per 32-element block, no per-tensor term; e8m0 unchanged at 8 per block
    mx = total_model_bits([(4096 * 4096, 4, 32), (1000, 4, 32)], 0, scale_format="mx")
    assert mx.total_bits == 4096 * 4096 * 4 + 4096 * 4096 // 32 * 8 + 1000 * 4 + 32 * 8
    e8 = total_model_bits([(4096 * 4096, 4, 32), (1000, 4, 32)], 0, scale_format="e8m0")
    assert e8.total_bits == mx.total_bits


@pytest.mark.parametrize("fmt", ["e8m0", "mx", "nvfp4"])
def test_no_centering_with_exponent_scales(fmt):
    with pytest.raises(ValueError, match=f"centering=True with scale_format='{fmt}'"):
        total_model_bits([(64, 4, 16)], 0, scale_format=fmt, centering=True)


def test_per_tensor_codebook_is_counted():
    # quantile at k=4 on 1024 elements, B=256: 4 + 4*16/1024 + 16*16/1024
    count = total_model_bits([QuantizedTensorInfo(1024, 4, 256, codebook_size=16)], 0)
    assert count.total_bits == 1024 * 4 + 4 * 16 + 16 * 16


def test_unquantized_only_is_16_bits():
    assert total_model_bits([], 1234).bits_per_param == 16.0


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (([(10, 4, 0)], 0), {}, "block_size=0"),
        (([(10, 0, 64)], 0), {}, "bits=0"),
        (([], 0), {}, "no parameters"),
        (([(10, 4, 64)], 0), {"scale_format": "fp8"}, "scale_format='fp8'"),
        (([(10, 4, 64)], -1), {}, "unquantized_params=-1"),
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        total_model_bits(*args, **kwargs)
