"""Selection bias: planted-noise simulations of main_curves and the advisor's best-of-N.

Every configuration at a given (model, k) has the SAME true accuracy, and k=4 and k=8 offer
more candidate configurations than the other k (as real grids do). Whatever a rule reports
above the true accuracy is pure selection bias. The old rule (best observed accuracy, reported
on the same examples) is computed here, independently of the library, side by side with
``main_curves``' split rule. ``pytest -s`` prints both biases.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.advise import advise
from analysis.load import ACC_COLUMN, load_results
from analysis.selection import half_scores, rank_heldout
from analysis.synthetic import synthetic_cells
from analysis.tables import ESTIMATE_ALL, ESTIMATE_HELDOUT, main_curves
from harness.records import cell_path, write_cell

N_DRAWS = 200
N_EXAMPLES = 200  # per task
TASKS = ("t1", "t2")
MODELS = (0, 1, 2, 3)
CANDIDATES = {3: 2, 4: 6, 5: 2, 6: 2, 8: 6, 16: 1}  # configurations per k
PENALTY = {3: 0.10, 4: 0.02, 5: 0.01, 6: 0.005, 8: 0.0, 16: 0.0}
SELECTED_K = (4, 8)  # the k with the most candidates: where the old rule is most biased


def _true_acc(model: int, k: int) -> float:
    return 0.45 + 0.06 * model - PENALTY[k]


def _grid() -> pd.DataFrame:
    """The static part of the cell frame: one row per (model, k, configuration)."""
    rows = []
    for k, n_cfg in CANDIDATES.items():
        for c in range(n_cfg):
            for m in MODELS:
                rows.append(
                    dict(
                        key=f"s/m{m}-k{k}-c{c}",
                        sweep="s",
                        model=f"m{m}",
                        model_family="fam",
                        method="none" if k == 16 else "blockwise",
                        dtype="none" if k == 16 else f"dtype{c}",
                        dtype_overrides="{}",
                        bits=k,
                        block_size=np.nan if k == 16 else 64.0,
                        scale_format="fp16",
                        centering=False,
                        outlier_fraction=0.0,
                        total_model_bits=2.0 ** (20 + 2 * m) * k,
                        device_class="cpu",
                        compute_dtype="float32",
                        data_digest="d",
                        true_acc=_true_acc(m, k),
                    )
                )
    return pd.DataFrame(rows)


def _draw(grid: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One store-like (cells, per_sample) pair: fresh 0/1 results at the true accuracies."""
    p = grid["true_acc"].to_numpy()[:, None, None]
    samples = (rng.random((len(grid), len(TASKS), N_EXAMPLES)) < p).astype(np.float32)
    cells = grid.assign(**{ACC_COLUMN: samples.mean(axis=2).mean(axis=1)})
    per_sample = pd.DataFrame(
        {
            "key": np.repeat(grid["key"].to_numpy(), len(TASKS)),
            "task": np.tile(TASKS, len(grid)),
            "metric": "acc",
            "per_sample": list(samples.reshape(-1, N_EXAMPLES)),
        }
    )
    return cells, per_sample


def _naive_points(cells: pd.DataFrame) -> pd.DataFrame:
    """The old rule, written out: per k the configuration with the best observed mean
    accuracy over models, reported with those same observations."""
    by_cfg = cells.groupby(["bits", "dtype"])[ACC_COLUMN].mean().rename("score").reset_index()
    best = by_cfg.sort_values(["bits", "score"], ascending=[True, False]).drop_duplicates("bits")
    return cells.merge(best[["bits", "dtype"]], on=["bits", "dtype"])


def _bias(points: pd.DataFrame, truth: pd.Series) -> float:
    """Mean reported minus true accuracy over the points of the most-selected k."""
    sel = points[points["bits"].isin(SELECTED_K)]
    return float((sel[ACC_COLUMN] - sel["key"].map(truth)).mean())


def _summary(name: str, biases: list[float]) -> tuple[float, float]:
    b = np.asarray(biases)
    mean, se = float(b.mean()), float(b.std(ddof=1) / math.sqrt(b.size))
    print(f"\n{name}: mean bias {mean:+.5f} (SE {se:.5f}) over {b.size} draws")
    return mean, se


def test_split_selection_removes_the_bias_of_the_best_observed_rule():
    grid = _grid()
    truth = grid.set_index("key")["true_acc"]
    rng = np.random.default_rng(20221028)
    naive, split = [], []
    for _ in range(N_DRAWS):
        cells, per_sample = _draw(grid, rng)
        naive.append(_bias(_naive_points(cells), truth))
        curves = main_curves(cells, per_sample=per_sample)
        assert len(curves) == len(CANDIDATES) * len(MODELS)  # one configuration per k
        split.append(_bias(curves, truth))
    naive_mean, naive_se = _summary(f"k={SELECTED_K} naive (best observed, same examples)", naive)
    split_mean, split_se = _summary(f"k={SELECTED_K} split (half A chooses, half B reports)", split)
    # Six equal candidates: the maximum of six means is about 1.27 sd above the truth.
    assert naive_mean > 10 * naive_se and naive_mean > 0.005
    assert abs(split_mean) < 3 * split_se
    assert abs(split_mean) < naive_mean / 5


