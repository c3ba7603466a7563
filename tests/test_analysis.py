"""analysis/: loading, bit-optimal tables, interpolation, bootstrap, Pearson, budgets, advisor.

Known answers come from hand-built grids whose expected values are computed here by formula
(or by numpy/scipy), never by the code under test.
"""

from __future__ import annotations

import ast
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.advise import NothingFits, advise, compare_cells, parse_budget
from analysis.load import ACC_COLUMN, load_results
from analysis.stats import (
    bootstrap_mean_ci,
    paired_bootstrap_diff,
    pearson_r,
    ppl_acc_correlation,
)
from analysis.tables import (
    best_config_table,
    bit_optimal_table,
    interpolate_log2,
    main_curves,
    rank_under_budget,
)
from harness.records import MEAN_ZEROSHOT_TASK, Record, cell_path, write_cell

REPO = Path(__file__).resolve().parents[1]

# --- a hand-made grid where 4-bit is bit-optimal by construction ---------------------------
# acc = SLOPE * log2(n_params) - PENALTY[k], total bits = n_params * k. At a budget B a k-bit
# model has log2 P = log2 B - log2 k, so acc_k(B) = SLOPE * (log2 B - log2 k) - PENALTY[k]:
# linear in log2 B (interpolation in log2 bits is exact), and 4 beats 8 and 16 by
# SLOPE * log2(k/4) and beats 3 by PENALTY[3] - SLOPE * log2(4/3) > 0.
SLOPE = 0.02
PENALTY = {3: 0.2, 4: 0.0, 8: 0.0, 16: 0.0}
LOG2_SIZES = (20, 22, 24, 26)


def expected_acc(k: int, budget_bits: float) -> float:
    return SLOPE * (math.log2(budget_bits) - math.log2(k)) - PENALTY[k]


def grid_records(family: str = "toy", sweep: str = "grid", n_ex: int = 0) -> list[list[Record]]:
    """Cells of the known-answer grid; with n_ex > 0, one task with per-example 0/1 results."""
    cells = []
    for lp in LOG2_SIZES:
        for k in PENALTY:
            n_params = 2**lp
            acc = SLOPE * lp - PENALTY[k]
            base = dict(
                sweep=sweep,
                cell_id=f"{family}-{lp}-{k}",
                model=f"{family}-2^{lp}",
                model_family=family,
                n_params=n_params,
                method="none" if k == 16 else "blockwise",
                dtype="none" if k == 16 else "int",
                bits=k,
                block_size=None if k == 16 else 64,
                total_model_bits=float(n_params * k),
                bits_per_param=float(k),
            )
            rows = [Record(**base, task=MEAN_ZEROSHOT_TASK, metric="acc", value=acc)]
            rows.append(Record(**base, task="wikitext2", metric="ppl", value=math.exp(5 - 5 * acc)))
            if n_ex:
                n_right = round(acc * n_ex)
                samples = [1.0] * n_right + [0.0] * (n_ex - n_right)
                rows[0].value = n_right / n_ex
                rows.append(
                    Record(
                        **base,
                        task="piqa",
                        metric="acc",
                        value=n_right / n_ex,
                        n_samples=n_ex,
                        per_sample=samples,
                    )
                )
            cells.append(rows)
    return cells


def make_store(root: Path, cells: list[list[Record]]) -> Path:
    """The test helper: write cells as a store, exactly as the runner does."""
    for rows in cells:
        write_cell(rows, cell_path(root, rows[0].sweep, rows[0].cell_id))
    return root


@pytest.fixture
def grid_store(tmp_path: Path) -> Path:
    return make_store(tmp_path / "store", grid_records(n_ex=400))


# --- loading ----------------------------------------------------------------------------------


def test_load_drops_and_reports_failed_cells(tmp_path, caplog):
    cells = grid_records()
    failed = Record(
        sweep="grid",
        cell_id="broken",
        model="toy-x",
        bits=4,
        status="failed",
        error="RuntimeError: out of memory",
    )
    make_store(tmp_path, [*cells, [failed]])
    with caplog.at_level(logging.WARNING, logger="analysis"):
        res = load_results(tmp_path)
    assert len(res.cells) == len(cells)
    assert list(res.failed["cell_id"]) == ["broken"]
    assert "out of memory" in caplog.text and "1 failed cell" in caplog.text
    # Cell frame values are the records' values, one column per task:metric.
    by_id = res.cells.set_index("cell_id")
    assert by_id.loc["toy-22-4", ACC_COLUMN] == pytest.approx(SLOPE * 22)
    assert by_id.loc["toy-22-4", "total_model_bits"] == 4 * 2**22


