"""Data types against independent references: published tables, bit-pattern enumeration,
bitsandbytes, torch's own float8 types, and torch.quantile."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from harness.dtypes import bad_entries, check, codebook, entries, legal_bits
from harness.dtypes.quantile import exact_quantiles

NF4_QLORA = [
    -1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0,
]  # fmt: skip

ENTRY_BITS = [(name, k) for name in sorted(entries()) for k in legal_bits(name)]


def decode_float(pattern: int, e_bits: int, m_bits: int, bias: int) -> float:
    """Brute-force decoder of one sign/E/M bit pattern (subnormals, every pattern finite)."""
    sign = -1.0 if pattern >> (e_bits + m_bits) & 1 else 1.0
    e = pattern >> m_bits & (2**e_bits - 1)
    m = pattern & (2**m_bits - 1)
    if e == 0:
        return sign * 2.0 ** (1 - bias) * m / 2**m_bits
    return sign * 2.0 ** (e - bias) * (1 + m / 2**m_bits)


def enumerate_float(e_bits: int, m_bits: int, bias: int | None = None) -> torch.Tensor:
    bias = 2 ** (e_bits - 1) - 1 if bias is None else bias
    k = 1 + e_bits + m_bits
    values = sorted({decode_float(p, e_bits, m_bits, bias) for p in range(2**k)})
    t = torch.tensor(values, dtype=torch.float64)
    return (t / t.abs().max()).to(torch.float32)


def test_nf4_equals_published_qlora_table():
    torch.testing.assert_close(codebook("nf4", 4), torch.tensor(NF4_QLORA), atol=1e-6, rtol=0)


def test_normal_rule_at_k4_is_nf4():
    torch.testing.assert_close(codebook("normal", 4), torch.tensor(NF4_QLORA), atol=1e-6, rtol=0)


def test_e2m1_equals_ocp_fp4():
    mags = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    ref = torch.tensor(sorted({s * m for m in mags for s in (1, -1)}), dtype=torch.float32) / 6
    assert torch.equal(codebook("e2m1", 4), ref)


@pytest.mark.parametrize("k", range(2, 9))
def test_int_is_symmetric_and_evenly_spaced(k):
    code = codebook("int", k)
    assert code.numel() == 2**k - 1
    assert torch.equal(code, -code.flip(0))
    gaps = code.diff().double()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 2 / (2**k - 2)), rtol=0, atol=1e-7)


@pytest.mark.parametrize("k", range(2, 9))
def test_int_asym_uses_all_codes(k):
    code = codebook("int_asym", k)
    ref = torch.tensor([i / 2 ** (k - 1) for i in range(-(2 ** (k - 1)), 2 ** (k - 1))])
    assert torch.equal(code, ref)


FLOAT_SPLITS = [(e, k - 1 - e) for k in range(2, 9) for e in range(1, k)]


@pytest.mark.parametrize(
    ("e_bits", "m_bits"), FLOAT_SPLITS, ids=[f"E{e}M{m}" for e, m in FLOAT_SPLITS]
)
def test_float_equals_bit_pattern_enumeration(e_bits, m_bits):
    k = 1 + e_bits + m_bits
    got = codebook("float", k, exponent_bits=e_bits, mantissa_bits=m_bits)
    torch.testing.assert_close(got, enumerate_float(e_bits, m_bits), rtol=0, atol=0)


@pytest.mark.parametrize(("k", "e_bits"), [(3, 2), (4, 2), (5, 3), (6, 3), (7, 4), (8, 4)])
def test_float_default_exponent_rule_of_the_paper(k, e_bits):
    assert torch.equal(codebook("float", k), enumerate_float(e_bits, k - 1 - e_bits))


def test_float_bias_cancels_under_absmax_normalisation():
    assert torch.equal(codebook("float", 6, bias=0), codebook("float", 6, bias=7))
    assert torch.equal(codebook("float", 6, bias=0), enumerate_float(3, 2, bias=0))


@pytest.mark.parametrize(
    ("name", "torch_dtype", "top"),
    [("fp8_e4m3", torch.float8_e4m3fn, 480.0), ("fp8_e5m2", torch.float8_e5m2, None)],
)
def test_fp8_shapes_match_torch_float8_plus_the_special_codes(name, torch_dtype, top):
    patterns = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch_dtype).float()
    finite = patterns[torch.isfinite(patterns)]
    e_bits = 4 if name == "fp8_e4m3" else 5
    bias = 2 ** (e_bits - 1) - 1
    raw = {decode_float(p, e_bits, 7 - e_bits, bias) for p in range(256)}
    # torch reserves the NaN (and e5m2 inf) patterns; ours uses them as finite values.
    assert set(finite.double().unique().tolist()) <= raw
    if top is not None:
        assert max(raw) == top and finite.max().item() == 448.0
    assert torch.equal(codebook(name, 8), enumerate_float(e_bits, 7 - e_bits))


def test_dynamic_k8_equals_bitsandbytes():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(codebook("dynamic", 8), bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("k", range(2, 8))
def test_dynamic_small_k_equals_bitsandbytes_generalisation(k):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    ref = bnb_functional.create_dynamic_map(signed=True, max_exponent_bits=k - 1, total_bits=k)
    assert torch.equal(codebook("dynamic", k), ref.unique())


@pytest.mark.parametrize(("name", "k"), ENTRY_BITS, ids=[f"{n}-k{k}" for n, k in ENTRY_BITS])
def test_every_entry_at_every_legal_k_is_a_valid_codebook(name, k):
    tensor = torch.randn(10_000, generator=torch.Generator().manual_seed(k))
    code = codebook(name, k, tensor)
    assert code.dtype == torch.float32
    assert code.numel() <= 2**k
    assert bool((code.diff() > 0).all()), "sorted and unique"
    assert code.abs().max().item() == 1.0
    check(name, k)


@pytest.mark.parametrize("n", [1, 2, 17, 1000, 4097])
def test_exact_quantiles_match_torch_quantile(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
    scale = float(x.abs().max())
    probs = torch.arange(18, dtype=torch.float64) / 17
    ref = torch.quantile((x / scale).double(), probs)
    torch.testing.assert_close(exact_quantiles(x, 17, 17, scale), ref, rtol=0, atol=1e-12)


def quantile_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """The issue's formula (i = 1..2^k-1) plus zero, torch.quantile on normalised values."""
    den = 2**k + 1
    q = torch.quantile((x / x.abs().max()).double(), torch.arange(den, dtype=torch.float64) / den)
    mid = torch.tensor(
        [(q[i] + q[i + 1]).item() / 2 for i in range(1, 2**k)] + [0.0], dtype=torch.float64
    )
    return (mid / mid.abs().max()).float().unique()


