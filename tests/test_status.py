"""kbit-status counts done / failed / pending per sweep from the store and the sweep manifest."""

from __future__ import annotations

import json
import random

import pytest

from harness.records import STATUS_FAILED, STATUS_OK, cell_path, empty_record, write_cell
from harness.sweep.plan import MANIFEST
from harness.sweep.status import main, store_status


def _write(root, sweep, cid, status, n_rows=2):
    if status == STATUS_OK:
        rows = [
            empty_record(sweep=sweep, cell_id=cid, task=f"t{i}", metric="ppl", value=float(i))
            for i in range(n_rows)
        ]
    else:
        rows = [
            empty_record(
                sweep=sweep, cell_id=cid, status=STATUS_FAILED, error="ValueError: boom\ntrace"
            )
        ]
    write_cell(rows, cell_path(root, sweep, cid))


def _manifest(root, sweep, ids):
    (root / sweep).mkdir(parents=True, exist_ok=True)
    (root / sweep / MANIFEST).write_text(
        json.dumps({"sweep": sweep, "cells": {i: f"cell={i}" for i in ids}})
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_match_a_plain_tally(tmp_path, seed):
    rng = random.Random(seed)
    expected = {}
    for sweep in ("demo", "micro"):
        fates = [rng.choice(["ok", "failed", "pending"]) for _ in range(rng.randint(1, 25))]
        ids = [f"{sweep}{i:03d}" for i in range(len(fates))]
        _manifest(tmp_path, sweep, ids)
        for cid, fate in zip(ids, fates, strict=True):
            if fate != "pending":
                _write(tmp_path, sweep, cid, STATUS_OK if fate == "ok" else STATUS_FAILED)
        expected[sweep] = (fates.count("ok"), fates.count("failed"), fates.count("pending"))
    (tmp_path / ".hydra").mkdir()  # launcher logs live in dot-folders and are not sweeps
    got = {s.sweep: (s.done, s.failed, s.pending) for s in store_status(tmp_path)}
    assert got == expected


def test_cli_prints_table_and_errors(tmp_path, capsys):
    _manifest(tmp_path, "demo", ["a", "b", "c"])
    _write(tmp_path, "demo", "a", STATUS_OK)
    _write(tmp_path, "demo", "b", STATUS_FAILED)
    _write(tmp_path, "adhoc", "z", STATUS_OK)  # a cell run outside any sweep: no manifest
    rc = main([str(tmp_path), "--errors"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1  # not everything is done
    rows = {line.split()[0]: line.split()[1:] for line in out[1:] if not line.startswith("demo/")}
    assert rows["demo"] == [
        "3",
        "1",
        "1",
        "0",
        "0",
        "1",
    ]  # cells done failed queued running pending
    assert rows["adhoc"] == ["1", "1", "0", "0", "0", "0"]
    assert rows["total"] == ["4", "2", "1", "0", "0", "1"]
    assert "demo/b: ValueError: boom" in out


def test_all_done_exits_zero(tmp_path, capsys):
    _manifest(tmp_path, "demo", ["a"])
    _write(tmp_path, "demo", "a", STATUS_OK)
    assert main([str(tmp_path), "--sweep", "demo"]) == 0


def test_bad_input_is_named(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "demo").mkdir()
    assert main([str(tmp_path), "--sweep", "dem"]) == 2
    assert "sweeps there: ['demo']" in capsys.readouterr().err


def test_cells_held_by_live_jobs_are_queued_or_running(tmp_path, monkeypatch):
    """A planned cell without a record, or a failed one retried, that a live job holds is
    counted queued / running as the scheduler says; a dead job's cells stay pending/failed."""
    from harness.cluster import leases as claims
    from harness.records import Record, cell_path, write_cell
    from harness.sweep.plan import Cell, SweepPlan, write_manifest

    ids = ["a", "b", "c", "d", "e"]
    plan = SweepPlan(cells=[Cell([f"x={i}"], i, "s", str(tmp_path)) for i in ids])
    write_manifest(plan)
    write_cell([Record(sweep="s", cell_id="a")], cell_path(tmp_path, "s", "a"))
    failed = Record(sweep="s", cell_id="b", status="failed", error="E: x")
    write_cell([failed], cell_path(tmp_path, "s", "b"))
    claims.write_claims(tmp_path, "s", "7", [["b", "c"], ["d"]])
    claims.write_claims(tmp_path, "s", "8", [["e"]])
    states = {"7_0": "RUNNING", "7_1": "PENDING", "8_0": "COMPLETED"}
    monkeypatch.setattr(claims, "scheduler_states", lambda: states)
    (row,) = store_status(tmp_path)
    assert (row.done, row.failed, row.queued, row.running, row.pending) == (1, 0, 1, 2, 1)
    assert row.pending_ids == ["e"] and row.cells == 5
    assert (tmp_path / "s" / ".jobs" / "8.json").exists()  # kbit-status only reads