def test_load_keeps_sweeps_apart_and_filters(tmp_path):
    make_store(tmp_path, grid_records(sweep="a") + grid_records(sweep="b"))
    both = load_results(tmp_path)
    assert len(both.cells) == 2 * len(grid_records())  # same cell ids, distinct keys
    only_a = load_results(tmp_path, ["a"])
    assert set(only_a.cells["sweep"]) == {"a"}


# --- interpolation and the bit-optimal table ---------------------------------------------------


def test_interpolate_matches_numpy_interp_and_refuses_extrapolation():
    bits = np.array([2.0**20, 2.0**23, 2.0**24, 2.0**30])
    vals = np.array([0.1, 0.5, 0.4, 0.9])
    budgets = np.array([2.0**19, 2.0**20, 2.0**21.5, 2.0**27, 2.0**30, 2.0**31])
    got = interpolate_log2(bits, vals, budgets)
    ref = np.interp(np.log2(budgets), np.log2(bits), vals)
    inside = np.array([False, True, True, True, True, False])
    np.testing.assert_allclose(got[inside], ref[inside])
    assert np.isnan(got[~inside]).all()
    # by hand: halfway (in log2) between 2^20 and 2^23 is 2^21.5 -> (0.1 + 0.5) / 2
    assert got[2] == pytest.approx(0.3)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(10, 40), min_size=2, max_size=8, unique=True),
    st.lists(st.floats(0, 1), min_size=8, max_size=8),
    st.floats(0, 1),
)
def test_interpolate_property(log2_bits, values, frac):
    xs = np.sort(np.array(log2_bits))
    vs = np.array(values[: len(xs)])
    b = xs[0] + frac * (xs[-1] - xs[0])
    got = interpolate_log2(2.0**xs, vs, [2.0**b])[0]
    assert got == pytest.approx(np.interp(b, xs, vs), abs=1e-9)
    assert vs.min() - 1e-12 <= got <= vs.max() + 1e-12


def test_bit_optimal_is_4_bit_by_construction(tmp_path):
    res = load_results(make_store(tmp_path, grid_records()))
    curves = main_curves(res.cells)
    lo4, hi4 = 4 * 2.0**20, 4 * 2.0**26
    budgets = 2.0 ** np.arange(math.log2(lo4), math.log2(hi4) + 0.01, 0.5)
    table = bit_optimal_table(curves, budgets)
    assert (table["best_k"] == 4).all()
    for row in table.to_dict("records"):
        for k in PENALTY:
            lo, hi = k * 2.0**20, k * 2.0**26
            v = row[f"k={k}"]
            if lo <= row["budget_bits"] <= hi:
                assert v == pytest.approx(expected_acc(k, row["budget_bits"]), abs=1e-12)
            else:
                assert math.isnan(v)
    # Below the 4-bit curve's range only the 3-bit curve is measured: it wins by default.
    below = bit_optimal_table(curves, [3 * 2.0**20])
    assert below["best_k"].tolist() == [3]


def test_bit_optimal_tie_goes_to_smaller_k(tmp_path):
    cells = [c for c in grid_records() if c[0].bits in (4, 8)]
    for rows in cells:  # make both curves identical functions of total bits
        rows[0].value = 0.01 * math.log2(rows[0].total_model_bits)
    curves = main_curves(load_results(make_store(tmp_path, cells)).cells)
    table = bit_optimal_table(curves, [2.0**26, 2.0**27])
    assert table["best_k"].tolist() == [4, 4]


def test_main_curves_prefers_config_covering_most_models(tmp_path):
    cells = grid_records()
    extra = Record(
        sweep="grid",
        cell_id="odd",
        model="toy-2^20",
        model_family="toy",
        bits=4,
        dtype="float",
        block_size=64,
        total_model_bits=4 * 2.0**20,
        task=MEAN_ZEROSHOT_TASK,
        metric="acc",
        value=0.99,
    )
    curves = main_curves(load_results(make_store(tmp_path, [*cells, [extra]])).cells)
    four = curves[curves["bits"] == 4]
    assert set(four["dtype"]) == {"int"} and len(four) == len(LOG2_SIZES)


# --- statistics ---------------------------------------------------------------------------------


def _brute_force_paired(a, b, n_boot, rng):
    n = len(a)
    idx = rng.integers(0, n, size=(n_boot, n))
    return a[idx].mean(axis=1) - b[idx].mean(axis=1)


