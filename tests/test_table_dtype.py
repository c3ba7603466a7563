# ruff: noqa: F811  (the session fixture nano_zoo is imported, then requested by name)
"""``family: table``: lookup-table data types declared in YAML, checked against published tables.

The references are the tables as published, typed in here from their source (not read from
conf/dtype): bitsandbytes ``bitsandbytes/functional.py``, ``get_4bit_type`` (commit
01327aa0119fa503ea16322dd72f69f202e4502e of bitsandbytes-foundation/bitsandbytes), which
holds NF4 (QLoRA, Dettmers et al. 2023, arXiv:2305.14314), its FP4, and AF4 for block size 64
(Yoshida 2023, "NF4 Isn't Information Theoretically Optimal (and that's Good)",
arXiv:2306.06965). ``get_4bit_type`` itself divides each table by its largest magnitude, as
the table family does. Quantization is checked against a brute-force nearest value.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from zoo_fixtures import nano_zoo, point_env_at_zoo  # noqa: F401  (session fixture)

from harness.dtypes import check, clear_cache, codebook, entries, is_data_dependent, legal_bits

BIN = Path(sys.executable).parent

# bitsandbytes functional.py get_4bit_type("nf4"), in its order.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]  # fmt: skip
# get_4bit_type("fp4"): codes 0b0000..0b1111 (sign bit first); +0 and -0 are both codes.
BNB_FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
           -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]  # fmt: skip
# get_4bit_type("af4", blocksize=64), before its [::-1].
BNB_AF4_64 = [-1.0, -0.69441008, -0.51243739, -0.3736951, -0.25607552, -0.14982478,
              -0.04934812, 0.0, 0.04273164, 0.12934483, 0.21961274, 0.31675666, 0.42563882,
              0.55496234, 0.72424863, 1.0]  # fmt: skip


def published(values: list[float]) -> torch.Tensor:
    """A published table as the harness stores a codebook: its distinct values (+0 = -0),
    divided by the largest magnitude (float64 first, as get_4bit_type's float32 division
    gives the same float32 values for these tables), sorted, float32."""
    distinct = sorted({float(v) + 0.0 for v in values})
    top = max(abs(v) for v in distinct)
    return torch.tensor([v / top for v in distinct], dtype=torch.float64).to(torch.float32)


@pytest.mark.parametrize(
    ("name", "table", "n"),
    [("af4", BNB_AF4_64, 16), ("fp4_bnb", BNB_FP4, 15), ("nf4_table", BNB_NF4, 16)],
)
def test_shipped_tables_equal_the_published_values(name, table, n):
    got = codebook(name, 4)
    assert got.dtype == torch.float32 and got.numel() == n
    assert torch.equal(got, published(table))
    assert entries()[name].family == "table" and legal_bits(name) == [4]
    assert not is_data_dependent(name)  # a shared constant, like nf4


def test_fp4_bnb_is_e2m1_with_a_sixteenth_subnormal():
    """An independent reading of bitsandbytes' FP4 comment (0b001 = 0.0625, then 2, 3, 4, 6, 8,
    12): magnitudes {0, 1/16} U {2^e * (1 + m/2) : e = 1..3, m = 0, 1}, over 12."""
    mags = {0.0, 0.0625} | {2.0**e * (1 + m / 2) for e in (1, 2, 3) for m in (0, 1)}
    values = sorted({s * v / 12 for v in mags for s in (1, -1)})
    assert torch.allclose(
        codebook("fp4_bnb", 4).double(), torch.tensor(values, dtype=torch.float64), atol=1e-7
    )


def test_nf4_table_equals_the_normal_family_nf4():
    """The published NF4 table and the harness's computed NF4 (family normal) agree to float32
    rounding: two independent routes to the same data type."""
    assert (codebook("nf4_table", 4) - codebook("nf4", 4)).abs().max() < 2e-7


def nearest_reference(x: torch.Tensor, code: torch.Tensor, block: int) -> torch.Tensor:
    """Brute force: per block, scale = max |x| (fp32), each value to the nearest code point."""
    blocks = x.double().reshape(-1, block)
    scale = blocks.abs().amax(dim=1, keepdim=True)
    y = blocks / scale
    idx = (y.unsqueeze(-1) - code.double()).abs().argmin(dim=-1)
    return (code.double()[idx] * scale).reshape(x.shape)


@pytest.mark.parametrize("name", ["af4", "fp4_bnb", "nf4_table"])
def test_quantization_picks_the_nearest_table_value(name):
    from harness.quantize.blockwise import fake_quantize

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=gen)
    got = fake_quantize(x, name, 4, 64, scale_format="fp32")
    ref = nearest_reference(x, codebook(name, 4), 64)
    scale = x.reshape(-1, 64).abs().amax(dim=1).repeat_interleave(64).reshape(x.shape)
    assert ((got.double() - ref).abs() <= 1e-6 * scale).all()


def test_table_values_round_trip_exactly():
    from harness.quantize.blockwise import fake_quantize

    code = codebook("af4", 4)
    x = (code * 3.0).repeat(4)  # 64 values, each block holding +-1: scale = 3 exactly
    assert torch.equal(fake_quantize(x, "af4", 4, 16, scale_format="fp32"), x)


# ----------------------------------------------------------------------------- YAML entries
@pytest.fixture
def dtype_dir(tmp_path, monkeypatch):
    folder = tmp_path / "dtypes"
    folder.mkdir()
    monkeypatch.setenv("KBIT_DTYPE_DIR", str(folder))
    clear_cache()
    yield folder
    monkeypatch.delenv("KBIT_DTYPE_DIR")
    clear_cache()


def entry(folder: Path, name: str, body: str) -> str:
    (folder / f"{name}.yaml").write_text(f"name: {name}\nfamily: table\n{body}")
    clear_cache()  # entries are parsed once per folder: forget the folder as it was
    return name


def test_values_are_normalised_into_minus_one_one(dtype_dir):
    entry(dtype_dir, "scaled", "values: [-6, -3, 0, 1.5, 3]\n")
    assert codebook("scaled", 3).tolist() == [-1.0, -0.5, 0.0, 0.25, 0.5]


def test_values_file_with_a_variable_and_two_formats(dtype_dir, tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("# a learned table\n-1.0\n-0.25  # comment\n0\n0.5, 1\n")
    (tmp_path / "t.yaml").write_text("[-1.0, -0.25, 0, 0.5, 1]\n")
    monkeypatch.setenv("TABLES", str(tmp_path))
    entry(dtype_dir, "from_text", "values_file: $TABLES/t.txt\n")
    entry(dtype_dir, "from_yaml", f"values_file: {tmp_path}/t.yaml\n")  # ${..}: OmegaConf's
    want = [-1.0, -0.25, 0.0, 0.5, 1.0]
    assert codebook("from_text", 3).tolist() == want
    assert codebook("from_yaml", 3).tolist() == want


def test_identity_names_a_values_file_by_its_numbers(tmp_path):
    """Moving a table file keeps the cell id's input; editing its numbers changes it."""
    from harness.dtypes.table import identity_node

    a, b, c = tmp_path / "a.txt", tmp_path / "moved.txt", tmp_path / "edited.txt"
    a.write_text("-1 0 1\n")
    b.write_text("[-1.0, 0.0, 1.0]\n")  # same numbers, other format and place
    c.write_text("-1 0 0.5\n")
    node = {"name": "t", "family": "table", "values": None, "has_zero": None}
    ids = [identity_node({**node, "values_file": str(p)}) for p in (a, b, c)]
    assert ids[0] == ids[1] != ids[2]
    assert "values_file" not in ids[0] and len(ids[0]["values_sha256"]) == 64
    plain = {"name": "int", "family": "int", "bits": None}
    assert identity_node(plain) is plain  # every other entry: unchanged


