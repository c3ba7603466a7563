"""The store and its tools keep their doors shut (issue 21): kbit-status, kbit-plot,
kbit-advise and kbit-fit refuse the same bad input the same way; a FIFO (or any non-regular
file) in the store is named and never opened; option values are refused before the store is
read; kbit-plot draws a store mixing int, float, quantile, NVFP4, MX, GPTQ, HQQ and proxy
cells; a failed cell write leaves no orphan sidecar; and kbit-status's index is trusted only
where the cell file still matches it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from analysis.cli import advise_main, plot_main
from analysis.fit import fit_main
from harness import store_index
from harness.records import (
    MEAN_ZEROSHOT_TASK,
    STATUS_FAILED,
    STATUS_OK,
    Record,
    cell_files,
    cell_path,
    cell_status,
    empty_record,
    read_store,
    scan_store,
    write_cell,
)
from harness.sweep.status import main as status_main
from harness.sweep.status import store_status

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ helpers
def _ok(root: Path, sweep: str, cid: str, value: float = 0.5) -> Path:
    rows = [empty_record(sweep=sweep, cell_id=cid, task="t", metric="acc", value=value)]
    return write_cell(rows, cell_path(root, sweep, cid), "cell: yes\n")


def _failed(root: Path, sweep: str, cid: str, error: str = "ValueError: boom\ntrace") -> Path:
    rows = [empty_record(sweep=sweep, cell_id=cid, status=STATUS_FAILED, error=error)]
    return write_cell(rows, cell_path(root, sweep, cid))


def _tool(name: str, root: Path, out: Path, *extra: str) -> int:
    """Run one of the four store tools in-process with its minimal arguments."""
    if name == "kbit-status":
        return status_main([str(root), *extra])
    if name == "kbit-plot":
        return plot_main([str(root), "--out", str(out), "--jobs", "1", *extra])
    if name == "kbit-advise":
        return advise_main([str(root), "--budget", "1GiB", "--n-boot", "50", *extra])
    return fit_main([str(root), "--out", str(out), *extra])


TOOLS = ["kbit-status", "kbit-plot", "kbit-advise", "kbit-fit"]


def _one_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: "), err
    return lines[0]


def _in_thread(fn, timeout: float = 30.0):
    """``fn()`` on a daemon thread; fails (instead of hanging the suite) if it blocks."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # re-raised below
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn} blocked for {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ------------------------------------------------------------- one behaviour, four tools
@pytest.mark.parametrize("tool", TOOLS)
def test_a_missing_results_folder_is_one_line_exit_2(tool, tmp_path, capsys):
    code = _tool(tool, tmp_path / "nope", tmp_path / "out")
    line = _one_line(capsys, tool)
    assert code == 2 and "RESULTS_DIR=" in line and "nope" in line and "not a folder" in line
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("tool", TOOLS)
def test_an_empty_store_is_one_line_exit_2(tool, tmp_path, capsys):
    (tmp_path / "store" / "demo").mkdir(parents=True)  # a sweep folder, but no cell file
    code = _tool(tool, tmp_path / "store", tmp_path / "out")
    line = _one_line(capsys, tool)
    assert code == 2 and "no cell files under" in line, line
    assert not (tmp_path / "out").exists()


def test_status_still_reports_a_planned_sweep_without_cell_files(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "sweep_manifest.json").write_text(
        json.dumps({"sweep": "demo", "cells": {"a": "", "b": ""}})
    )
    assert status_main([str(tmp_path)]) == 1  # two pending cells: not empty
    assert capsys.readouterr().out.splitlines()[1].split() == ["demo", "2", "0", "0", "0", "0", "2"]


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("sweep", ["../..", "..", "/etc", "demo/../demo", ".hidden", "a b", ""])
def test_a_sweep_that_is_not_a_plain_name_is_refused(tool, sweep, tmp_path, capsys):
    store = tmp_path / "store"
    _ok(store, "demo", "a")
    code = _tool(tool, store, tmp_path / "out", "--sweep", sweep)
    line = _one_line(capsys, tool)
    assert code == 2 and "--sweep=" in line and "not a plain name" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", TOOLS)
def test_an_unknown_sweep_names_the_sweeps_there(tool, tmp_path, capsys):
    store = tmp_path / "store"
    _ok(store, "demo", "a")
    assert _tool(tool, store, tmp_path / "out", "--sweep", "dem") == 2
    line = _one_line(capsys, tool)
    assert "sweeps there: ['demo']" in line and "did you mean 'demo'" in line, line


@pytest.mark.parametrize("tool", TOOLS)
def test_an_unknown_option_is_one_line_exit_2(tool, tmp_path, capsys):
    store = tmp_path / "store"
    _ok(store, "demo", "a")
    assert _tool(tool, store, tmp_path / "out", "--bogus") == 2
    assert "--bogus" in _one_line(capsys, tool)


def test_results_dir_with_a_tilde_is_the_expanded_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    _ok(tmp_path / "res", "demo", "a")
    assert status_main(["~/res"]) == 0
    assert "demo" in capsys.readouterr().out


# ------------------------------------------------------------------ bad option values
_ADVISE = ["--budget", "1GiB"]


@pytest.mark.parametrize(
    ("tool", "args", "needle"),
    [
        ("kbit-advise", [*_ADVISE, "--level", "5"], "--level"),
        ("kbit-advise", [*_ADVISE, "--level", "0"], "--level"),
        ("kbit-advise", [*_ADVISE, "--level", "nan"], "--level"),
        ("kbit-advise", [*_ADVISE, "--n-boot", "0"], "--n-boot"),
        ("kbit-advise", [*_ADVISE, "--n-boot", "x"], "--n-boot"),
        ("kbit-advise", [*_ADVISE, "--seed", "-1"], "--seed"),
        ("kbit-plot", ["--k", "0"], "--k"),
        ("kbit-plot", ["--jobs", "0"], "--jobs"),
        ("kbit-plot", ["--ppl-cap", "-1"], "--ppl-cap"),
        ("kbit-plot", ["--ppl-cap", "inf"], "--ppl-cap"),
        ("kbit-plot", ["--selection", "best"], "--selection"),
    ],
)  # fmt: skip
def test_bad_option_values_are_refused_before_the_store_is_read(
    tool, args, needle, tmp_path, capsys, monkeypatch
):
    import analysis.cli

    def never(*_a, **_k):
        raise AssertionError("the store was read")

    monkeypatch.setattr(analysis.cli, "load_results", never)
    store = tmp_path / "store"
    _ok(store, "demo", "a")
    prog = {"kbit-advise": advise_main, "kbit-plot": plot_main}[tool]
    extra = ["--out", str(tmp_path / "out")] if tool == "kbit-plot" else []
    assert prog([str(store), *extra, *args]) == 2
    assert needle in _one_line(capsys, tool)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", ["kbit-plot", "kbit-fit"])
def test_out_that_is_a_file_is_refused(tool, tmp_path, capsys, monkeypatch):
    store = tmp_path / "store"
    _ok(store, "demo", "a")
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert _tool(tool, store, target) == 2
    line = _one_line(capsys, tool)
    assert "--out=" in line and "not a folder" in line, line
    assert target.read_text() == "keep me"
    inside = target / "sub"  # a folder below a file can never be made
    assert _tool(tool, store, inside) == 2
    assert "not a folder" in _one_line(capsys, tool)


def test_plot_unknown_ppl_task_is_one_line(tmp_path, capsys):
    from analysis.synthetic import write_synthetic_store

    store = write_synthetic_store(tmp_path / "s", families=("a",), sizes=(1e8,), ks=(4, 16),
                                  dtypes=("int",), block_sizes=(64,))  # fmt: skip
    assert plot_main([str(store), "--out", str(tmp_path / "o"), "--ppl-task", "wiki"]) == 2
    assert "wikitext2" in _one_line(capsys, "kbit-plot")


# ------------------------------------------------------- non-regular files in the store
def _odd_store(root: Path) -> dict[str, str]:
    """A sweep with one ok cell beside a FIFO, a socket and a folder named ``*.parquet``."""
    _ok(root, "demo", "good")
    folder = root / "demo"
    os.mkfifo(folder / "fifo.parquet")
    (folder / "dir.parquet").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    path = folder / "sock.parquet"
    if len(str(path)) < 100:  # AF_UNIX path limit
        sock.bind(str(path))
    sock.close()
    kinds = {"fifo.parquet": "a FIFO", "dir.parquet": "a directory"}
    if path.exists():
        kinds["sock.parquet"] = "a socket"
    return kinds


def test_readers_skip_and_name_non_regular_files_without_opening_them(tmp_path, caplog):
    kinds = _odd_store(tmp_path)
    assert _in_thread(lambda: cell_files(tmp_path)) == [tmp_path / "demo" / "good.parquet"]
    scan = _in_thread(lambda: scan_store(tmp_path))
    assert scan.files == [tmp_path / "demo" / "good.parquet"]
    named = {p.name: reason for p, reason in scan.problems}
    assert set(named) == set(kinds)
    for name, kind in kinds.items():
        assert named[name].startswith(kind), named
    table = _in_thread(lambda: read_store(tmp_path, "demo"))
    assert table.column("cell_id").to_pylist() == ["good"]
    assert "fifo.parquet" in caplog.text  # named in the log, like other skipped files
    assert _in_thread(lambda: cell_status(tmp_path / "demo" / "fifo.parquet")) is None

    from analysis.load import load_results

    results = _in_thread(lambda: load_results(tmp_path))
    assert {p.name for p, _ in results.problems} == set(kinds)
    assert results.cells["cell_id"].tolist() == ["good"]


def test_kbit_status_names_a_fifo_and_does_not_hang(tmp_path):
    kinds = _odd_store(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "harness.sweep.status", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # the odd entries count as failed cells
    out = proc.stdout.splitlines()
    n = len(kinds)
    assert out[1].split() == ["demo", str(1 + n), "1", str(n), "0", "0", "0"]
    assert out[2].startswith(f"problems: {n} unreadable cell file(s)")
    assert {line.split(":")[0] for line in out[3:]} == {f"demo/{k}" for k in kinds}
    assert "demo/fifo.parquet: a FIFO, not a regular file" in proc.stdout


def test_a_store_of_only_a_fifo_is_empty_and_says_so(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    os.mkfifo(tmp_path / "demo" / "x.parquet")
    code = _in_thread(lambda: plot_main([str(tmp_path), "--out", str(tmp_path / "o")]))
    line = _one_line(capsys, "kbit-plot")
    assert code == 2 and "no cell files" in line and "demo/x.parquet (a FIFO)" in line


# ------------------------------------------------------------- a store mixing formats
_CONFIGS = [  # (method, dtype, scale format, block size, outlier fraction)
    ("blockwise", "int", "fp16", 64, 0.0),
    ("blockwise", "float", "fp16", 64, 0.0),
    ("blockwise", "quantile", "fp16", 64, 0.0),
    ("blockwise", "e2m1", "nvfp4", 16, 0.0),
    ("blockwise", "e2m1", "mx", 32, 0.0),
    ("gptq", "int", "fp16", 64, 0.0),
    ("hqq", "int", "fp16", 64, 0.0),
    ("proxy", "int", "fp16", 64, 0.02),
]


def _mixed_store(root: Path, configs=_CONFIGS) -> Path:
    for m, n in enumerate([1e6, 4e6]):
        for i, (method, dtype, scale, bs, outl) in enumerate(
            [*configs, ("none", "none", "fp16", None, 0.0)]
        ):
            bits = 16 if method == "none" else 4
            base = dict(
                sweep="mixed", cell_id=f"m{m}c{i}", model=f"m/{m}", model_family="fam",
                method=method, dtype=dtype, dtype_family=dtype, bits=bits, block_size=bs,
                scale_format=scale, outlier_fraction=outl, n_params=int(n),
                total_model_bits=n * (bits + 0.3 * i), device_class="cpu",
                compute_dtype="float32", data_digest="abc",
            )  # fmt: skip
            acc = 0.4 + 0.01 * i + 0.02 * m
            rows = [
                Record(**base, task=MEAN_ZEROSHOT_TASK, metric="acc", value=acc),
                Record(**base, task="wikitext2", metric="ppl", value=30.0 / acc),
            ]
            write_cell(rows, cell_path(root, "mixed", f"m{m}c{i}"))
    return root


def test_kbit_plot_draws_a_store_mixing_int_and_nvfp4_and_every_method(tmp_path):
    store = _mixed_store(tmp_path / "store")
    out = tmp_path / "fig"
    assert plot_main([str(store), "--out", str(out), "--jobs", "1", "--report"]) == 0
    for name in ("scaling_acc", "block_size_k4", "dtype_k4", "proxy_centering_k4", "method_k4"):
        assert (out / f"{name}.png").is_file(), name
    assert (out / "bit_optimal_k_gptq.md").is_file() and (out / "findings.md").is_file()


def test_the_block_size_figure_draws_a_data_type_and_scale_that_exist_together(tmp_path):
    from analysis.figures import block_size_figure
    from analysis.load import load_results

    cells = load_results(_mixed_store(tmp_path)).cells
    # by its own count e2m1 is the commonest data type (nvfp4 + mx cells) and fp16 the
    # commonest scale format: a pair no cell has
    fig = block_size_figure(cells, 4)
    assert fig is not None
    title = fig.texts[0].get_text()  # "Block size at k=4 (<dtype>, <scale> scales)"
    dtype, scale = title.split("(")[1].rstrip(")").replace(" scales", "").split(", ")
    have = cells[(cells["dtype"] == dtype) & (cells["scale_format"] == scale)
                 & (cells["method"] == "blockwise")]  # fmt: skip
    drawn = sum(len(line.get_xdata()) for ax in fig.axes for line in ax.get_lines())
    assert dtype == "e2m1" and drawn == len(have) > 0


@pytest.mark.parametrize("drop", [3])
def test_every_figure_and_table_skips_cleanly_on_partial_stores(drop, tmp_path):
    """Stores holding only some of the configurations (one left out, or one alone)."""
    alone = [_CONFIGS[drop]]
    rest = [c for i, c in enumerate(_CONFIGS) if i != drop]
    for name, configs in (("alone", alone), ("rest", rest)):
        store = _mixed_store(tmp_path / name, configs)
        assert plot_main([str(store), "--out", str(tmp_path / f"o{name}"), "--jobs", "1"]) == 0


# ------------------------------------------------------------------ full disk on write
def _records(cid: str = "c1") -> list[Record]:
    return [empty_record(sweep="s", cell_id=cid, task="t", metric="acc", value=0.5)]


def test_a_failing_parquet_write_leaves_neither_file(tmp_path, monkeypatch):
    import harness.records

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(harness.records.pq, "write_table", full)
    path = cell_path(tmp_path, "s", "c1")
    with pytest.raises(OSError, match="No space left") as info:
        write_cell(_records(), path, "cell: 1\n")
    assert info.value.errno == errno.ENOSPC and str(path) in str(info.value)
    assert sorted(os.listdir(tmp_path / "s")) == []  # no sidecar, no temporary file


def test_a_failing_sidecar_write_leaves_the_old_pair(tmp_path, monkeypatch):
    import harness.records

    path = write_cell(_records(), cell_path(tmp_path, "s", "c1"), "old: 1\n")
    before = path.read_bytes()

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(harness.records, "atomic_write", full)
    with pytest.raises(OSError, match="No space left"):
        write_cell(_records(), path, "new: 1\n")
    assert path.read_bytes() == before and path.with_suffix(".yaml").read_text() == "old: 1\n"
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if not p.name.startswith(".c")) == [
        "c1.parquet", "c1.yaml"]  # fmt: skip


def test_a_parquet_that_fails_to_land_takes_its_new_sidecar_with_it(tmp_path, monkeypatch):
    real = os.replace

    def failing(src, dst, *a, **k):
        if str(dst).endswith(".parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", failing)
    path = cell_path(tmp_path, "s", "c1")
    with pytest.raises(OSError, match=r"c1\.parquet"):
        write_cell(_records(), path, "cell: 1\n")
    monkeypatch.setattr(os, "replace", real)
    left = [p.name for p in (tmp_path / "s").iterdir() if p.name != store_index.INDEX_NAME]
    assert left == []  # no orphan sidecar, no temporary file


# ------------------------------------------------------------------ kbit-status's index
def _truth(root: Path) -> dict[str, tuple[int, int, int]]:
    """(done, failed, problem files) per sweep, by reading every file with pyarrow directly."""
    tally: dict[str, list[int]] = {}
    for path in sorted(root.glob("*/*.parquet")):
        row = tally.setdefault(path.parent.name, [0, 0, 0])
        try:
            statuses = pq.read_table(path, columns=["status"])["status"].to_pylist()
        except Exception:
            row[2] += 1
            continue
        if STATUS_FAILED in statuses or not statuses:
            row[1] += 1
        elif all(s == STATUS_OK for s in statuses):
            row[0] += 1
    return {k: tuple(v) for k, v in tally.items()}


def _counts(root: Path) -> dict[str, tuple[int, int, int]]:
    return {r.sweep: (r.done, r.failed - len(r.problems), len(r.problems))
            for r in store_status(root)}  # fmt: skip


def test_status_trusts_matching_entries_and_opens_no_file(tmp_path, monkeypatch):
    for i in range(6):
        (_failed if i % 3 == 0 else _ok)(tmp_path, "demo", f"c{i}")
    import harness.sweep.status

    def no_open(*_a, **_k):
        raise AssertionError("a cell file was opened")

    monkeypatch.setattr(harness.sweep.status.pq, "ParquetFile", no_open)
    [row] = store_status(tmp_path)
    assert (row.done, row.failed) == (4, 2)
    assert row.errors == {"c0": "ValueError: boom", "c3": "ValueError: boom"}


def test_status_reads_files_the_index_does_not_match(tmp_path):
    for i in range(4):
        _ok(tmp_path, "demo", f"c{i}")
    # c1 replaced behind the index's back by a failed cell's bytes (an older kbit, a copy)
    other = _failed(tmp_path, "other", "x", "RuntimeError: changed")
    target = tmp_path / "demo" / "c1.parquet"
    target.write_bytes(other.read_bytes())
    [demo, _other] = store_status(tmp_path)
    assert (demo.done, demo.failed, demo.errors) == (3, 1, {"c1": "RuntimeError: changed"})
    assert _counts(tmp_path) == _truth(tmp_path)
    # the read healed the index: the next status trusts a matching entry for c1
    entry = store_index.read(tmp_path / "demo")["c1"]
    assert entry.state == STATUS_FAILED and entry.matches(target.stat())


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "bad_crc", "fifo"])
def test_a_lost_or_corrupt_index_is_never_trusted(damage, tmp_path):
    for i in range(5):
        (_failed if i == 2 else _ok)(tmp_path, "demo", f"c{i}")
    index = store_index.index_path(tmp_path / "demo")
    lines = index.read_text().splitlines(keepends=True)
    if damage == "missing":
        index.unlink()
    elif damage == "garbage":
        index.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        index.write_text("".join(lines)[:-7])
    elif damage == "bad_crc":  # every entry claims ok, checksums left as they were
        index.write_text("".join(line.replace("\tfailed\t", "\tok\t") for line in lines))
    else:
        index.unlink()
        os.mkfifo(index)
    [row] = _in_thread(lambda: store_status(tmp_path))
    assert (row.done, row.failed, row.errors) == (4, 1, {"c2": "ValueError: boom"})


