"""kbit-plot's outputs never mislead (issue 22): same examples, correlation caveat, no empty output.

Stores are built by hand with per-example 0/1 lists whose halves are known, so every expected
number below is a mean over a slice of those lists, computed here with numpy, never by the
library:

* a point and its baseline rest on the same examples: where any point of a family is reported
  on held-out half B (odd positions), the 16-bit baseline drawn and tabulated is its own
  half-B mean, not the mean over all examples;
* ``stats.md`` adds a plain caveat exactly when r's sign differs from the paper's -0.94;
* a figure that compares nothing and a table without rows are not written, one INFO line says
  why, and the exit status says whether any figure was drawn.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from analysis.cli import build_figure, correlation_lines, main_curves_for, plot_main
from analysis.load import ACC_COLUMN, load_results
from analysis.selection import ESTIMATE_ALL, ESTIMATE_HELDOUT, same_examples
from analysis.stats import correlation_caveat
from analysis.tables import ESTIMATE_ALL as TABLES_ALL
from analysis.tables import ESTIMATE_HELDOUT as TABLES_HELDOUT
from analysis.tables import main_curves
from harness.records import MEAN_ZEROSHOT_TASK, Record, cell_path, empty_record, write_cell

TASKS = ("mc", "lastword")
N_EX = 60  # per task; halves of 30
SIZES = (2.0**16, 2.0**17, 2.0**18)  # 16-bit total bits 2^20, 2^21, 2^22: on the budget grid


def _samples(rng: np.random.Generator, p_even: float, p_odd: float) -> dict[str, np.ndarray]:
    """0/1 per task with one success rate on even positions (half A), another on odd (half B).

    A baseline whose halves differ this much makes "all examples" and "half B" far apart, so
    a figure that mixes them cannot pass by accident.
    """
    out = {}
    for task in TASKS:
        v = np.empty(N_EX, dtype=np.float32)
        v[0::2] = rng.random(N_EX // 2) < p_even
        v[1::2] = rng.random(N_EX // 2) < p_odd
        out[task] = v
    return out


def _rows(family, m, n, k, dtype, samples, ppl=None) -> list[Record]:
    """Every row of one cell: per-task acc with per-example lists, the mean, optional ppl."""
    method = "none" if k == 16 else "blockwise"
    base = dict(
        sweep="day", cell_id=f"{family}-m{m}-k{k}-{dtype}", model=f"zoo:{family}/m{m}",
        model_family=family, n_params=int(n), method=method, dtype=dtype, dtype_family=dtype,
        bits=k, block_size=None if k == 16 else 64, scale_format="fp16",
        total_model_bits=n * (16 if k == 16 else k + 0.25), device_class="cpu",
        compute_dtype="float32", data_digest="d1",
    )  # fmt: skip
    rows, means = [], []
    for task, v in samples.items():
        acc = float(v.mean())
        means.append(acc)
        se = math.sqrt(acc * (1 - acc) / v.size)
        rows.append(Record(**base, task=task, metric="acc", value=acc, stderr=se,
                           n_samples=v.size, per_sample=v.tolist()))  # fmt: skip
    mean = float(np.mean(means))
    rows.append(Record(**base, task=MEAN_ZEROSHOT_TASK, metric="acc", value=mean,
                       stderr=0.05, n_samples=N_EX * len(samples)))  # fmt: skip
    if ppl is not None:
        rows.append(Record(**base, task="wikitext2", metric="ppl", value=ppl, n_samples=1000))
    return rows


def _half_b(samples: dict[str, np.ndarray]) -> float:
    """Macro mean over tasks of the odd positions: by hand."""
    return float(np.mean([v[1::2].astype(float).mean() for v in samples.values()]))


def _all(samples: dict[str, np.ndarray]) -> float:
    return float(np.mean([v.astype(float).mean() for v in samples.values()]))


@pytest.fixture(scope="module")
def split_store(tmp_path_factory):
    """Family ``fam``: two data types at k=4 (a choice is made on half A), one baseline per
    model (nothing to choose). Family ``solo``: one data type, so nothing is selected there.
    Perplexity rises with accuracy on purpose (a positive r, for the caveat)."""
    root = tmp_path_factory.mktemp("day") / "store"
    rng = np.random.default_rng(22)
    truth = {}
    for family, dtypes in (("fam", ("int", "float")), ("solo", ("int",))):
        for m, n in enumerate(SIZES):
            cells = [(16, "none", 0.85, 0.30)]
            cells += [(4, d, 0.5 + 0.05 * i, 0.45 + 0.05 * m) for i, d in enumerate(dtypes)]
            for k, dtype, p_even, p_odd in cells:
                s = _samples(rng, p_even, p_odd)
                rows = _rows(family, m, n, k, dtype, s, ppl=20 + 100 * _all(s))
                write_cell(rows, cell_path(root, "day", rows[0].cell_id))
                truth[f"day/{rows[0].cell_id}"] = s
    return root, truth


def test_estimate_labels_are_one_definition():
    assert (ESTIMATE_ALL, ESTIMATE_HELDOUT) == (TABLES_ALL, TABLES_HELDOUT)


def test_baseline_is_reported_on_the_same_half_as_the_selected_points(split_store):
    root, truth = split_store
    res = load_results(root)
    per_sample = res.per_sample()
    curves = main_curves_for(res.cells, "wikitext2:ppl", per_sample)["acc"]
    fam = curves[curves["model_family"] == "fam"]
    assert (fam["estimate"] == ESTIMATE_HELDOUT).all()
    expected = fam["key"].map(lambda key: _half_b(truth[key]))
    np.testing.assert_allclose(fam[ACC_COLUMN], expected, rtol=0, atol=1e-12)
    # the test can fail: on all examples the baselines are far from their half B
    base = fam[fam["bits"] == 16]
    full = base["key"].map(lambda key: _all(truth[key]))
    assert (np.abs(full - base[ACC_COLUMN]) > 0.15).all()
    old = main_curves(res.cells, per_sample=per_sample)  # the library's curves on their own
    old_base = old[(old["model_family"] == "fam") & (old["bits"] == 16)]
    assert (old_base["estimate"] == ESTIMATE_ALL).all()  # what the figure used to draw
    # a family where nothing was selected keeps all examples (less noise, nothing to match)
    solo = curves[curves["model_family"] == "solo"]
    assert (solo["estimate"] == ESTIMATE_ALL).all()
    np.testing.assert_allclose(
        solo[ACC_COLUMN], solo["key"].map(lambda key: _all(truth[key])), atol=1e-6
    )
    # perplexity is never split: its curve keeps the recorded values
    ppl = main_curves_for(res.cells, "wikitext2:ppl", per_sample)["ppl"]
    recorded = res.cells.set_index("key")["wikitext2:ppl"]
    np.testing.assert_allclose(ppl["wikitext2:ppl"], ppl["key"].map(recorded))


def _black_lines(ax) -> list:
    """Drawn black lines (the baseline), not error-bar caps (which have no line style)."""
    return [
        line
        for line in ax.get_lines()
        if to_hex(line.get_color()) == "#000000" and line.get_linestyle() not in ("None", "")
    ]


def test_the_baseline_drawn_is_its_half_b_mean(split_store):
    root, truth = split_store
    res = load_results(root)
    curves = main_curves_for(res.cells, "wikitext2:ppl", res.per_sample())
    fig = build_figure("scaling_acc", res.cells, 4, "wikitext2:ppl", 1e9, curves)
    assert fig is not None
    (ax,) = [a for a in fig.axes if a.get_title().startswith("fam")]
    (line,) = _black_lines(ax)
    base = res.cells[(res.cells["model_family"] == "fam") & (res.cells["bits"] == 16)]
    base = base.sort_values("total_model_bits")
    np.testing.assert_allclose(np.asarray(line.get_xdata(), float), base["total_model_bits"])
    want = [_half_b(truth[key]) for key in base["key"]]
    np.testing.assert_allclose(np.asarray(line.get_ydata(), float), want, atol=1e-12)


def test_kbit_plot_tables_use_the_same_half(split_store, tmp_path):
    root, truth = split_store
    out = tmp_path / "out"
    assert plot_main([str(root), "--out", str(out), "--jobs", "1"]) == 0
    table = pd.read_csv(out / "bit_optimal_k.csv")
    at = table[(table["model_family"] == "fam") & np.isclose(table["log2_budget"], 20.0)]
    key = "day/fam-m0-k16-none"  # 16-bit total bits 2^20: the curve's own point
    assert at["k=16"].item() == pytest.approx(_half_b(truth[key]), abs=1e-9)
    stats = (out / "stats.md").read_text()
    cells = load_results(root).cells
    r = np.corrcoef(cells["wikitext2:ppl"], cells[ACC_COLUMN])[0, 1]
    assert r > 0.9  # by construction: perplexity rises with accuracy
    assert f"= {r:.3f} over {len(cells)} stable cells" in stats
    assert "Caveat: the sign is the opposite of the paper's" in stats


def test_same_examples_leaves_points_without_per_example_results_and_warns(caplog):
    curves = pd.DataFrame(
        {
            "model_family": ["f", "f", "f"],
            "key": ["a", "b", "c"],
            ACC_COLUMN: [0.5, 0.6, 0.7],
            "estimate": [ESTIMATE_HELDOUT, ESTIMATE_ALL, ESTIMATE_ALL],
        }
    )
    scores = pd.DataFrame({"acc_a": [0.4, 0.1], "acc_b": [0.5, 0.2]}, index=["a", "b"])
    with caplog.at_level(logging.WARNING, logger="analysis"):
        out = same_examples(curves, scores, ACC_COLUMN)
    assert out[ACC_COLUMN].tolist() == [0.5, 0.2, 0.7]
    assert out["estimate"].tolist() == [ESTIMATE_HELDOUT, ESTIMATE_HELDOUT, ESTIMATE_ALL]
    assert "1 point(s) without per-example results" in caplog.text
    pd.testing.assert_frame_equal(same_examples(out, scores, ACC_COLUMN), out)  # idempotent
    assert same_examples(curves, None, ACC_COLUMN) is curves


# ------------------------------------------------------------------- correlation caveat
def _corr_cells(acc: np.ndarray, ppl: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {"wikitext2:ppl": ppl, ACC_COLUMN: acc, f"{ACC_COLUMN}:stderr": np.full(acc.size, 0.01)}
    )


def test_a_positive_correlation_gets_a_plain_caveat_and_a_negative_one_none():
    rng = np.random.default_rng(0)
    ppl = np.linspace(20.0, 60.0, 12)
    noise = rng.normal(0, 0.002, ppl.size)
    up = _corr_cells(0.25 + 0.0003 * ppl + noise, ppl)  # near chance, rising with ppl
    down = _corr_cells(0.70 - 0.004 * ppl + noise, ppl)
    r_up = np.corrcoef(up["wikitext2:ppl"], up[ACC_COLUMN])[0, 1]
    r_down = np.corrcoef(down["wikitext2:ppl"], down[ACC_COLUMN])[0, 1]
    assert r_up > 0 > r_down

    pos = correlation_lines(up, cap=100.0)
    assert pos[0].startswith(f"- Pearson r(wikitext2:ppl, {ACC_COLUMN}) = {r_up:.3f} over 12")
    caveat = pos[1]
    assert caveat.startswith("  - Caveat: the sign is the opposite of the paper's (-0.94)")
    lo, hi = up[ACC_COLUMN].min(), up[ACC_COLUMN].max()
    assert f"accuracy here spans {lo:.3f} to {hi:.3f}" in caveat
    assert f"{(hi - lo) / 0.01:.1f} times its typical standard error" in caveat
    assert "does not mean" in caveat and "near chance" in caveat

    neg = correlation_lines(down, cap=100.0)
    assert len(neg) == 1 and f"= {r_down:.3f} over 12" in neg[0]


def test_caveat_rules_at_the_edges():
    assert correlation_caveat(-0.5, 4) == ""  # the paper's sign: r and n speak for themselves
    assert "opposite" in correlation_caveat(0.0, 40)  # no relation is not the paper's either
    few = correlation_caveat(0.98, 5)
    assert "only 5 cells" in few and "opposite" in few
    assert correlation_caveat(float("nan"), 2).startswith("r could not be computed")
    two = correlation_lines(_corr_cells(np.array([0.3, 0.4]), np.array([10.0, 12.0])), 100.0)
    assert "= nan over 2" in two[0] and "could not be computed" in two[1]


# ------------------------------------------------------------ nothing degenerate written
def _one_dtype_store(root, ks=(3, 16)):
    rng = np.random.default_rng(5)
    for m, n in enumerate(SIZES[:2]):
        for k in ks:
            s = _samples(rng, 0.6, 0.6)
            rows = _rows("fam", m, n, k, "none" if k == 16 else "int", s, ppl=30.0 + m)
            write_cell(rows, cell_path(root, "day", rows[0].cell_id))
    return root


def test_figures_that_compare_nothing_are_skipped_with_one_line_each(tmp_path, caplog):
    store = _one_dtype_store(tmp_path / "store")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="analysis"):
        assert plot_main([str(store), "--out", str(out), "--k", "3", "--jobs", "1"]) == 0
    skipped = {
        r.getMessage().split(":", 1)[0]: r.getMessage().split(": ", 1)[1]
        for r in caplog.records
        if r.getMessage().startswith("skipped ") and r.levelno == logging.INFO
    }
    # one data type, one block size: a line and its 16-bit baseline still compare (drawn);
    # one method (blockwise) has nothing to set against: skipped, with the reason
    assert skipped["skipped method_k3.png, method_k3.pdf"].startswith("nothing to compare at k=3")
    assert (
        "no proxy or centered cell"
        in skipped["skipped proxy_centering_k3.png, proxy_centering_k3.pdf"]
    )
    for name in ("method_k3", "method_ppl_k3", "proxy_centering_k3"):
        assert not (out / f"{name}.png").exists() and not (out / f"{name}.pdf").exists()
    for name in ("dtype_k3", "block_size_k3"):
        assert f"skipped {name}.png, {name}.pdf" not in skipped
        assert (out / f"{name}.png").is_file() and (out / f"{name}.pdf").is_file()
    assert (out / "scaling_acc.png").is_file() and (out / "bit_optimal_k.csv").is_file()


def test_no_figure_at_all_exits_1_and_still_writes_the_tables(tmp_path, capsys, caplog):
    store = _one_dtype_store(tmp_path / "store", ks=(16,))  # baselines only: nothing to compare
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="analysis"):
        assert plot_main([str(store), "--out", str(out), "--jobs", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kbit-plot: no figure could be drawn from 2 ok")
    assert not list(out.glob("*.png")) and not list(out.glob("*.pdf"))
    assert len(pd.read_csv(out / "cells.csv")) == 2
    assert not (out / "bit_optimal_k.csv").exists()  # one k: nothing to compare
    assert "skipped bit_optimal_k.csv, bit_optimal_k.md: only k=16" in caplog.text
    assert "skipped scaling_acc.png, scaling_acc.pdf: no family has both" in caplog.text


def test_a_store_without_accuracy_skips_the_accuracy_tables(tmp_path, capsys, caplog):
    root = tmp_path / "store"
    rows = [empty_record(sweep="s", cell_id="c", task="t", metric="acc", value=0.5)]
    write_cell(rows, cell_path(root, "s", "c"))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="analysis"):
        assert plot_main([str(root), "--out", str(out), "--jobs", "1"]) == 1
    assert "no figure could be drawn" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["cells.csv", "cells.md"]
    assert f"skipped best_config.csv, best_config.md: no cell has {ACC_COLUMN}" in caplog.text
