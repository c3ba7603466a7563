"""analysis/ on real-world stores: bad files, legacy cells, failed (NaN) cells, variants.

Every store here is written with the runner's own writer (harness.records.write_cell) from
analysis.synthetic records, plus hand-made damage; expected answers are counted from the
records written, never from the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.advise import advise
from analysis.cli import advise_main, plot_main
from analysis.figures import dtype_figure, scaling_figure
from analysis.load import load_results
from analysis.synthetic import synthetic_cells, write_synthetic_store
from analysis.tables import best_config_table, bit_optimal_table, config_labels, main_curves
from harness.records import STATUS_FAILED, Record, cell_path, to_table, write_cell

SMALL = dict(
    families=("pythia",),
    sizes=(125e6, 1.3e9, 6.7e9),
    ks=(4, 8, 16),
    dtypes=("int", "quantile"),
    block_sizes=(64,),
    n_examples=40,
)
NEW_COLUMNS = [
    "dtype_overrides",
    "device_class",
    "compute_dtype",
    "data_source",
    "task_version",
    "data_digest",
    "trust_remote_code",
]


def _n_cells(**grid) -> int:
    return len(synthetic_cells(**grid))


def _damage(store, sweep: str = "synthetic") -> list:
    """A truncated copy of a good cell, random bytes, and a foreign-schema parquet."""
    folder = store / sweep
    good = sorted(folder.glob("*.parquet"))[0]
    truncated = folder / "truncated.parquet"
    shutil.copy(good, truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    noise = folder / "noise.parquet"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    foreign = folder / "foreign.parquet"
    pq.write_table(pa.table({"name": ["x"], "score": [1.0]}), foreign)
    return [truncated, noise, foreign]


@pytest.fixture
def damaged_store(tmp_path):
    store = write_synthetic_store(tmp_path / "store", **SMALL)
    return store, _damage(store)


def test_load_names_problem_files_and_keeps_good_cells(damaged_store, caplog):
    store, bad = damaged_store
    with caplog.at_level(logging.WARNING, logger="analysis"):
        res = load_results(store)
    assert sorted(p.name for p, _ in res.problems) == sorted(p.name for p in bad)
    assert all(reason and "\n" not in reason for _, reason in res.problems)
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(warned) == len(bad)
    for path in bad:
        assert sum(str(path) in line for line in warned) == 1
    assert len(res.cells) == _n_cells(**SMALL)


def test_plot_and_advise_go_on_past_problem_files(damaged_store, tmp_path, capsys, caplog):
    store, bad = damaged_store
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="analysis"):
        assert plot_main([str(store), "--out", str(out), "--jobs", "1"]) == 0
    for path in bad:
        assert str(path) in caplog.text
    assert len(pd.read_csv(out / "cells.csv")) == _n_cells(**SMALL)
    skipped = pd.read_csv(out / "skipped_files.csv")
    assert sorted(skipped["file"]) == sorted(str(p) for p in bad)
    assert f"{len(bad)} unreadable cell file(s) skipped" in (out / "stats.md").read_text()

    assert advise_main([str(store), "--budget", "1GiB", "--n-boot", "200"]) == 0
    captured = capsys.readouterr()
    for path in bad:
        assert f"Skipped unreadable cell file: {path}" in captured.out
    assert "Best:" in captured.out
    assert advise_main([str(store), "--budget", "1GiB", "--n-boot", "200", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(f["file"] for f in data["skipped_files"]) == sorted(str(p) for p in bad)


def _legacy_table(rows: list[Record]) -> pa.Table:
    """The rows as a schema_version-1 file wrote them: without the version-2 columns."""
    table = to_table([dataclasses.replace(r, schema_version=1) for r in rows])
    return table.drop_columns(NEW_COLUMNS)


def test_legacy_cells_are_excluded_with_one_warning(tmp_path, caplog, capsys):
    store = write_synthetic_store(tmp_path / "store", **SMALL)
    legacy = synthetic_cells(**{**SMALL, "sizes": (350e6, 2.7e9)}, seed=1)
    for rows in legacy:
        path = cell_path(store, rows[0].sweep, rows[0].cell_id)
        pq.write_table(_legacy_table(rows), path)
    with caplog.at_level(logging.WARNING, logger="analysis"):
        res = load_results(store)
    assert res.problems == []  # compatible files: readable, just not usable
    assert res.n_legacy == len(legacy)
    assert len(res.cells) == _n_cells(**SMALL)
    warned = [r.getMessage() for r in caplog.records if "legacy" in r.getMessage()]
    assert len(warned) == 1
    assert f"{len(legacy)} legacy cell(s)" in warned[0]
    assert "re-run them; docs/records.md" in warned[0]
    assert advise_main([str(store), "--budget", "1GiB", "--n-boot", "200"]) == 0
    assert f"Excluded {len(legacy)} legacy cell(s)" in capsys.readouterr().out


# --- failed (non-finite) cells -------------------------------------------------------------


def _nan_failed_cell(template: list[Record]) -> list[Record]:
    """A NonFiniteError cell: one failed row per task, each carrying a plausible value.

    Smaller than every other cell and nearly perfect, so it would win every table, curve
    and budget it were allowed into.
    """
    rows = []
    for r in template:
        if r.metric != "acc":
            continue
        rows.append(
            dataclasses.replace(
                r,
                cell_id="nan-cell",
                dtype="nan_dtype",
                total_model_bits=r.total_model_bits / 4,
                value=0.99,
                per_sample=[1.0] * len(r.per_sample) if r.per_sample else None,
                status=STATUS_FAILED,
                error="NonFiniteError: logits contain NaN (model weights overflowed)",
            )
        )
    return rows


def test_failed_nan_cell_is_never_used(tmp_path):
    cells = synthetic_cells(**SMALL)
    four = [c for c in cells if c[0].bits == 4]
    failed = _nan_failed_cell(four[0])
    store = tmp_path / "store"
    for rows in [*cells, failed]:
        write_cell(rows, cell_path(store, rows[0].sweep, rows[0].cell_id))
    res = load_results(store)
    key = "synthetic/nan-cell"
    assert res.failed["cell_id"].tolist() == ["nan-cell"]
    assert res.failed["error"].str.startswith("NonFiniteError").all()
    assert key not in set(res.cells["key"])
    per_sample = res.per_sample()
    curves = main_curves(res.cells, per_sample=per_sample)
    assert key not in set(curves["key"])
    budgets = [failed[0].total_model_bits, 2.0**40]
    table = best_config_table(res.cells, budgets, per_sample=per_sample)
    assert "nan_dtype" not in " ".join(table["config"].dropna())
    assert table["n_fitting"].isna().iloc[0]  # at its size nothing else fits: no answer
    advice = advise(res, 2.0**40, n_boot=200)
    assert key not in {advice.best.key, advice.runner_up.key}
    assert "nan_dtype" not in bit_optimal_table(curves).to_string()


def test_failed_nan_cell_is_listed_by_kbit_plot(tmp_path):
    cells = synthetic_cells(**SMALL)
    failed = _nan_failed_cell(cells[0])
    store = tmp_path / "store"
    for rows in [*cells, failed]:
        write_cell(rows, cell_path(store, rows[0].sweep, rows[0].cell_id))
    out = tmp_path / "out"
    assert plot_main([str(store), "--out", str(out), "--jobs", "1"]) == 0
    assert "nan-cell" not in set(pd.read_csv(out / "cells.csv")["cell_id"])
    assert pd.read_csv(out / "failed_cells.csv")["cell_id"].tolist() == ["nan-cell"]
    for name in ("best_config.csv", "bit_optimal_k.csv"):
        assert "nan_dtype" not in (out / name).read_text()


# --- variants never merge ----------------------------------------------------------------


def test_dtype_overrides_are_separate_labelled_curves(tmp_path):
    grid = {**SMALL, "dtypes": ("float", ("float", {"exponent_bits": 3}))}
    res = load_results(write_synthetic_store(tmp_path / "store", **grid))
    four = res.cells[res.cells["bits"] == 4]
    labels = set(config_labels(four))
    assert labels == {"float bs=64 fp16", "float{exponent_bits=3} bs=64 fp16"}
    fig = dtype_figure(res.cells, 4)
    lines = {line.get_label(): len(line.get_xdata()) for line in fig.axes[0].get_lines()}
    assert lines == {"float": len(SMALL["sizes"]), "float{exponent_bits=3}": len(SMALL["sizes"])}
    curves = main_curves(res.cells, per_sample=res.per_sample())
    for _, group in curves.groupby("bits"):  # one configuration per curve, never a mix
        assert group["config"].nunique() == 1 and len(group) == len(SMALL["sizes"])
    table = best_config_table(four, [2.0**40])
    assert table["config"].iloc[0] in labels


def _variant_store(tmp_path, field: str, values: tuple[str, str]):
    """Two copies of one grid that differ only in ``field`` (distinct cell ids)."""
    store = tmp_path / "store"
    for i, value in enumerate(values):
        for rows in synthetic_cells(**SMALL, seed=i):
            rows = [
                dataclasses.replace(r, cell_id=f"{r.cell_id}-{i}", **{field: value}) for r in rows
            ]
            write_cell(rows, cell_path(store, rows[0].sweep, rows[0].cell_id))
    return store


@pytest.mark.parametrize(
    ("field", "values", "shown"),
    [
        ("compute_dtype", ("float32", "bfloat16"), ("cpu/float32", "cpu/bfloat16")),
        ("device_class", ("cpu", "cuda"), ("cpu/float32", "cuda/float32")),
        ("data_digest", ("ab12cd34ef56", "9f8e7d6c5b4a"), ("data=ab12", "data=9f8e")),
    ],
)
def test_cells_differing_only_in_numerics_or_data_never_merge(tmp_path, field, values, shown):
    res = load_results(_variant_store(tmp_path, field, values))
    n_models = len(SMALL["sizes"])
    curves = main_curves(res.cells, per_sample=res.per_sample())
    assert set(curves["variant"]) == set(shown)
    for _, group in curves.groupby(["variant", "bits"]):
        assert len(group) == n_models and group[field].nunique() == 1
    fig = scaling_figure(res.cells, curves=curves)
    labels = {line.get_label() for line in fig.axes[0].get_lines()}
    for k in SMALL["ks"]:
        name = "16-bit baseline" if k == 16 else f"{k}-bit"
        assert {f"{name} {s}" for s in shown} <= labels
    table = bit_optimal_table(curves)
    assert set(table["variant"]) == set(shown)
    labels_4 = config_labels(res.cells[res.cells["bits"] == 4])
    assert all(any(s in label for s in shown) for label in labels_4)
    # One store of one variant: nothing to tell apart, so labels stay short.
    one = res.cells[res.cells[field] == values[0]]
    assert not any(s in label for label in config_labels(one) for s in shown)