def test_status_output_is_the_same_with_and_without_the_index(tmp_path, capsys):
    import random

    rng = random.Random(3)
    for sweep in ("a", "b"):
        for i in range(rng.randint(5, 15)):
            (_failed if rng.random() < 0.3 else _ok)(tmp_path, sweep, f"{sweep}{i}")
    (tmp_path / "b" / "bad.parquet").write_bytes(b"PAR1 not really")
    status_main([str(tmp_path), "--errors"])
    with_index = capsys.readouterr().out
    for sweep in ("a", "b"):
        store_index.index_path(tmp_path / sweep).unlink()
    status_main([str(tmp_path), "--errors"])
    assert capsys.readouterr().out == with_index
    assert _counts(tmp_path) == _truth(tmp_path)


def test_index_lines_round_trip_and_reject_damage():
    entry = store_index.Entry("c1", "failed", 'KeyError: "x"\ttab', 123, 456)
    line = store_index.format_line(entry)
    assert line.endswith("\n") and line.count("\n") == 1
    assert store_index.parse_line(line) == entry
    assert store_index.parse_line(line.replace("123", "124")) is None  # checksum
    assert store_index.parse_line(line[:-5]) is None
    with pytest.raises(ValueError):
        store_index.format_line(store_index.Entry("a\tb", "ok", "", 1, 1))


def test_the_manifest_is_read_as_the_sweep_planner_writes_it(tmp_path):
    """kbit-status reads the manifest with the planner's own reader (one definition), and
    reads what the planner writes; anything unreadable is no manifest, never a crash."""
    from harness import store_cli
    from harness.sweep import plan as sweep

    assert sweep.read_manifest is store_cli.read_manifest
    assert sweep.MANIFEST == store_cli.MANIFEST_NAME
    cells = [sweep.Cell(overrides=["bits=3"], results_dir=str(tmp_path), sweep="s", cell_id="a",
                        status=None)]  # fmt: skip
    sweep.write_manifest(sweep.SweepPlan(cells=cells, problems=[]))
    assert store_cli.read_manifest(tmp_path / "s" / store_cli.MANIFEST_NAME) == {"a": "bits=3"}
    path = tmp_path / "m.json"
    for text in ("{}", "not json", '{"cells": 3}', '{"cells": [1]}'):
        path.write_text(text)
        assert store_cli.read_manifest(path) == {}, text
    assert store_cli.read_manifest(tmp_path / "missing.json") == {}
