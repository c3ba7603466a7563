"""The claims report: verdicts on stores whose truth is known by construction.

Each store is built by hand (not from analysis.synthetic, whose law is tuned for figures):
every cell's per-example results are ``u[e] < p`` for one fixed uniform vector ``u`` per
task, shared by all cells, so a planted difference in ``p`` is a difference on the same
examples (what a paired bootstrap detects), and equal ``p`` gives equal results. The noise
store draws every cell independently at one ``p``: no difference is real there.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.claims import (
    FAILS,
    HOLDS,
    NOT_SEPARATED,
    NOT_TESTED,
    claims_report,
    format_findings,
    pooled_comparison,
    split_scopes,
)
from analysis.cli import plot_main
from analysis.load import load_results
from harness.records import MEAN_ZEROSHOT_TASK, Record, cell_path, write_cell

TASKS = ("mc", "lastword")
N_EX = 400
N_WIN = 40
SIZES = (1e6, 2e6, 4e6, 8e6, 16e6)
N_BOOT = 1000


def _cell_rows(
    sweep, model, n_params, method, dtype, bits, bs, p, u, nll=None, outlier=0.0, rng=None
):
    """All rows of one cell; ``rng`` given: independent draws instead of the shared ``u``."""
    per_bit = 16.0 if bits == 16 else bits + (16 / bs if bs else 0) + 13 * outlier
    cell_id = f"{model.replace(':', '_').replace('/', '_')}-{method}-{dtype}-{bits}-{bs}-{outlier}"
    base = dict(
        sweep=sweep,
        cell_id=cell_id,
        model=model,
        model_family=model.split(":")[1].split("/")[0],
        n_params=int(n_params),
        n_nonembedding_params=int(n_params),
        method=method,
        dtype=dtype,
        dtype_family=dtype,
        bits=bits,
        block_size=None if bits == 16 else bs,
        outlier_fraction=outlier,
        total_model_bits=n_params * per_bit,
        bits_per_param=per_bit,
        device_class="cpu",
        compute_dtype="float32",
        data_digest="abcdef012345",
    )
    rows, accs = [], []
    for task in TASKS:
        draw = rng.random(N_EX) if rng is not None else u[task]
        samples = (draw < min(max(p, 0.0), 1.0)).astype(float).tolist()
        accs.append(float(np.mean(samples)))
        rows.append(
            Record(
                **base, task=task, metric="acc", value=accs[-1], n_samples=N_EX, per_sample=samples
            )
        )
    rows.append(Record(**base, task=MEAN_ZEROSHOT_TASK, metric="acc", value=float(np.mean(accs))))
    if nll is not None:  # per-window NLL: a fixed window profile shifted by the cell's NLL
        windows = (nll + u["windows"]).tolist()
        rows.append(
            Record(
                **base,
                task="heldout",
                metric="nll",
                value=float(np.mean(windows)),
                n_samples=N_WIN * 100,
                per_sample=windows,
            )
        )
        rows.append(Record(**base, task="heldout", metric="ppl", value=math.exp(np.mean(windows))))
    return rows


def build_store(root, truth: str, family="fam", sweep="grid", proxy=True, ks=(3, 4, 5, 8)):
    """A 5-model grid with the claims' truth planted: ``holds``, ``fails`` or ``noise``.

    Per model: k=3 int at block sizes 64/256 (+ a 3-bit proxy int cell), k=4 int/float/quantile
    at 64/256, k=5 and k=8 int at 64, the 16-bit baseline.
    """
    u = {t: np.random.default_rng(i).random(N_EX) for i, t in enumerate(TASKS)}
    u["windows"] = np.random.default_rng(9).random(N_WIN)
    rng = np.random.default_rng(123) if truth == "noise" else None
    sign = {"holds": 1.0, "fails": -1.0, "noise": 0.0}[truth]
    # 4-bit's quantization penalty: small where claim 1 holds, large where it fails
    pen = {3: 0.2, 4: 0.01 if truth == "holds" else 0.25, 5: 0.005, 8: 0.0, 16: 0.0}
    dtype_gain = {"int": 0.0, "float": 0.03, "quantile": 0.06}
    cells = []
    for n in SIZES:
        model = f"zoo:{family}/{int(n / 1e6)}M"
        quality = 0.2 + 0.1 * math.log2(n / 1e6)
        grid = [("blockwise", "none", 16, None, 0.0)]
        grid += [("blockwise", "int", 3, bs, 0.0) for bs in (64, 256) if 3 in ks]
        grid += [("blockwise", d, 4, bs, 0.0) for d in dtype_gain for bs in (64, 256) if 4 in ks]
        grid += [("blockwise", "int", k, 64, 0.0) for k in (5, 8) if k in ks]
        if proxy:
            grid.append(("proxy", "int", 3, 64, 0.02))
        for method, dtype, k, bs, outl in grid:
            if truth == "noise":
                p = 0.5
            else:
                p = quality - pen[k]
                p += sign * 0.03 * (bs == 64 and k in (3, 4))
                p += sign * dtype_gain.get(dtype, 0.0) * (k == 4)
                p += sign * 0.05 * (method == "proxy")
            nll = 3.0 - p
            cells.append(_cell_rows(sweep, model, n, method, dtype, k, bs, p, u, nll, outl, rng))
    for rows in cells:
        write_cell(rows, cell_path(root, rows[0].sweep, rows[0].cell_id))
    return root


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return {t: build_store(tmp_path_factory.mktemp(t), t) for t in ("holds", "fails", "noise")}


@pytest.fixture(scope="module")
def reports(stores):
    return {t: claims_report(load_results(d), n_boot=N_BOOT) for t, d in stores.items()}


def _verdicts(report):
    return {f.claim: f.verdict for f in report.findings}


def test_planted_truth_holds(reports):
    rep = reports["holds"]
    assert [s.name for s in rep.scopes] == ["fam"]
    assert _verdicts(rep) == {1: HOLDS, 2: HOLDS, 3: HOLDS, 4: HOLDS}
    by = {f.claim: f for f in rep.findings}
    assert all(b["status"] == "4-bit best" for b in by[1].budgets)
    block = by[2].comparisons[0]
    assert (
        block.role == "verdict"
        and block.n == 20
        and block.estimate == pytest.approx(0.03, abs=0.01)
    )
    nll = [c for c in by[2].comparisons if c.metric == "heldout:nll"]
    assert nll and nll[0].outcome == "> 0"  # smaller blocks: lower NLL, sign flipped to > 0
    qf, fi = by[3].comparisons[:2]
    assert qf.estimate == pytest.approx(0.03, abs=0.01) and fi.estimate == pytest.approx(
        0.03, abs=0.01
    )
    a, b = by[4].comparisons[:2]
    assert a.outcome == "> 0" and b.outcome == "< 0"
    assert "outside the 4-bit curve's range" in b.note  # the smallest model's proxy cell


def test_planted_truth_fails(reports):
    rep = reports["fails"]
    assert _verdicts(rep) == {1: FAILS, 2: FAILS, 3: FAILS, 4: FAILS}
    f1 = rep.findings[0]
    beaten = [b for b in f1.budgets if b["status"].startswith("beaten")]
    assert len(beaten) > len(f1.budgets) / 2
    assert "Bonferroni" in f1.correction


def test_pure_noise_is_not_separated(reports):
    rep = reports["noise"]
    assert _verdicts(rep) == {
        1: NOT_SEPARATED,
        2: NOT_SEPARATED,
        3: NOT_SEPARATED,
        4: NOT_SEPARATED,
    }


def test_missing_cells_are_not_tested(tmp_path):
    root = build_store(tmp_path / "s", "holds", proxy=False, ks=(4,))
    rep = claims_report(load_results(root), n_boot=N_BOOT)
    f = {x.claim: x for x in rep.findings}
    assert {c: x.verdict for c, x in f.items()} == {1: HOLDS, 2: HOLDS, 3: HOLDS, 4: NOT_TESTED}
    assert f[4].reason == "no proxy cells"
    # 4-bit against the 16-bit baseline only: claim 1 is still tested there
    assert {k for b in f[1].budgets for k in b["compared_k"]} == {16}
    only4 = tmp_path / "only4"
    cells = load_results(root).cells
    keep = cells[(cells["bits"] == 4) & (cells["dtype"] == "int") & (cells["block_size"] == 64)]
    for key in keep["key"]:
        src = root / f"{key}.parquet"
        dst = only4 / f"{key}.parquet"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    rep = claims_report(load_results(only4), n_boot=N_BOOT)
    reasons = {x.claim: x.reason for x in rep.findings}
    assert all(x.verdict == NOT_TESTED for x in rep.findings)
    assert reasons[1] == "no blockwise cells of any k other than 4"
    assert "differ only in block size" in reasons[2]
    assert "quantile/float" in reasons[3] and "float/int" in reasons[3]
    assert reasons[4] == "no proxy cells"
    assert "not tested" in format_findings(rep)
    no4 = build_store(tmp_path / "no4", "holds", ks=(3,))
    rep = claims_report(load_results(no4), n_boot=N_BOOT)
    f = {x.claim: x for x in rep.findings}
    assert f[1].verdict == NOT_TESTED and "no 4-bit" in f[1].reason
    assert f[4].verdict == NOT_TESTED and "no 4-bit blockwise curve" in f[4].reason
    assert f[4].comparisons[0].outcome == "> 0"  # (a) is still reported


def test_no_per_example_results_is_not_tested(stores, tmp_path):
    """A store without per_sample lists: no interval, so no verdict is made up."""
    src = stores["holds"]
    for path in sorted(src.glob("*/*.parquet")):
        table = pq.read_table(path)
        idx = table.schema.get_field_index("per_sample")
        nulls = pd.Series([None] * table.num_rows, dtype=object)
        table = table.set_column(
            idx, table.schema.field(idx), pa.array(nulls, type=table.schema.field(idx).type)
        )
        out = tmp_path / path.parent.name / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
    rep = claims_report(load_results(tmp_path), n_boot=N_BOOT)
    assert all(f.verdict == NOT_TESTED for f in rep.findings), [f.reason for f in rep.findings]
    assert any("per-window" in n for n in rep.scopes[0].notes)


def test_deterministic_given_seed(stores):
    res = load_results(stores["noise"])
    one = claims_report(res, n_boot=N_BOOT, seed=3).to_dict()
    two = claims_report(res, n_boot=N_BOOT, seed=3).to_dict()
    assert one == two
    other = claims_report(res, n_boot=N_BOOT, seed=4).to_dict()
    assert other != one  # the seed reaches the bootstrap


def test_pooled_comparison_is_the_mean_of_pair_differences():
    rng = np.random.default_rng(0)
    pairs = [({"t": rng.random(50)}, {"t": rng.random(50)}) for _ in range(3)]
    c = pooled_comparison(pairs, "x", "m", 0.95, 500, 0)
    assert c.estimate == pytest.approx(np.mean([a["t"].mean() - b["t"].mean() for a, b in pairs]))
    assert c.n == 3 and c.n_examples == 50 and c.low < c.estimate < c.high
    odd = [*pairs, ({"t": rng.random(7)}, {"t": rng.random(7)}), ({"t": rng.random(50)}, None)]
    c2 = pooled_comparison(odd, "x", "m", 0.95, 500, 0)
    assert c2.n == 3 and "other examples" in c2.note and "without paired" in c2.note
    assert pooled_comparison([({"t": rng.random(5)}, None)], "x", "m", 0.95, 500, 0) is None


def test_scopes_split_families_and_token_checkpoints():
    cells = pd.DataFrame(
        {
            "key": ["s/a", "s/b", "s/c", "t/c"],
            "sweep": ["s", "s", "s", "t"],
            "model": ["zoo:tokens/l2@1M", "zoo:tokens/l2@2M", "zoo:micro/l2", "zoo:micro/l2"],
            "model_family": ["tokens", "tokens", "micro", "micro"],
            "bits": [4, 4, 4, 4],
            "method": "blockwise",
            "dtype": "int",
            "block_size": 64.0,
            "scale_format": "fp16",
            "centering": False,
            "outlier_fraction": 0.0,
        }
    )
    scopes = split_scopes(cells)
    names = [s.name for s, _ in scopes]
    assert names == ["micro", "tokens @1M tokens", "tokens @2M tokens"]
    micro = scopes[0]
    assert micro[0].n_cells == 1 and micro[0].sweeps == ["s"]  # the repeat in sweep t kept once
    with_col = cells.assign(train_tokens=[5e5, 8e6, None, None])
    assert [s.name for s, _ in split_scopes(with_col)][1:] == [
        "tokens @500k tokens",
        "tokens @8M tokens",
    ]
    # a record written before train_tokens existed joins the newer cells of the same model
    mixed = cells.assign(train_tokens=[5e5, 8e6, None, 2.4e6])
    micro_scopes = [(s, g) for s, g in split_scopes(mixed) if s.model_family == "micro"]
    assert [s.name for s, _ in micro_scopes] == ["micro @2.4M tokens"]
    assert micro_scopes[0][0].sweeps == ["s"]  # the repeat in sweep t still kept once


def test_plot_report_writes_findings(tmp_path):
    root = build_store(tmp_path / "s", "holds", ks=(3, 4))
    out = tmp_path / "out"
    assert plot_main([str(root), "--out", str(out), "--report", "--jobs", "1"]) == 0
    md = (out / "findings.md").read_text()
    data = json.loads((out / "findings.json").read_text())
    assert md.startswith("# Findings") and "| fam |" in md
    assert [f["claim"] for f in data["findings"]] == [1, 2, 3, 4]
    for f in data["findings"]:
        assert f["verdict"] in (HOLDS, FAILS, NOT_SEPARATED, NOT_TESTED)
        assert f["text"] and f["metric"] and f["reason"]
        for c in f["comparisons"]:
            assert {"estimate", "low", "high", "n", "level", "outcome"} <= set(c)
    assert data["seed"] == 0 and data["n_boot"] == 10_000


def test_per_tensor_scale_is_the_largest_block(tmp_path):
    """block_size None (one scale per tensor) pairs with the largest measured block size."""
    from analysis.synthetic import write_synthetic_store

    grid = dict(families=("pythia",), sizes=(125e6, 1.3e9), ks=(3, 4, 16),
                dtypes=("int", "float"), block_sizes=(64, 256, None),
                variants=(("blockwise", False, 0.0), ("blockwise", True, 0.0)), n_examples=20)  # fmt: skip
    root = write_synthetic_store(tmp_path, **grid)
    rep = claims_report(load_results(root), n_boot=200)
    assert not any("repeated" in n for n in rep.scopes[0].notes)
    block = next(f for f in rep.findings if f.claim == 2).comparisons[0]
    # 2 models x k 3,4 x 2 data types x 2 centerings, 2 steps each (64<256, 256<tensor)
    assert block.n == 32 and "64<256" in block.note and "256<tensor" in block.note