@pytest.mark.parametrize(
    ("body", "bits", "match"),
    [
        ("values: [-1, 0, 1, 1]\n", 2, "value 1.0 appears twice"),
        ("values: [-1, 0.0, -0.0, 1]\n", 2, "appears twice"),
        ("values: [-1, 0, .inf]\n", 2, "value inf is not finite"),
        ("values: [-1, 0, .nan]\n", 2, "not finite"),
        ("values: [-1, -0.5, 0, 0.5, 1]\nbits: 2\n", 2, "5 values, more than 2\\^2"),
        ("values: [-1, -0.5, 0.5, 1]\n", 2, "have no 0.*has_zero: false"),
        ("values: [-1, 0, 1]\nhas_zero: false\n", 2, "has_zero=false but 0 is one of the values"),
        ("values: [1]\n", 1, "at least 2 values"),
        ("", 2, "exactly one of values"),
        ("values: [-1, 0, 1]\nvalues_file: /x\n", 2, "exactly one of values"),
        ("values_file: /nonexistent/t.txt\n", 2, "values_file='/nonexistent/t.txt' is not a file"),
        ("values_file: $KBIT_H6_UNSET_VAR/t.txt\n", 2, "KBIT_H6_UNSET_VAR"),
        ("values: [-1, 0, 1]\n", 3, "table of 3 values; allowed: bits=2"),
    ],
)
def test_bad_tables_are_refused_in_one_line(dtype_dir, body, bits, match):
    name = entry(dtype_dir, "bad", body)
    with pytest.raises(ValueError, match=match) as err:
        check(name, bits)
    assert "\n" not in str(err.value)


