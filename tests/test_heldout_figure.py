"""The held-out loss figure and findings (analysis/heldout.py) on stores with known answers.

Every store is written with the runner's own writer (Record + write_cell), each cell with a
``heldout`` ppl row and an ``nll`` row whose ``per_sample`` is the per-window NLL, as the
runner records them. The planted losses:

    loss(model, k, window) = BASE[model] + SHIFT[window] + EFFECT[k] (+ DTYPE_PENALTY) + noise

SHIFT is large (sd 0.5, shared by every cell: how hard each window's text is), the noise small
(sd 0.02, per cell and window). So each loss on its own is uncertain to about +-0.07, while a
paired difference between two cells is known to about +-0.006: the point of the figure.
Models have 2^17..2^20 parameters and BASE falls by 0.3 per doubling, so at the budget 2^22
total bits the 4-bit curve (2^20 parameters: 4.1 + 0.05) beats the 8-bit one (2^19: 4.4) by 0.25
and the 16-bit one (2^18: 4.7) by 0.55.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from analysis.heldout import (
    FIGURE_NAME,
    FINDINGS_NAME,
    findings_summary,
    format_interval,
    heldout_figures,
    heldout_loss,
)
from analysis.load import load_results
from harness.demo import FINDINGS, HEADLINE, SWEEP, findings_text
from harness.records import MEAN_ZEROSHOT_TASK, Record, cell_path, write_cell

LOG2_SIZES = (17, 18, 19, 20)
N_WINDOWS = 200
EFFECT = {3: 0.3, 4: 0.05, 8: 0.0}
DTYPE_PENALTY = {"quantile": 0.0, "int": 0.03}  # quantile is the better data type everywhere
N_BOOT = 2000


def base_loss(lp: int) -> float:
    return 5.0 - 0.3 * (lp - 17)


def write_store(
    root: Path, effect: dict[int, float] = EFFECT, windows: bool = True, sweep: str = "syn"
) -> Path:
    rng = np.random.default_rng(1)
    shift = rng.normal(0.0, 0.5, N_WINDOWS)
    for lp in LOG2_SIZES:
        configs = [(k, d) for k in effect for d in DTYPE_PENALTY] + [(16, "none")]
        for k, dtype in configs:
            extra = 0.0 if k == 16 else effect[k] + DTYPE_PENALTY[dtype]
            loss = base_loss(lp) + shift + extra + rng.normal(0.0, 0.02, N_WINDOWS)
            base = dict(
                sweep=sweep,
                cell_id=f"m{lp}-{k}-{dtype}",
                model=f"syn/m{lp}",
                model_family="syn",
                n_params=2**lp,
                method="none" if k == 16 else "blockwise",
                dtype=dtype,
                bits=k,
                block_size=None if k == 16 else 64,
                total_model_bits=float(2**lp * k),
                bits_per_param=float(k),
                device_class="cpu",
                compute_dtype="float32",
                data_digest="d1",
            )
            nll = float(loss.mean())
            rows = [
                Record(**base, task="heldout", metric="ppl", value=math.exp(nll), n_samples=127 * N_WINDOWS),
                Record(**base, task="heldout", metric="nll", value=nll, n_samples=127 * N_WINDOWS,
                       per_sample=loss.tolist() if windows else None),
                Record(**base, task=MEAN_ZEROSHOT_TASK, metric="acc", value=0.5),
            ]  # fmt: skip
            write_cell(rows, cell_path(root, sweep, base["cell_id"]))
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("heldout") / "results")


@pytest.fixture(scope="module")
def loss(store):
    return heldout_loss(load_results(store), n_boot=N_BOOT)


def point(loss, lp: int, k: int):
    pts = loss.points
    return pts[(pts["model"] == f"syn/m{lp}") & (pts["bits"] == k)].iloc[0]


def test_paired_intervals_recover_the_planted_increase_over_16_bit(loss):
    assert loss.task == "heldout" and loss.n_windows == N_WINDOWS
    assert loss.estimate.startswith("half B")
    for lp in LOG2_SIZES:
        for k, true in EFFECT.items():
            p = point(loss, lp, k)
            assert p.d16_low <= true <= p.d16_high, (lp, k, p.d16, p.d16_low, p.d16_high)
            assert p.d16_high - p.d16_low < 0.03  # paired: the shared window shift cancels
        p3 = point(loss, lp, 3)
        assert p3.d16_low > 0  # 3-bit's 0.3 nats is separated from 0
    # Each loss on its own is as uncertain as the text sample: wider than the 4-bit effect.
    p = point(loss, 20, 16)
    assert p.nll_high - p.nll_low > EFFECT[4]


def test_data_type_is_chosen_on_half_a_and_the_better_one_wins(loss):
    quantized = loss.points[loss.points["bits"] != 16]
    assert set(quantized["config"].str.split(" ").str[0]) == {"quantile"}
    assert set(quantized["n_candidates"]) == {2}


def test_equal_bits_comparison_finds_the_planted_best_k(loss):
    at = loss.budgets[np.isclose(loss.budgets["budget_bits"], 2.0**22)].set_index("bits")
    assert at.loc[4, "rank_a"] == 1 and set(at["best_k"]) == {4}
    for k, gap in ((8, 0.25), (16, 0.55)):
        assert at.loc[k, "d_best_low"] <= gap <= at.loc[k, "d_best_high"], at.loc[k]
        assert at.loc[k, "d_best_low"] > 0


def test_findings_are_computed_from_the_store(store, tmp_path):
    res = load_results(store)
    loss = heldout_loss(res, n_boot=N_BOOT)
    text = " ".join(findings_summary(loss))
    p3 = point(loss, 20, 3)
    assert "largest model (syn/m20" in text
    assert f"3-bit {format_interval(p3.d16, p3.d16_low, p3.d16_high, signed=True)}" in text
    assert "k=4" in text
    # Another planted effect gives other numbers: nothing in the sentences is fixed text.
    other = write_store(tmp_path / "other", effect={3: 0.6, 4: 0.05, 8: 0.0})
    loss2 = heldout_loss(load_results(other), n_boot=N_BOOT)
    q3 = point(loss2, 20, 3)
    assert 0.55 < q3.d16 < 0.65
    text2 = " ".join(findings_summary(loss2))
    assert f"3-bit {format_interval(q3.d16, q3.d16_low, q3.d16_high, signed=True)}" in text2
    assert f"3-bit {format_interval(p3.d16, p3.d16_low, p3.d16_high, signed=True)}" not in text2


def test_heldout_figures_writes_figure_findings_and_tables(store, tmp_path):
    out = tmp_path / "figures"
    paths = heldout_figures(load_results(store), out, n_boot=N_BOOT)
    names = {p.name for p in paths}
    assert {f"{FIGURE_NAME}.png", f"{FIGURE_NAME}.pdf", f"{FINDINGS_NAME}.md"} <= names
    assert (out / f"{FIGURE_NAME}.png").stat().st_size > 10_000
    md = (out / f"{FINDINGS_NAME}.md").read_text()
    assert "half A" in md and "paired" in md and "syn/m20" in md


def test_a_store_without_per_window_losses_gives_nothing(tmp_path):
    store = write_store(tmp_path / "old", windows=False)
    out = tmp_path / "figures"
    assert heldout_figures(load_results(store), out) == []
    assert not out.exists()
    assert heldout_loss(load_results(store)) is None


def test_kbit_plot_draws_the_headline_the_demo_prints(tmp_path):
    from analysis.cli import plot_main

    store = write_store(tmp_path / "results", sweep=SWEEP)
    out = tmp_path / "figures"
    assert plot_main([str(store), "--out", str(out), "--jobs", "1"]) == 0
    assert (out / HEADLINE).stat().st_size > 10_000 and (out / FINDINGS).is_file()
    bullets = findings_text(out / FINDINGS)
    assert bullets.startswith("- ") and "largest model" in bullets and "## " not in bullets


def test_intervals_show_enough_decimals_for_their_width():
    assert format_interval(0.0123, 0.0101, 0.0145, signed=True) == "+0.0123 [0.0101, 0.0145]"
    assert (
        format_interval(2.1e-5, -1.0e-5, 5.3e-5, signed=True) == "+0.000021 [-0.000010, 0.000053]"
    )
    assert format_interval(4.9, 4.8, 5.0) == "4.900 [4.800, 5.000]"
