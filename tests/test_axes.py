"""Each axis declared once: a toy field with its role in the cell schema reaches the cell id,
the record, the analysis grouping and the claims' pairing, with nothing else edited.

The toy axis is added the way a developer would add one: a field of the cell schema declared
with ``field(metadata=axis(role))`` (here on a subclass that replaces
``harness.config.schema.CellConfig`` for the test). The cell id, the record fields and the
analysis are then computed by the real code paths; the expectations are stated from the
declarations (two values of a quantization axis are two configurations, a run-only field is
not part of a measurement), not read back from the code under test.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import pandas as pd
import pytest
from omegaconf import OmegaConf

import harness.config.schema as cell_schema
from harness.config.axes import Role, axis, flagged, names, non_result_fields
from harness.config.identity import Resolved, identity_data, identity_hash
from harness.records import Record, method_setting_columns, mirrored_settings, write_cell


@dataclass
class ToyCell(cell_schema.CellConfig):
    """The cell schema plus a toy quantization axis and a toy run-only field."""

    toy: int = field(default=0, metadata=axis(Role.quantization))
    toy_note: str = field(default="", metadata=axis(Role.run_only))


@pytest.fixture
def toy_schema(monkeypatch):
    monkeypatch.setattr(cell_schema, "CellConfig", ToyCell)
    return ToyCell


RESOLVED = Resolved(device_class="cpu", compute_dtype="float32", model_dir=None, sources={})


def _cell(**changes) -> dict:
    """A quantized cell as plain data (``OmegaConf.to_container(cfg, resolve=True)``)."""
    from harness.dtypes import get_spec

    spec = dataclasses.asdict(get_spec("int"))
    dtype = {k: getattr(v, "value", v) for k, v in spec.items()}
    cell = dict(
        model="zoo:toy/s1", bits=4, block_size=64, scale_format="fp16", centering=False,
        method={"name": "blockwise"}, quantize_embeddings=False, quantize_head=False,
        dtype=dtype, eval={"name": "e", "perplexity": [], "tasks": ["piqa"], "mean_of": None,
                           "limit": None, "limit_perplexity": True, "batch_size": 8,
                           "num_fewshot": 0, "bootstrap_iters": 1000},
        sweep="axes", results_dir="results", data_root=None, zoo_dir="zoo", device="cpu",
        compute_dtype="auto", trust_remote_code=False, seed=0, model_family="toy", plugins=[],
        toy=0, toy_note="",
    )  # fmt: skip
    cell.update(changes)
    return cell


def _cell_id(cell: dict) -> str:
    return identity_hash(identity_data(cell, RESOLVED))


def _records(cell: dict, value: float) -> list[Record]:
    from harness.run.record import cell_fields, quantization_fields

    cfg = OmegaConf.create(cell)
    quant = quantization_fields(cfg)
    fields = cell_fields(cell, RESOLVED, _cell_id(cell), quant, provenance={})
    return [
        Record(**fields, task="piqa", metric="acc", value=value, n_samples=10),
        Record(**fields, task="zeroshot_mean", metric="acc", value=value, n_samples=10),
    ]


def test_the_toy_axis_is_in_the_cell_id_and_a_run_only_field_is_not(toy_schema):
    assert _cell_id(_cell(toy=0)) != _cell_id(_cell(toy=1))
    assert _cell_id(_cell(toy_note="a")) == _cell_id(_cell(toy_note="b"))
    # the 16-bit baseline is one cell whatever the quantization axes say (toy included)
    assert _cell_id(_cell(bits=16, toy=0)) == _cell_id(_cell(bits=16, toy=1))


def test_the_toy_axis_reaches_the_record_analysis_grouping_and_pairing(toy_schema, tmp_path):
    from analysis.load import load_results
    from analysis.tables import config_keys, pairing_columns, pairing_keys

    for toy, value in ((0, 0.5), (1, 0.6)):
        cell = _cell(toy=toy, toy_note=f"run {toy}")
        records = _records(cell, value)
        assert json.loads(records[0].axes) == ({"toy": toy} if toy else {})
        write_cell(records, tmp_path / "axes" / f"{records[0].cell_id}.parquet")
    cells = load_results(tmp_path).cells.sort_values("toy", ignore_index=True)
    assert len(cells) == 2
    assert list(cells["toy"]) == ["", "1"]  # a column per axis; "" = the default
    assert "toy_note" not in cells.columns  # run-only: not a configuration
    keys = config_keys(cells)
    assert keys.nunique() == 2
    for vary in ("block_size", "dtype", ()):
        assert pairing_keys(cells, vary).nunique() == 2
    grouped = cells.groupby(["model", "bits", *pairing_columns("block_size")], dropna=False)
    assert grouped.ngroups == 2  # the two toy values are never paired


def test_a_store_without_the_axes_column_groups_as_before():
    """Cells of a store written before the generic axes column: the same keys as a frame in
    which the column says "no axis set" (what every such cell was)."""
    from analysis.tables import config_keys, pairing_keys

    row = dict(method="blockwise", dtype="int", dtype_overrides="{}", block_size=64.0,
               scale_format="fp16", centering=False, outlier_fraction=0.0, method_settings="{}",
               device_class="cpu", compute_dtype="float32", data_digest="ab")  # fmt: skip
    old = pd.DataFrame([row, {**row, "block_size": float("nan")}])
    new = old.assign(axes="{}")
    assert list(config_keys(old)) == list(config_keys(new))
    assert list(pairing_keys(old, "block_size")) == list(pairing_keys(new, "block_size"))
    assert config_keys(new.assign(axes='{"toy": 1}')).iloc[0] != config_keys(new).iloc[0]


def test_derived_lists_follow_the_roles():
    schema = cell_schema.CellConfig
    from harness.config.identity import NON_RESULT_FIELDS, QUANT_FIELDS
    from harness.config.overrides import FORMAT_FIELDS, PATH_FIELDS

    run_only = set(names(schema, Role.run_only))
    assert {"results_dir", "sweep", "model_family", "zoo_dir", "plugins"} <= run_only
    assert run_only | {"device", "compute_dtype", "data_root", "hydra"} == set(NON_RESULT_FIELDS)
    assert set(QUANT_FIELDS) == {"dtype", "block_size", "scale_format", "centering", "method",
                                 "quantize_embeddings", "quantize_head"}  # fmt: skip
    assert PATH_FIELDS == cell_schema.USER_PATH_FIELDS == ("results_dir", "data_root", "zoo_dir")
    assert FORMAT_FIELDS == ("bits", "block_size", "scale_format")
    assert flagged(ToyCell, "user_path") == PATH_FIELDS
    assert "toy_note" in non_result_fields(ToyCell) and "toy" not in non_result_fields(ToyCell)


def test_a_method_setting_column_is_filled_from_any_method_and_derived_for_old_stores():
    from analysis.load import fill_config_defaults
    from analysis.tables import config_labels

    assert "outlier_fraction" in method_setting_columns()
    # any method whose settings have the setting fills the column; others get the default
    assert mirrored_settings({"outlier_fraction": 0.1, "other": 3})["outlier_fraction"] == 0.1
    assert mirrored_settings({"damp": 0.01})["outlier_fraction"] == 0.0
    frame = pd.DataFrame([
        dict(method="proxy", method_settings='{"outlier_fraction": 0.05}', dtype="int",
             dtype_overrides="{}", block_size=64.0, scale_format="fp16", centering=False),
        dict(method="gptq", method_settings='{"damp": 0.01, "seed": 0}', dtype="int",
             dtype_overrides="{}", block_size=64.0, scale_format="fp16", centering=False),
    ])  # fmt: skip
    filled = fill_config_defaults(frame)  # a store without the column
    assert list(filled["outlier_fraction"]) == [0.05, 0.0]
    labels = list(config_labels(frame))
    assert labels == ["int bs=64 fp16 proxy(0.05)", "int bs=64 fp16 gptq{damp=0.01,seed=0}"]