def test_a_table_without_zero_is_legal_when_stated(dtype_dir):
    entry(dtype_dir, "nozero", "values: [-1, -0.25, 0.25, 1]\nhas_zero: false\n")
    assert legal_bits("nozero") == [2]
    assert 0.0 not in codebook("nozero", 2).tolist()


def test_bits_null_means_the_k_that_indexes_the_table(dtype_dir):
    entry(dtype_dir, "seven", "values: [-1, -0.5, -0.25, 0, 0.25, 0.5, 1]\n")
    assert legal_bits("seven") == [3]  # 7 values: 3 bits, not 4..8 with unused codes
    entry(dtype_dir, "seven_at_4", "values: [-1, -0.5, -0.25, 0, 0.25, 0.5, 1]\nbits: 4\n")
    assert legal_bits("seven_at_4") == [4]  # stated: the entry chose to spend 4 bits


# ----------------------------------------------------------------------------- end to end
def kbit_run(*args: str, env: dict[str, str] | None = None, multirun: bool = False):
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", **(env or {})}  # fmt: skip
    cmd = [str(BIN / "kbit-run"), *(["--multirun"] if multirun else []), *args]
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # the nano_zoo fixture trains 3 models unless KBIT_ZOO_DIR has them
def test_a_table_cell_runs_on_the_nano_zoo(nano_zoo, tmp_path, monkeypatch):
    """A published table and a user's YAML-only table ($KBIT_DTYPE_DIR, values_file) each
    run a cell; the record names the data type and its family, and the bits per parameter are
    those of nf4 (a table is a shared codebook: no per-tensor cost)."""
    from harness.records import read_store

    point_env_at_zoo(monkeypatch, next(iter(nano_zoo.values())).parents[1])
    user = tmp_path / "dtypes"
    user.mkdir()
    (tmp_path / "t.txt").write_text("\n".join(str(v) for v in BNB_AF4_64))
    (user / "my_af4.yaml").write_text(
        f"name: my_af4\nfamily: table\nvalues_file: {tmp_path}/t.txt\n"
    )
    results = tmp_path / "results"
    env = {"KBIT_DTYPE_DIR": str(user)}
    bpp = {}
    for dtype in ("af4", "my_af4", "nf4"):
        proc = kbit_run("model=zoo:nano/l1d32", f"dtype={dtype}", "bits=4", "eval=zoo",
                        "eval.limit=4", f"results_dir={results}", "device=cpu", env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [r for r in read_store(results, "adhoc").to_pylist() if r["dtype"] == dtype]
        assert rows and {r["status"] for r in rows} == {"ok"}, rows[:1]
        assert {r["dtype_family"] for r in rows} == {"normal" if dtype == "nf4" else "table"}
        bpp[dtype] = {r["bits_per_param"] for r in rows}
    assert bpp["af4"] == bpp["my_af4"] == bpp["nf4"] and len(bpp["af4"]) == 1
    assert all(math.isfinite(v) for v in bpp["af4"])


@pytest.mark.slow
def test_a_sweep_of_tables_on_the_local_launcher(tmp_path):
    """``dtype=af4,fp4_bnb,nf4_table`` swept with the packing local launcher: every cell ok."""
    from test_sweep_e2e import make_tiny_models

    from harness.records import read_store

    models = make_tiny_models(tmp_path / "models", n=1)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the cat sat on the mat while old dogs ran"] * 40))
    results = tmp_path / "results"
    proc = kbit_run(
        "hydra/sweeper=kbit", "hydra/launcher=local", f"model={models[0]}",
        "dtype=af4,fp4_bnb,nf4_table", "bits=4", "block_size=16", "sweep=tables",
        f"results_dir={results}", "eval=ppl",
        f"eval.perplexity=[{{name:tiny,path:'{text}',seqlen:32,max_tokens:128}}]",
        "device=cpu", multirun=True,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = read_store(results, "tables").to_pylist()
    assert {r["dtype"] for r in rows} == {"af4", "fp4_bnb", "nf4_table"}
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["dtype_family"] for r in rows} == {"table"}
