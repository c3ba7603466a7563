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