def test_bootstrap_mean_ci_matches_binomial_normal_approximation():
    rng = np.random.default_rng(1)
    x = (rng.random(3000) < 0.7).astype(float)
    ci = bootstrap_mean_ci(x, n_boot=20_000)
    p = x.mean()
    half = 1.959964 * math.sqrt(p * (1 - p) / x.size)
    assert ci.estimate == pytest.approx(p)
    assert ci.low == pytest.approx(p - half, abs=0.003)
    assert ci.high == pytest.approx(p + half, abs=0.003)


def test_paired_bootstrap_agrees_with_brute_force_index_resampling():
    rng = np.random.default_rng(2)
    a = (rng.random(800) < 0.65).astype(float)
    b = np.where(rng.random(800) < 0.9, a, 1 - a)  # strongly paired
    ci = paired_bootstrap_diff(a, b, n_boot=20_000)
    ref = np.quantile(_brute_force_paired(a, b, 20_000, rng), [0.025, 0.975])
    assert ci.estimate == pytest.approx(a.mean() - b.mean())
    assert ci.low == pytest.approx(ref[0], abs=0.004)
    assert ci.high == pytest.approx(ref[1], abs=0.004)


def test_paired_bootstrap_covers_known_difference():
    """Coverage over 300 data sets drawn with a true difference of 0.05 is close to 95%."""
    rng = np.random.default_rng(3)
    covered = 0
    for rep in range(300):
        a = (rng.random(500) < 0.70).astype(float)
        flip = rng.random(500)  # b: a with 5% of correct answers turned wrong on average
        b = np.where((a == 1) & (flip < 0.05 / 0.70), 0.0, a)
        ci = paired_bootstrap_diff({"t": a}, {"t": b}, n_boot=2000, seed=rep)
        covered += ci.low <= 0.05 <= ci.high
    assert 0.90 <= covered / 300 <= 0.985


def test_paired_is_tighter_than_unpaired_and_stratified_by_task():
    rng = np.random.default_rng(4)
    a = {t: (rng.random(400) < p).astype(float) for t, p in (("x", 0.6), ("y", 0.8))}
    b = {t: np.where(rng.random(400) < 0.95, v, 1 - v) for t, v in a.items()}
    ci = paired_bootstrap_diff(a, b)
    macro = np.mean([a[t].mean() - b[t].mean() for t in a])
    assert ci.estimate == pytest.approx(macro)
    unpaired = math.hypot(
        *[(c.high - c.low) / 2 for c in (bootstrap_mean_ci(a), bootstrap_mean_ci(b))]
    )
    assert (ci.high - ci.low) / 2 < unpaired


def test_paired_bootstrap_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="task 'x' has 3 vs 2 examples"):
        paired_bootstrap_diff({"x": [1, 0, 1]}, {"x": [1, 0]})


def test_pearson_against_numpy_and_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    x = rng.normal(size=50)
    y = -2 * x + rng.normal(size=50)
    r, n = pearson_r(np.append(x, np.nan), np.append(y, 1.0))
    assert n == 50
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert r == pytest.approx(scipy_stats.pearsonr(x, y)[0], abs=1e-12)


def test_ppl_acc_correlation_leaves_out_unstable_cells(tmp_path):
    res = load_results(make_store(tmp_path, grid_records()))
    cells = res.cells.copy()
    ppl, acc = cells["wikitext2:ppl"].to_numpy(), cells[ACC_COLUMN].to_numpy()
    cells.loc[0, "wikitext2:ppl"] = 1e6  # a diverged cell
    r, n = ppl_acc_correlation(cells, "wikitext2:ppl", ACC_COLUMN, cap=100)
    assert n == len(cells) - 1
    assert r == pytest.approx(np.corrcoef(ppl[1:], acc[1:])[0, 1])


# --- budgets and the advisor ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("4GiB", 4 * 8 * 2**30),
        ("500MB", 500e6 * 8),
        ("3.5GB", 3.5e9 * 8),
        ("2e9bits", 2e9),
        ("1.5 KiB", 1.5 * 8 * 1024),
        ("100B", 800),
        ("3Gbit", 3e9),
    ],
)
def test_parse_budget(text, bits):
    assert parse_budget(text) == pytest.approx(bits)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("4", "no unit"),
        ("4Gb", "ambiguous"),
        ("4 GiBs", "did you mean 'GiB'"),
        ("-1GB", "not <number><unit>"),
        ("0GB", "positive"),
        ("lots", "not <number><unit>"),
    ],
)
def test_parse_budget_errors_name_value_and_allowed(text, match):
    with pytest.raises(ValueError, match=match) as err:
        parse_budget(text)
    assert repr(text) in str(err.value)


