"""The method comparison figure and table: one line per method, methods never merge."""

from __future__ import annotations

import json

from harness.records import MEAN_ZEROSHOT_TASK, Record, cell_path, write_cell


def _store(tmp_path):
    """3 models x {blockwise, gptq, hqq} at int k=3, block 64, + baselines, two measurements."""
    accs = {"blockwise": 0.40, "gptq": 0.45, "hqq": 0.43}
    for m, (model, n) in enumerate([("m/a", 1e6), ("m/b", 4e6), ("m/c", 1.6e7)]):
        for method, acc in [*accs.items(), ("none", 0.5)]:
            bits = 16 if method == "none" else 3
            settings = {"gptq": {"damp": 0.01, "n_samples": 128}}.get(method, {})
            base = dict(
                sweep="methods", cell_id=f"{m}{method}", model=model, model_family="fam",
                method=method, method_settings=json.dumps(settings, sort_keys=True),
                dtype="none" if bits == 16 else "int", dtype_family="int", bits=bits,
                block_size=None if bits == 16 else 64, n_params=int(n),
                total_model_bits=n * (bits + 0.25 * (bits < 16)), device_class="cpu",
                compute_dtype="float32", data_digest="abc",
            )  # fmt: skip
            rows = [
                Record(**base, task=MEAN_ZEROSHOT_TASK, metric="acc", value=acc + 0.02 * m),
                Record(**base, task="heldout", metric="ppl", value=30.0 / (1 + m) / acc),
            ]
            write_cell(rows, cell_path(tmp_path, "methods", f"{m}{method}"))
    return tmp_path


def test_method_figure_draws_one_line_per_method(tmp_path):
    from analysis.figures import method_figure
    from analysis.load import load_results

    cells = load_results(_store(tmp_path)).cells
    fig = method_figure(cells, 3)
    labels = sorted(line.get_label() for line in fig.axes[0].get_lines())
    assert labels == ["blockwise", "gptq", "hqq"]  # one gptq setting: not spelled out
    for line in fig.axes[0].get_lines():
        assert len(line.get_xdata()) == 3  # one point per model
    ppl = method_figure(cells, 3, "heldout:ppl")
    assert ppl is not None and ppl.axes[0].get_yscale() == "log"
    assert method_figure(cells[~cells["method"].isin(["gptq", "hqq"])], 3) is None


def test_kbit_plot_writes_the_method_figures(tmp_path):
    from analysis.cli import plot_main

    store = _store(tmp_path / "store")
    assert plot_main([str(store), "--out", str(tmp_path / "fig"), "--k", "3", "--jobs", "1"]) == 0
    assert (tmp_path / "fig" / "method_k3.png").is_file()
    assert (tmp_path / "fig" / "method_ppl_k3.png").is_file()


def test_each_method_gets_its_bit_optimal_table(tmp_path):
    from analysis.cli import plot_main

    store = _store(tmp_path / "store")
    assert plot_main([str(store), "--out", str(tmp_path / "fig"), "--k", "3", "--jobs", "1"]) == 0
    for name in ("bit_optimal_k", "bit_optimal_k_gptq", "bit_optimal_k_hqq"):
        assert (tmp_path / "fig" / f"{name}.md").is_file(), name
    gptq = (tmp_path / "fig" / "bit_optimal_k_gptq.csv").read_text()
    assert "best_k" in gptq


def test_method_settings_are_named_where_a_method_has_two(tmp_path):
    from analysis.figures import method_figure
    from analysis.load import load_results

    store = _store(tmp_path)
    extra = dict(sweep="methods", cell_id="x", model="m/a", model_family="fam", method="gptq",
                 method_settings='{"damp": 0.1, "n_samples": 128}', dtype="int",
                 dtype_family="int", bits=3, block_size=64, n_params=int(1e6),
                 total_model_bits=3.25e6, device_class="cpu", compute_dtype="float32",
                 data_digest="abc")  # fmt: skip
    write_cell([Record(**extra, task=MEAN_ZEROSHOT_TASK, metric="acc", value=0.3)],
               cell_path(store, "methods", "x"))  # fmt: skip
    fig = method_figure(load_results(store).cells, 3)
    labels = sorted(line.get_label() for line in fig.axes[0].get_lines())
    assert labels == ["blockwise", "gptq{damp=0.01,n_samples=128}",
                      "gptq{damp=0.1,n_samples=128}", "hqq"]  # fmt: skip
