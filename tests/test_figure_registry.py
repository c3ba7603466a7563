"""Figures declared once (issue 23, item 5): kbit-plot, the held-out view, kbit-fit and the
claims report draw what :mod:`analysis.figure_registry` holds, and a plugin adds a figure
through the same public function, loaded before any figure is listed."""

from __future__ import annotations

import logging
import sys
import types

import pytest
from matplotlib.figure import Figure

import analysis.cli as cli
import analysis.fit as fit
import analysis.heldout as heldout
from analysis.figure_registry import (
    FIGURE_PATHS,
    figure_spec,
    register_figure,
    registered_figures,
    unregister_figure,
)
from analysis.load import load_results
from analysis.synthetic import write_synthetic_store

GRID = dict(
    families=("pythia",),
    sizes=(125e6, 1.3e9),
    ks=(3, 4, 16),
    dtypes=("int", "float"),
    block_sizes=(64,),
    n_examples=40,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("store"), **GRID)


@pytest.fixture
def added():
    """Names registered by a test; taken back afterwards so no test sees another's figure."""
    names: list[str] = []
    yield names
    for name in names:
        if name in {s.name for s in registered_figures()}:
            unregister_figure(name)


def _text_figure(text: str) -> Figure:
    fig = Figure(figsize=(2, 2))
    fig.text(0.5, 0.5, text)
    return fig


def test_each_command_lists_its_figures_from_the_registry():
    """The names kbit-plot, the held-out view and kbit-fit write are the registered ones."""
    plot = [s.name for s in registered_figures("plot")]
    assert list(cli.FIGURE_NAMES) == plot
    assert plot[:2] == ["scaling_acc", "scaling_ppl"]
    assert all("{k}" in n for n in plot[2:])
    assert figure_spec(heldout.FIGURE_NAME).path == "heldout"
    assert figure_spec("fit").path == "fit"
    # fit's files are the json, the markdown and one file per format of each fit figure
    assert fit.OUT_NAMES[2:] == ("fit.png", "fit.pdf")
    assert len({s.name for s in registered_figures()}) == len(registered_figures())


def test_register_refuses_a_taken_name_and_an_unknown_path(added):
    with pytest.raises(ValueError, match="already registered"):
        register_figure("scaling_acc")(lambda inputs: None)
    with pytest.raises(ValueError, match="allowed"):
        register_figure("toy", path="nowhere")
    with pytest.raises(ValueError, match="plain file stem"):
        register_figure("../escape")
    assert figure_spec("scaling_acc").build is not None  # unchanged by the refusal


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_registered_plot_figure_is_drawn_at_k_by_kbit_plot(store, tmp_path, added, jobs):
    seen = []

    @register_figure("toy_cells_k{k}", description="cells at k")
    def toy(inputs):
        at_k = inputs.cells[inputs.cells["bits"] == inputs.k]
        seen.append((inputs.k, len(at_k)))
        return _text_figure(f"{len(at_k)} cells")

    added.append("toy_cells_k{k}")
    out = tmp_path / "out"
    assert cli.plot_main([str(store), "--out", str(out), "--k", "3", "--jobs", jobs]) == 0
    assert (out / "toy_cells_k3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "toy_cells_k3.pdf").read_bytes()[:5] == b"%PDF-"
    assert not (out / "toy_cells_k{k}.png").exists()
    if jobs == "1":  # drawn in this process: the inputs are the store's cells at k=3
        cells = load_results(store).cells
        assert seen == [(3, int((cells["bits"] == 3).sum()))] * 2  # png and pdf


def test_a_skip_reason_keeps_a_figure_out_and_says_why(store, tmp_path, added, caplog):
    register_figure("toy_skipped", skip_reason=lambda inputs: "no toy data here")(
        lambda inputs: _text_figure("never")
    )
    added.append("toy_skipped")
    declined = register_figure("toy_declined")(lambda inputs: None)
    added.append("toy_declined")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="analysis"):
        assert cli.plot_main([str(store), "--out", str(out), "--jobs", "1"]) == 0
    assert declined(None) is None
    assert not list(out.glob("toy_*"))
    assert "skipped toy_skipped.png, toy_skipped.pdf: no toy data here" in caplog.text
    assert "skipped toy_declined.png, toy_declined.pdf: nothing to compare" in caplog.text


def test_a_plugin_registers_a_figure_before_kbit_plot_lists_them(
    store, tmp_path, added, monkeypatch
):
    """kbit-plot calls harness.plugins.load_plugins before listing: a figure that a plugin
    registers there is drawn (here a stand-in loader module)."""
    calls = []

    def load_plugins():
        calls.append("loaded")
        if "plugin_view" not in {s.name for s in registered_figures()}:
            register_figure("plugin_view")(lambda inputs: _text_figure(str(inputs.k)))
            added.append("plugin_view")

    loader = types.ModuleType("harness.plugins")
    loader.load_plugins = load_plugins
    monkeypatch.setitem(sys.modules, "harness.plugins", loader)
    assert "plugin_view" not in {s.name for s in registered_figures()}
    out = tmp_path / "out"
    assert cli.plot_main([str(store), "--out", str(out), "--jobs", "1"]) == 0
    assert calls == ["loaded"]
    assert (out / "plugin_view.png").exists() and (out / "plugin_view.pdf").exists()


@pytest.mark.parametrize("tool", ["kbit-plot", "kbit-fit"])
def test_a_plugin_that_fails_to_load_is_refused_in_one_line(
    store, tmp_path, monkeypatch, capsys, tool
):
    def load_plugins():
        raise ValueError("entry point 'broken' = 'nowhere' (group kbit.plugins): no module")

    loader = types.ModuleType("harness.plugins")
    loader.load_plugins = load_plugins
    monkeypatch.setitem(sys.modules, "harness.plugins", loader)
    out = tmp_path / "out"
    main = cli.plot_main if tool == "kbit-plot" else fit.fit_main
    assert main([str(store), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{tool}: ") and "broken" in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_a_claims_figure_is_drawn_from_the_claims_report(store, tmp_path, added):
    reports = []

    @register_figure("toy_verdicts", path="claims")
    def verdicts(report):
        reports.append(report)
        return _text_figure(", ".join(f.verdict for f in report.findings))

    added.append("toy_verdicts")
    out = tmp_path / "out"
    assert cli.plot_main([str(store), "--out", str(out), "--jobs", "1", "--report"]) == 0
    assert (out / "toy_verdicts.png").exists()
    (report,) = reports
    written = (out / "findings.md").read_text()
    assert all(f.verdict in written for f in report.findings)
    assert sorted({f.claim for f in report.findings}) == [1, 2, 3, 4]


def test_every_path_is_one_a_command_draws():
    assert FIGURE_PATHS == ("plot", "heldout", "fit", "claims")
    with pytest.raises(ValueError, match="allowed"):
        registered_figures("elsewhere")