def test_split_reports_all_examples_where_nothing_was_selected():
    grid = _grid()
    cells, per_sample = _draw(grid, np.random.default_rng(1))
    curves = main_curves(cells, per_sample=per_sample)
    single = curves["bits"] == 16  # one candidate: no selection, no need to halve the data
    assert (curves.loc[single, "estimate"] == ESTIMATE_ALL).all()
    assert (curves.loc[~single, "estimate"] == ESTIMATE_HELDOUT).all()
    recorded = cells.set_index("key")[ACC_COLUMN]
    np.testing.assert_allclose(
        curves.loc[single, ACC_COLUMN], curves.loc[single, "key"].map(recorded)
    )
    half_b = half_scores(per_sample)["acc_b"]
    held = curves[~single]
    np.testing.assert_allclose(held[ACC_COLUMN], held["key"].map(half_b))
    # The choice is the best configuration on half A (by hand, over the models' mean).
    half_a = cells.assign(a=cells["key"].map(half_scores(per_sample)["acc_a"]))
    best_a = half_a.groupby(["bits", "dtype"])["a"].mean().groupby("bits").idxmax()
    for k, (_, dtype) in best_a.items():
        assert set(curves.loc[curves["bits"] == k, "dtype"]) == {dtype}


def test_fixed_selection_uses_no_accuracy_and_without_per_sample_falls_back(caplog):
    grid = _grid()
    cells, _ = _draw(grid, np.random.default_rng(2))
    fixed = main_curves(cells, selection="fixed")
    first = cells.groupby("bits")["dtype"].min()  # the first label: dtype0 everywhere
    assert (fixed["dtype"] == fixed["bits"].map(first)).all()
    flipped = cells.assign(**{ACC_COLUMN: 1 - cells[ACC_COLUMN]})
    assert main_curves(flipped, selection="fixed")["key"].tolist() == fixed["key"].tolist()
    fallback = main_curves(cells)  # split asked, no per-example results: warned, fixed rule
    assert fallback["key"].tolist() == fixed["key"].tolist()
    assert "chosen by label" in caplog.text
    with pytest.raises(ValueError, match="selection='naive' is unknown"):
        main_curves(cells, selection="naive")


def test_rank_heldout_best_of_n_is_unbiased_where_the_maximum_is_not():
    """The advisor's rule in isolation: 20 equal cells, best reported on held-out examples."""
    rng = np.random.default_rng(7)
    n_cells, p = 20, 0.6
    ranked = pd.DataFrame({"key": [f"c{i}" for i in range(n_cells)], "total_model_bits": 1.0})
    naive, held = [], []
    for _ in range(N_DRAWS):
        samples = (rng.random((n_cells, 400)) < p).astype(float)
        scores = pd.DataFrame(
            {"acc_a": samples[:, 0::2].mean(1), "acc_b": samples[:, 1::2].mean(1)},
            index=ranked["key"],
        )
        order, rule = rank_heldout(ranked, scores)
        assert rule == "split"
        held.append(order["acc_b"].iloc[0] - p)
        naive.append(samples.mean(1).max() - p)
    naive_mean, naive_se = _summary("advisor naive (max of N=20)", naive)
    held_mean, held_se = _summary("advisor split (held-out half B)", held)
    assert naive_mean > 10 * naive_se
    assert abs(held_mean) < 3 * held_se


def test_advisor_widens_intervals_when_it_cannot_split(tmp_path):
    grid = dict(families=("f",), sizes=(1e8, 2e8), ks=(4, 8), dtypes=("int", "float"))
    cells = synthetic_cells(**grid, block_sizes=(64,), n_examples=60)
    for row in cells[0]:  # one fitting cell without per-example results
        row.per_sample = None
    for rows in cells:
        write_cell(rows, cell_path(tmp_path, rows[0].sweep, rows[0].cell_id))
    res = load_results(tmp_path)
    advice = advise(res, 2.0**40, n_boot=500, level=0.9)
    n = len(cells)
    assert advice.selection_rule == "bonferroni" and advice.n_fitting == n
    assert "Bonferroni" in advice.selection and f"N={n}" in advice.selection
    assert advice.best.ci.level == pytest.approx(1 - 0.1 / n)
    assert advice.diff_ci.level == pytest.approx(1 - 0.1 / (n * (n - 1) / 2))
    assert advice.best.accuracy == pytest.approx(res.cells[ACC_COLUMN].max())
