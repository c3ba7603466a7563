"""The parquet store: round trip keeps every field and type; a killed write leaves nothing."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from harness.records import (
    SCHEMA,
    Record,
    cell_files,
    cell_path,
    cell_status,
    read_cell,
    read_store,
    records_from_table,
    write_cell,
)


def full_record(**changes) -> Record:
    """Every field set to a non-default value of its declared type."""
    base = dict(
        sweep="s", cell_id="0123456789abcdef", model="/m/pythia-tiny",
        model_family="pythia", architecture="gpt_neox", n_params=123_456_789_012,
        n_nonembedding_params=98_765, n_quantized_params=4321,
        quantized_modules=["a.b", "c.d"], method="proxy", dtype="quantile",
        method_settings='{"outlier_fraction": 0.02}',
        dtype_family="quantile", bits=3, block_size=2**40, scale_format="bf16", centering=True,
        outlier_fraction=0.02, total_model_bits=1.5e12, bits_per_param=3.25, task="piqa",
        metric="acc_norm", value=0.123456789012345, stderr=0.01, n_samples=1838,
        per_sample=[1.0, 0.0, 1.0], status="ok", error=None, load_s=1.5, quantize_s=2.5,
        eval_s=3.5, forward_s=3.0, wall_s=8.0, version_harness="0.1.0", version_torch="2.13",
        version_transformers="5.23", version_lm_eval="0.4.13", git_commit="abc+dirty",
        hostname="h", device="cuda:0 (H100)", created_at="2026-01-01T00:00:00+00:00", seed=7,
        config="model: x\nbits: 3\n", device_class="cuda", compute_dtype="bfloat16",
        dtype_overrides='{"exponent_bits": 3}', data_source="local:/d/piqa.jsonl;sha256=ab",
        task_version="1.0+kbit1", data_digest="0123abcd", trust_remote_code=True,
        job_id="4242_17", model_reused=True, train_tokens=300_000_000_000,
        axes='{"quantize_head": true}', plugins='{"kbit_toy": "1.0"}',
    )  # fmt: skip
    base.update(changes)
    return Record(**base)


def test_record_fields_and_schema_list_the_same_columns_in_order():
    assert [f.name for f in dataclasses.fields(Record)] == SCHEMA.names


def test_every_field_is_set_in_the_fixture():
    defaults = Record()
    changed = {f.name for f in dataclasses.fields(Record)
               if getattr(full_record(), f.name) != getattr(defaults, f.name)}  # fmt: skip
    assert changed == {f.name for f in dataclasses.fields(Record)} - {
        "schema_version",
        "status",
        "error",
    }


def test_round_trip_keeps_every_field_and_type(tmp_path):
    rows = [
        full_record(),
        full_record(task=None, metric=None, value=None, stderr=None, n_samples=None,
                    per_sample=None, block_size=None, status="failed", error="ValueError: x"),
    ]  # fmt: skip
    path = write_cell(rows, cell_path(tmp_path, "s", "cell"), "model: x\n")
    table = read_cell(path)
    assert table.schema.equals(SCHEMA)
    back = records_from_table(table)
    assert back == rows
    for got, want in zip(back, rows, strict=True):
        for f in dataclasses.fields(Record):
            assert type(getattr(got, f.name)) is type(getattr(want, f.name)), f.name
    assert path.with_suffix(".yaml").read_text() == "model: x\n"
    assert cell_status(path) == "failed"
    assert read_store(tmp_path).num_rows == 2 and read_store(tmp_path, "other").num_rows == 0


_WRITER = textwrap.dedent(
    """
    import sys, time
    import pyarrow.parquet as pq
    from harness import records

    real = pq.write_table
    def half_then_hang(table, fh, **kw):
        real(table.slice(0, table.num_rows // 2), fh, **kw)
        fh.flush()
        print("HALF", flush=True)
        time.sleep(600)
    records.pq.write_table = half_then_hang
    rows = [records.Record(task=f"t{i}", per_sample=[1.0] * 1000) for i in range(200)]
    records.write_cell(rows, sys.argv[1])
    """
)


def test_sigkill_mid_write_leaves_no_visible_file(tmp_path):
    path = cell_path(tmp_path, "s", "cell")
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "HALF"  # killed while the write is in progress
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.1)
    assert not path.exists()
    assert cell_status(path) is None  # a resumed sweep runs the cell again
    assert cell_files(tmp_path) == [] and read_store(tmp_path).num_rows == 0
    leftovers = list(path.parent.iterdir())
    assert leftovers and all(p.name.startswith(".") for p in leftovers)  # only a hidden temp file


def test_empty_cell_is_refused(tmp_path):
    with pytest.raises(ValueError, match="records is empty"):
        write_cell([], cell_path(tmp_path, "s", "c"))
