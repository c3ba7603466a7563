"""A damaged or foreign file in the store is named and skipped, never a crash; its cell re-runs."""

from __future__ import annotations

import logging
import os
import stat

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.records import (
    SCHEMA,
    STATUS_FAILED,
    STATUS_OK,
    cell_path,
    cell_status,
    empty_record,
    read_store,
    records_from_table,
    scan_store,
    to_table,
    write_cell,
)
from harness.sweep.plan import MANIFEST
from harness.sweep.status import main, store_status

# Columns added in schema_version 2: a version-1 file has every other column.
V2_COLUMNS = [
    "device_class",
    "compute_dtype",
    "dtype_overrides",
    "data_source",
    "task_version",
    "data_digest",
    "trust_remote_code",
]


def _good(root, sweep, cid, status=STATUS_OK):
    row = empty_record(sweep=sweep, cell_id=cid, task="t", metric="ppl", value=1.0, status=status)
    return write_cell([row], cell_path(root, sweep, cid))


def _truncated(path):
    _good(path.parent.parent, path.parent.name, path.stem)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(3000))


def _empty(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _foreign(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), path)


def _wrong_type(path):
    """Our column names, but ``status`` stored as an integer: not readable as SCHEMA."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"cell_id": [path.stem], "status": [1]}), path)


def _legacy_v1(root, sweep, cid):
    """A schema_version-1 cell file: SCHEMA without the v2 columns."""
    row = empty_record(sweep=sweep, cell_id=cid, task="t", metric="acc", value=0.5)
    row.schema_version = 1
    table = to_table([row]).drop_columns(V2_COLUMNS)
    path = cell_path(root, sweep, cid)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


BAD = {
    "truncated": (_truncated, "unreadable parquet"),
    "random": (_random_bytes, "unreadable parquet"),
    "empty": (_empty, "unreadable parquet"),
    "foreign": (_foreign, "no column(s) ['cell_id', 'status']"),
    "wrong_type": (_wrong_type, "column 'status' is int64"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_file_is_a_problem_and_the_rest_is_read(tmp_path, kind, caplog):
    make, reason = BAD[kind]
    good = _good(tmp_path, "s", "good")
    bad = cell_path(tmp_path, "s", "bad")
    make(bad)
    scan = scan_store(tmp_path)
    assert scan.files == [good]
    assert [p for p, _ in scan.problems] == [bad]
    assert reason in scan.problems[0][1] and "\n" not in scan.problems[0][1]
    with caplog.at_level(logging.WARNING, logger="harness.records"):
        table = read_store(tmp_path)
    assert table.num_rows == 1 and table.schema.equals(SCHEMA)
    assert str(bad) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="harness.records"):
        assert cell_status(bad) is None  # a resumed sweep runs the cell again
    assert str(bad) in caplog.text and "run again" in caplog.text


def test_legacy_v1_file_is_readable(tmp_path):
    path = _legacy_v1(tmp_path, "s", "old")
    _good(tmp_path, "s", "new")
    scan = scan_store(tmp_path, "s")
    assert scan.problems == [] and path in scan.files
    assert cell_status(path) == STATUS_OK
    table = read_store(tmp_path, "s")
    assert table.schema.equals(SCHEMA) and table.num_rows == 2
    old = next(r for r in records_from_table(table) if r.cell_id == "old")
    assert old.schema_version == 1 and old.value == 0.5
    assert old.data_source is None and old.device_class is None  # not recorded in version 1


def test_damaged_data_pages_are_skipped(tmp_path, caplog):
    """A footer that reads but data that does not: read_store still returns the rest."""
    good = _good(tmp_path, "s", "good")
    bad = _good(tmp_path, "s", "bad")
    data = bytearray(bad.read_bytes())
    data[4:200] = b"\xff" * 196  # the first column chunks; the footer at the end is intact
    bad.write_bytes(bytes(data))
    assert len(scan_store(tmp_path).files) == 2  # the footer alone cannot tell
    with caplog.at_level(logging.WARNING, logger="harness.records"):
        table = read_store(tmp_path)
    assert table.column("cell_id").to_pylist() == ["good"] and good.exists()
    assert str(bad) in caplog.text


def test_empty_store_scans_empty(tmp_path):
    scan = scan_store(tmp_path)
    assert scan.files == [] and scan.problems == []
    assert read_store(tmp_path).num_rows == 0


def test_status_counts_problems_as_failed_and_names_them(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / MANIFEST).write_text(
        '{"sweep": "demo", "cells": {"a": "", "b": "", "c": "", "d": "", "e": ""}}'
    )
    _good(tmp_path, "demo", "a")
    _good(tmp_path, "demo", "b", STATUS_FAILED)
    _truncated(cell_path(tmp_path, "demo", "c"))
    _foreign(cell_path(tmp_path, "demo", "d"))
    [row] = store_status(tmp_path)
    assert (row.done, row.failed, row.pending) == (1, 3, 1)
    assert sorted(row.problems) == ["c.parquet", "d.parquet"]
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == [
        "demo",
        "5",
        "1",
        "3",
        "0",
        "0",
        "1",
    ]  # cells done failed queued running pending
    assert out[2].startswith("problems: 2 unreadable cell file(s)")
    assert out[3].startswith("demo/c.parquet: unreadable parquet")
    assert out[4].startswith("demo/d.parquet: not a kbit cell file")
    assert len(out) == 5


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664)])
def test_cell_file_mode_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = _good(tmp_path, "s", "c")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
