"""Every figure on a store holding every kind of cell (issue 22: figures that never mislead).

A real store is built once per module on the nano zoo (int, float, quantile, NVFP4, MXFP4,
GPTQ, HQQ, proxy cells at k = 3 and 4, two block sizes, three model sizes, 16-bit baselines),
then ``kbit-plot`` renders it and every figure it writes is checked on its Axes: it has data,
every point of a comparing figure has an interval bar, no line joins two cells of one model,
legends name no data digest when the panel holds one, and the log2 x axis labels >= 3 ticks.
The small tests at the end check the interval rules against independent references.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from zoo_fixtures import nano_zoo  # noqa: F401  (session fixture)

CONF = Path(__file__).resolve().parents[1] / "conf"
SIZES = ["l1d32", "l2d48", "l2d64"]
KINDS = [  # (name, overrides)
    ("base", ["bits=16"]),
    ("int3", ["dtype=int", "bits=3"]),
    ("int4", ["dtype=int", "bits=4"]),
    ("float3", ["dtype=float", "bits=3"]),
    ("float4", ["dtype=float", "bits=4"]),
    ("quantile4", ["dtype=quantile", "bits=4"]),
    ("int4b32", ["dtype=int", "bits=4", "block_size=32"]),
    ("nvfp4", ["format=nvfp4"]),
    ("mxfp4", ["format=mxfp4"]),
    ("gptq4", ["method=gptq", "dtype=int", "bits=4", "method.n_samples=8"]),
    ("gptq3", ["method=gptq", "dtype=int", "bits=3", "method.n_samples=8"]),
    ("hqq4", ["method=hqq", "dtype=int", "bits=4"]),
    ("hqq3", ["method=hqq", "dtype=int", "bits=3"]),
    ("proxy4", ["method=proxy", "dtype=int", "bits=4"]),
]
NOT_COMPARING = {"heldout_bits"}  # analysis.heldout: its own paired intervals, tested apart


@pytest.fixture(scope="module")
def every_kind_store(nano_zoo, tmp_path_factory) -> Path:  # noqa: F811
    """The store: every kind of cell on three nano models, cheap evaluation (eval.limit)."""
    from hydra import compose, initialize_config_dir

    from harness.config.schema import register_schema
    from harness.run.execute import ModelCache, run_and_record

    results = tmp_path_factory.mktemp("every_kind")
    register_schema()
    cache = ModelCache()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for size in SIZES:
            for name, extra in KINDS:
                cfg = compose("config", overrides=[
                    f"model={nano_zoo[size]}", "model_family=nano", "eval=zoo", "eval.limit=40",
                    "device=cpu", f"results_dir={results}", "sweep=every", *extra,
                ])  # fmt: skip
                assert run_and_record(cfg, cache) == "ok", (size, name)
    cache.clear()
    return results


@pytest.fixture(scope="module")
def rendered(every_kind_store, tmp_path_factory) -> dict[str, dict]:
    """``kbit-plot`` at k=4 and k=3: {figure name: {"fig": Figure, "files": [...]}}."""
    import analysis.cli as cli
    import analysis.heldout as heldout

    figures: dict[str, dict] = {}
    real = cli.save_figure

    def keep(fig, out_dir, name, **kw):
        paths = real(fig, out_dir, name, **kw)
        figures.setdefault(name, {"fig": fig, "files": []})["files"] += paths
        return paths

    mp = pytest.MonkeyPatch()
    mp.setattr(cli, "save_figure", keep)
    mp.setattr(heldout, "save_figure", keep)
    try:
        for k in (4, 3):
            out = tmp_path_factory.mktemp(f"plot_k{k}")
            argv = [str(every_kind_store), "--out", str(out), "--jobs", "1", "--k", str(k)]
            assert cli.plot_main(argv) == 0
    finally:
        mp.undo()
    return figures


def _data_lines(ax) -> list:
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def _points(ax) -> int:
    """Points drawn as data: line vertices and scatter marks (baselines), not unstable marks."""
    n = sum(len(ln.get_xdata()) for ln in _data_lines(ax))
    for cont in ax.containers:  # errorbar lines drawn without a legend entry (held-out panels)
        line = cont.lines[0] if isinstance(cont, ErrorbarContainer) else None
        if line is not None and line.get_label().startswith("_"):
            n += len(line.get_xdata())
    for coll in ax.collections:
        label = coll.get_label()
        if hasattr(coll, "get_offsets") and not label.startswith(("_", "unstable")):
            n += len(coll.get_offsets())
    return n


def _unstable(ax) -> int:
    return sum(len(c.get_offsets()) for c in ax.collections
               if c.get_label().startswith("unstable"))  # fmt: skip


def _bars(ax) -> int:
    """Interval bars with a finite, positive length (one per point that has an interval)."""
    n = 0
    for cont in ax.containers:
        if isinstance(cont, ErrorbarContainer):
            for coll in cont.lines[2]:
                for seg in coll.get_segments():
                    seg = np.asarray(seg, dtype=float)
                    n += int(np.isfinite(seg).all() and seg[1, 1] > seg[0, 1])
    return n


def _labelled_x_ticks(ax) -> list[str]:
    lo, hi = sorted(ax.get_xlim())
    return [t.get_text() for t, x in zip(ax.get_xticklabels(), ax.get_xticks(), strict=True)
            if lo <= x <= hi and t.get_text()]  # fmt: skip


@pytest.mark.slow
def test_kbit_plot_renders_every_figure_of_a_store_with_every_kind_of_cell(rendered):
    expected = {"scaling_acc", "scaling_ppl", "dtype_k4", "block_size_k4", "method_k4",
                "method_ppl_k4", "proxy_centering_k4", "heldout_bits", "dtype_k3",
                "method_k3", "method_ppl_k3"}  # fmt: skip
    assert expected <= set(rendered), sorted(expected - set(rendered))
    for name, item in rendered.items():
        assert all(p.is_file() and p.stat().st_size > 0 for p in item["files"]), name
        fig = item["fig"]
        fig.draw_without_rendering()
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert axes, name
        for ax in axes:
            assert _points(ax) > 0, (name, ax.get_title())
            if name in NOT_COMPARING:
                continue
            # every point has its interval bar (unstable perplexities, drawn at the cap, none)
            assert _bars(ax) == _points(ax) - _unstable(ax) > 0, (name, ax.get_title())
            assert "95% CI" in fig.texts[1].get_text(), name  # the caption says what bars are
            ticks = _labelled_x_ticks(ax)
            assert len(ticks) >= 3, (name, ticks)
            labels = ax.get_legend_handles_labels()[1]
            assert labels and not any("data=" in lab for lab in labels), (name, labels)
            for line in _data_lines(ax):  # a line never joins two cells of one model
                x = np.asarray(line.get_xdata(), dtype=float)
                assert len(np.unique(x)) == len(x), (name, line.get_label())


@pytest.mark.slow
def test_every_figure_function_survives_every_mix(every_kind_store):
    """The figure functions on every k and measure (and on subsets that leave one kind of
    cell): a Figure or None, never an exception, and never a figure without data."""
    from analysis import figures as F
    from analysis.load import ACC_COLUMN, load_results
    from analysis.tables import with_window_stderr

    res = load_results(every_kind_store)
    cells = with_window_stderr(res.cells, res.per_sample())
    ppl = "heldout:ppl"
    subsets = {"all": cells, **{m: cells[cells["method"].isin([m, "none"])]
                                for m in ("blockwise", "gptq", "hqq", "proxy")}}  # fmt: skip
    subsets["no baseline"] = cells[cells["bits"] != 16]
    for what, sub in subsets.items():
        for k in (3, 4, 5):
            for y in (ACC_COLUMN, ppl):
                figs = [F.block_size_figure(sub, k, y), F.dtype_figure(sub, k, y),
                        F.proxy_centering_figure(sub, k, y), F.method_figure(sub, k, y)]  # fmt: skip
                for fig in figs:
                    if fig is not None:
                        assert all(_points(ax) > 0 for ax in fig.axes if ax.get_visible()), what
        acc = F.scaling_figure(sub)
        ppl_fig = F.perplexity_figure(sub, ppl, cap=1e4)
        if what != "all" and what != "blockwise":  # no baseline, or no block-wise k line:
            assert acc is None and ppl_fig is None  # nothing compares, no panel, no figure
        else:
            assert acc is not None and ppl_fig is not None, what
            for ax in ppl_fig.axes:
                assert _bars(ax) == _points(ax) > 0, what  # windows give ppl intervals


@pytest.mark.slow
def test_legends_name_a_data_digest_only_where_it_differs_within_a_panel(every_kind_store):
    from analysis.figures import dtype_figure, scaling_figure
    from analysis.load import load_results

    cells = load_results(every_kind_store).cells
    other = cells.assign(model_family="nano_b", data_digest="ffff00000000",
                         key=cells["key"] + "_b")  # fmt: skip
    two_families = pd.concat([cells, other], ignore_index=True)
    for fig in (dtype_figure(two_families, 4), scaling_figure(two_families)):
        titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
        assert len(titles) == 2 and all("data=" in t for t in titles), titles  # named once
        for ax in fig.axes:
            assert not any("data=" in lab for lab in ax.get_legend_handles_labels()[1])
    # one panel holding two data sets: the lines say which, and never merge
    mixed = cells.copy()
    half = mixed["model"].str.endswith("l2d64")
    mixed.loc[half, "data_digest"] = "ffff00000000"
    fig = dtype_figure(mixed, 4)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any("data=ffff" in lab for lab in labels) and any("data=" in lab for lab in labels)
    for line in _data_lines(fig.axes[0]):
        digests = {lab.split("data=")[1] for lab in [line.get_label()]}
        assert len(digests) == 1


# ------------------------------------------------------------------- fast: the rules alone


def test_pow2_locator_labels_three_ticks_on_a_narrow_span():
    from matplotlib.figure import Figure

    from analysis.figures import Pow2Locator, pow2_label

    for lo, hi in [(2**20.1, 2**20.9), (2**20, 2**21.8), (2**10, 2**40), (2**30.05, 2**30.4)]:
        ticks = Pow2Locator().tick_values(lo, hi)
        inside = ticks[(ticks >= lo) & (ticks <= hi)]
        assert len(inside) >= 3, (lo, hi, ticks)
        assert len(inside) <= 9
        assert all(pow2_label(t, 0) for t in inside)
    assert pow2_label(2**20.5, 0) == "2^20.5" and pow2_label(2**21, 0) == "2^21"
    assert pow2_label(3.0, 0) == ""
    fig = Figure()
    ax = fig.subplots()
    ax.plot([2**20.2, 2**20.6, 2**20.9], [1, 2, 3])
    from analysis.figures import _finish_axis

    _finish_axis(ax, "t", "y")
    fig.draw_without_rendering()
    assert len(_labelled_x_ticks(ax)) >= 3


def test_interval_is_normal_from_stderr_and_t_with_df_and_log_scale_for_ppl():
    from scipy import stats

    from analysis.tables import interval

    lo, hi = interval([0.5], [0.02])
    assert np.allclose([lo[0], hi[0]], stats.norm.interval(0.95, loc=0.5, scale=0.02))
    lo, hi = interval([0.5], [0.02], df=[5])
    assert np.allclose([lo[0], hi[0]], stats.t.interval(0.95, 5, loc=0.5, scale=0.02))
    lo, hi = interval([math.exp(3.0)], [0.1], df=[np.nan], log_scale=True)
    assert np.allclose([lo[0], hi[0]], np.exp(stats.norm.interval(0.95, loc=3.0, scale=0.1)))
    lo, hi = interval([0.5], [np.nan])
    assert np.isnan(lo[0]) and np.isnan(hi[0])  # unknown: no interval, never a made-up one


def test_window_stderr_is_honest_for_correlated_windows():
    """Independent windows: batch means agree with sd/sqrt(n). Strongly correlated windows
    (AR(1), phi = 0.9): the naive sd/sqrt(n) is far too small; batch means are near the true
    standard error of the mean, sigma_long / sqrt(n) with sigma_long = sd * sqrt((1+phi)/(1-phi))."""
    from analysis.tables import window_stderr

    rng = np.random.default_rng(0)
    n = 4096
    iid = rng.normal(4.0, 0.3, n)
    se, df = window_stderr(iid)
    assert df == math.isqrt(n) - 1
    assert se == pytest.approx(iid.std(ddof=1) / math.sqrt(n), rel=0.35)
    phi, ratios = 0.9, []
    for seed in range(20):
        e = np.random.default_rng(seed).normal(0, 1, n)
        x = np.empty(n)
        x[0] = e[0]
        for i in range(1, n):
            x[i] = phi * x[i - 1] + math.sqrt(1 - phi**2) * e[i]
        true_se = math.sqrt((1 + phi) / (1 - phi)) / math.sqrt(n)  # unit marginal variance
        ratios.append(window_stderr(x)[0] / true_se)
        naive = x.std(ddof=1) / math.sqrt(n)
        assert naive < 0.4 * true_se
    assert 0.7 < np.median(ratios) < 1.15
    assert math.isnan(window_stderr([1.0, 2.0, 3.0])[0])


def test_half_b_stderr_matches_lm_eval_rule_on_the_odd_examples():
    from analysis.tables import half_b_stderr

    a = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    b = [0, 1, 1, 1, 0, 1]
    ps = pd.DataFrame({"key": ["s/c"] * 3, "task": ["t1", "t2", "zeroshot_mean"],
                       "metric": ["acc"] * 3, "per_sample": [a, b, a + b]})  # fmt: skip
    se = []
    for v in (a, b):
        odd = np.asarray(v[1::2], dtype=float)
        se.append(np.std(odd, ddof=1) / math.sqrt(odd.size))  # lm-eval's mean_stderr
    assert half_b_stderr(ps)["s/c"] == pytest.approx(math.sqrt(se[0] ** 2 + se[1] ** 2) / 2)


def _frame(rows: list[dict]) -> pd.DataFrame:
    """A cell frame as analysis.load builds it, from (family, model, method, dtype, scale, k)."""
    from analysis.load import ACC_COLUMN

    out = []
    for i, r in enumerate(rows):
        n = {"m1": 1e6, "m2": 2e6, "m3": 4e6}[r["model"]]
        bits = r.get("bits", 4)
        out.append(dict(
            key=f"s/c{i}", model=r["model"], model_family=r.get("family", "fam"),
            method=r.get("method", "blockwise"), dtype=r.get("dtype", "int"),
            dtype_overrides="{}", bits=bits, block_size=None if bits == 16 else 64.0,
            scale_format=r.get("scale", "fp16"), centering=False, outlier_fraction=0.0,
            method_settings="{}", total_model_bits=n * (bits + 0.25), n_params=n,
            device_class="cpu", compute_dtype="float32", data_digest=r.get("digest", "abc"),
            **{ACC_COLUMN: 0.3 + 0.01 * i, f"{ACC_COLUMN}:stderr": 0.02},
        ))  # fmt: skip
    return pd.DataFrame(out)


def test_cells_that_differ_only_in_scale_format_get_two_named_lines():
    from analysis.figures import dtype_figure

    rows = [dict(model=m, dtype=d, scale=s) for m in ("m1", "m2")
            for d, s in (("int", "fp16"), ("int", "bf16"), ("float", "fp16"))]  # fmt: skip
    fig = dtype_figure(_frame(rows), 4)
    ax = fig.axes[0]
    labels = sorted(ln.get_label() for ln in _data_lines(ax))
    assert labels == ["float", "int scale_format=bf16", "int scale_format=fp16"]
    assert _bars(ax) == _points(ax) == 6


def test_a_panel_with_nothing_to_compare_is_not_drawn():
    from analysis.figures import dtype_figure, scaling_figure

    # family a: a k line and its baseline; family b: a baseline only; family c: one k line only
    rows = [dict(family="a", model=m, bits=b) for m in ("m1", "m2") for b in (4, 16)]
    rows += [dict(family="b", model=m, bits=16) for m in ("m1", "m2")]
    rows += [dict(family="c", model=m) for m in ("m1", "m2")]
    cells = _frame(rows)
    fig = scaling_figure(cells)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["a"]
    assert scaling_figure(cells[cells["model_family"] != "a"]) is None
    fig = dtype_figure(cells, 4)  # a: int line + baseline compares; c: one line, no baseline
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["a"]
    assert dtype_figure(cells[cells["model_family"] == "c"], 4) is None