def test_advisor_budget_admitting_exactly_one_configuration(grid_store):
    res = load_results(grid_store)
    smallest = 3 * 2.0**20  # the 3-bit 2^20 model; the next smallest is 4 * 2^20
    advice = advise(res, smallest, n_boot=2000)
    assert advice.n_fitting == 1 and advice.runner_up is None
    assert (advice.best.bits, advice.best.model) == (3, "toy-2^20")
    n_right = round((SLOPE * 20 - PENALTY[3]) * 400)
    assert advice.best.accuracy == pytest.approx(n_right / 400)
    assert advice.best.ci.low < advice.best.accuracy < advice.best.ci.high
    with pytest.raises(NothingFits, match=r"smallest is toy-2\^20 k=3"):
        advise(res, smallest - 1)


def test_advisor_picks_best_on_half_a_and_reports_half_b(grid_store):
    res = load_results(grid_store)
    budget = 2.0**27
    fits = [c for c in grid_records(n_ex=400) if c[0].total_model_bits <= budget]

    def half(rows, start):  # the one task's per-example list, every second position
        return np.mean([r.per_sample[start::2] for r in rows if r.per_sample is not None])

    best = max(fits, key=lambda c: (half(c, 0), -c[0].total_model_bits))
    advice = advise(res, budget, n_boot=4000)
    assert advice.n_fitting == len(fits) and advice.selection_rule == "split"
    assert "chosen on half A" in advice.selection and f"N={len(fits)}" in advice.selection
    assert advice.best.key == f"grid/{best[0].cell_id}"
    assert advice.best.accuracy == pytest.approx(half(best, 1))
    assert advice.best.recorded_accuracy == pytest.approx(best[0].value)
    assert advice.best.bits == 4  # bit-optimal by construction
    assert advice.runner_up is not None
    d = advice.diff_ci
    assert d.method == "paired-bootstrap"
    assert d.estimate == pytest.approx(advice.best.accuracy - advice.runner_up.accuracy)
    assert d.low <= d.estimate <= d.high


def test_rank_under_budget_is_sorted_and_within_budget(grid_store):
    res = load_results(grid_store)
    ranked = rank_under_budget(res.cells, 2.0**25)
    assert (ranked["total_model_bits"] <= 2.0**25).all()
    assert ranked[ACC_COLUMN].is_monotonic_decreasing


def test_best_config_table_matches_brute_force(grid_store):
    res = load_results(grid_store)
    records = [c[0] for c in grid_records(n_ex=400)]
    budgets = [3 * 2.0**20, 2.0**24, 2.0**27, 2.0**30]
    table = best_config_table(res.cells, budgets)
    for budget, row in zip(budgets, table.to_dict("records"), strict=True):
        fits = [r for r in records if r.total_model_bits <= budget]
        best = max(fits, key=lambda r: (r.value, -r.total_model_bits))
        assert (row["model"], row["bits"], row["n_fitting"]) == (best.model, best.bits, len(fits))


def test_compare_cells_paired_difference(grid_store):
    res = load_results(grid_store)
    ci = compare_cells(res, "grid/toy-26-4", "grid/toy-26-3", n_boot=2000)
    # per_sample are sorted 1s then 0s, so pairs differ exactly on the PENALTY[3] share.
    assert ci.estimate == pytest.approx(round(0.52 * 400) / 400 - round(0.32 * 400) / 400)
    assert ci.low <= ci.estimate <= ci.high and ci.low > 0
    with pytest.raises(KeyError, match="did you mean 'grid/toy-26-4'"):
        compare_cells(res, "grid/toy-26-44", "grid/toy-26-3")


# --- import isolation -------------------------------------------------------------------------


def test_analysis_imports_nothing_from_quantize():
    for path in (REPO / "analysis").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in getattr(node, "names", [])] if isinstance(node, ast.Import) else []
            )
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith("harness.quantize") for n in names), path
    code = (
        "import sys, analysis.cli, analysis.synthetic; "
        "bad = [m for m in sys.modules if m.startswith('harness.quantize')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_config_keys_tell_per_tensor_configurations_apart():
    """A missing block size (one scale per tensor) must not blank the key (pandas 3)."""
    import pandas as pd

    from analysis.tables import QUANT_CONFIG, VARIANT_COLUMNS, config_keys

    row = {c: "x" for c in [*QUANT_CONFIG, *VARIANT_COLUMNS]}
    cells = pd.DataFrame([{**row, "dtype": "int"}, {**row, "dtype": "float"}, {**row}])
    cells["block_size"] = [None, None, 64]
    keys = config_keys(cells)
    assert keys.notna().all()
    assert keys.nunique() == 3