@pytest.mark.parametrize("k", [2, 4, 8])
def test_quantile_exact_equals_formula(k):
    x = torch.randn(50_001, generator=torch.Generator().manual_seed(k))
    torch.testing.assert_close(
        codebook("quantile", k, x), quantile_reference(x, k), rtol=0, atol=1e-6
    )


def test_quantile_approx_is_close_to_exact_and_reproducible():
    x = torch.randn(3_000_000, generator=torch.Generator().manual_seed(0))
    approx = codebook("quantile_approx", 4, x)
    assert torch.equal(approx, codebook("quantile_approx", 4, x))
    torch.testing.assert_close(approx, codebook("quantile", 4, x), rtol=0, atol=0.01)


@pytest.mark.slow
def test_quantile_exact_beyond_torch_quantile_limit():
    n = 100_000_003  # > 16M: torch.quantile refuses it
    x = torch.linspace(-2.0, 2.0, n).roll(n // 3)  # order statistics are known in closed form
    den = 2**4 + 1
    got = exact_quantiles(x, den - 1, den, 2.0)
    ranks = [i * (n - 1) / den for i in range(den)]
    ref = torch.tensor([(-2.0 + 4.0 * r / (n - 1)) / 2.0 for r in ranks], dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert codebook("quantile_approx", 4, x).numel() == 16
    del x


# ------------------------------------------------------------------------ bad input
def test_unknown_dtype_names_known_and_closest():
    with pytest.raises(ValueError, match=r"dtype='nf5'.*allowed: .*'nf4'.*did you mean 'nf4'"):
        codebook("nf5", 4)


@pytest.mark.parametrize(
    ("name", "k"), [("int", 1), ("int", 9), ("dynamic", 16), ("nf4", 3), ("e2m1", 8)]
)
def test_bits_outside_range(name, k):
    with pytest.raises(ValueError, match=rf"bits={k}.*allowed|bits={k}.*only exists"):
        codebook(name, k)


def test_exponent_plus_mantissa_must_fit_k():
    with pytest.raises(
        ValueError,
        match=r"exponent_bits=3, mantissa_bits=3 .*bits=6.*1 \+ exponent_bits \+ mantissa_bits == bits",
    ):
        codebook("float", 6, exponent_bits=3, mantissa_bits=3)
    with pytest.raises(ValueError, match="exponent_bits=8"):
        check("float", 4, exponent_bits=8)


def test_unknown_override_field_names_the_closest():
    with pytest.raises(ValueError, match=r"override='exponent_bitz'.*did you mean 'exponent_bits'"):
        codebook("float", 4, exponent_bitz=2)


def test_quantile_needs_a_tensor():
    with pytest.raises(ValueError, match="tensor=None"):
        codebook("quantile", 4)


def test_legal_bits():
    assert legal_bits("nf4") == [4]
    assert legal_bits("int") == list(range(2, 9))
    assert legal_bits("float", exponent_bits=4) == [5, 6, 7, 8]


def test_new_type_is_one_yaml_file(tmp_path, monkeypatch):
    (tmp_path / "e3m2.yaml").write_text(
        "defaults:\n  - dtype_schema\n  - _self_\nname: e3m2\nfamily: float\nbits: 6\nexponent_bits: 3\n"
    )
    monkeypatch.setenv("KBIT_DTYPE_DIR", str(tmp_path))
    assert torch.equal(codebook("e3m2", 6), enumerate_float(3, 2))
    assert legal_bits("e3m2") == [6]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "name: bad\nfamily: int\nbitz: 4\n",
            r"bad.yaml: field='bitz' is unknown.*did you mean 'bits'",
        ),
        ("name: bad\nfamily: int\nbits: four\n", r"bad.yaml: field 'bits'.*four.*allowed: int"),
        (
            "name: bad\nfamily: int\nsigned: maybe\n",
            r"bad.yaml: field 'signed'.*maybe.*allowed: bool",
        ),
        ("name: bad\nbits: 4\n", r"bad.yaml: field 'family'.*[Mm]issing"),
        ("name: [bad\n", r"bad.yaml: not readable YAML"),
        ("- a list\n", r"bad.yaml: must be a mapping"),
        ("name: other\nfamily: int\n", "file stem"),
    ],
)
def test_bad_yaml_entry_fails_only_when_used(tmp_path, text, match):
    """A bad file spoils its own name, not its siblings, and its error names file and field."""
    (tmp_path / "bad.yaml").write_text(text)
    (tmp_path / "good.yaml").write_text("name: good\nfamily: int\nbits: 4\n")
    assert torch.equal(codebook("good", 4, dtype_dir=tmp_path), codebook("int", 4))
    assert "bad" not in entries(tmp_path) and "good" in entries(tmp_path)
    assert list(bad_entries(tmp_path)) == ["bad"]
    assert "\n" not in bad_entries(tmp_path)["bad"]
    with pytest.raises(ValueError, match=match):
        codebook("bad", 4, dtype_dir=tmp_path)
    assert bad_entries() == {}  # the shipped entries are all good


def test_an_entry_cannot_shadow_another(tmp_path, monkeypatch):
    """Both kbit-run (Hydra) and codebook() must read one definition; two are refused."""
    (tmp_path / "nf4.yaml").write_text("name: nf4\nfamily: normal\nbits: 4\noffset: 0.9\n")
    monkeypatch.setenv("KBIT_DTYPE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"dtype 'nf4' is defined twice: .*conf/dtype/nf4.yaml"):
        codebook("nf4", 4)
    assert "nf4" in bad_entries() and "nf4" not in entries()
    assert codebook("int", 4).numel() == 15  # the other entries are untouched


def test_every_k_of_every_family_has_at_most_2k_values_and_zero_where_expected():
    for name, k in itertools.product(
        ["int", "int_asym", "float", "dynamic", "normal"], range(2, 9)
    ):
        assert 0.0 in codebook(name, k).tolist(), (name, k)
    assert math.isclose(codebook("dynamic", 8)[0].item(), -0.9921875, rel_tol=1e-2)
