"""A sweep you can watch (harness/progress.py): the one progress line, each cell's output in its
log file, the store watcher, and an in-process multirun that keeps the terminal quiet."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import progress
from harness.progress import SweepProgress, cell_output, format_eta


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


# ----------------------------------------------------------------------------- the line
def test_format_eta():
    assert format_eta(0) == "0:00:00"
    assert format_eta(59.6) == "0:01:00"
    assert format_eta(3725) == "1:02:05"
    assert format_eta(90061) == "25:01:01"
    assert format_eta(None) == "-:--:--"


def test_non_tty_line_counts_eta_and_rate_limit(clock):
    out = io.StringIO()
    p = SweepProgress(total=10, already_done=2, name="demo", stream=out)
    assert out.getvalue() == ""  # nothing before the first interval: the plan summary says it
    clock.now += 10
    p.cell_finished("ok")
    assert out.getvalue() == ""  # rate-limited
    clock.now += 30
    p.cell_finished("failed")  # 2 cells in 40 s: 20 s each, 6 left
    assert out.getvalue() == "sweep demo: 4/10 cells, 1 failed, ETA 0:02:00\n"
    clock.now += 5
    p.cell_finished("skipped")  # counted done, not in the mean
    p.cell_finished("ok")
    assert out.getvalue().count("\n") == 1  # 5 s since the last line
    clock.now += 1
    p.close()
    p.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert lines[-1] == "sweep demo: 6/10 cells, 1 failed, ETA 0:01:01"  # 46 s / 3 ran x 4 left
    assert len(lines) == 2
    p.cell_finished("ok")  # after close: ignored
    assert len(out.getvalue().splitlines()) == 2


def test_unknown_status_counts_as_failed_and_no_name(clock):
    out = io.StringIO()
    p = SweepProgress(total=2, stream=out)
    p.cell_finished("weird")
    p.cell_finished("ok")
    p.close()
    assert out.getvalue() == "sweep: 2/2 cells, 1 failed, ETA 0:00:00\n"


def test_tty_line_is_redrawn_in_place(clock):
    out = TTY()
    p = SweepProgress(total=2, name="s", stream=out)
    clock.now += 4
    p.cell_finished("ok")
    p.clear_line()
    p.cell_finished("ok")
    p.close()
    text = out.getvalue()
    assert text.startswith("\r\x1b[Ksweep s: 0/2 cells, 0 failed, ETA -:--:--")
    assert "\r\x1b[Ksweep s: 1/2 cells, 0 failed, ETA 0:00:04" in text
    assert text.endswith("sweep s: 2/2 cells, 0 failed, ETA 0:00:00\n")
    assert text.count("\n") == 1


def test_start_current_finish():
    out = io.StringIO()
    assert progress.current() is None
    p = progress.start(3, already_done=1, name="x", stream=out)
    assert progress.current() is p
    p.cell_finished("ok")
    assert progress.finish() is p
    assert progress.current() is None and progress.finish() is None
    assert out.getvalue() == "sweep x: 2/3 cells, 0 failed, ETA " + format_eta(p.eta_s()) + "\n"


def test_progress_stream_is_the_terminal_even_inside_a_cell(tmp_path, monkeypatch):
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    with cell_output(tmp_path / "cell.log", verbose=False):
        p = SweepProgress(total=1, stream=None)
        p.close()
    assert "sweep: 1/1 cells" not in (tmp_path / "cell.log").read_text()
    assert terminal.getvalue().startswith("sweep: 0/1 cells")


# ----------------------------------------------------------------------------- cell output
@pytest.fixture
def hydra_like_logging(tmp_path, monkeypatch):
    """Root logger as Hydra's job logging leaves it: a console handler and the job's file.
    (Each test points sys.stdout/stderr at ``terminal`` itself: pytest's capture resets them
    between setup and call.)"""
    terminal = io.StringIO()
    log_file = tmp_path / "job" / "run.log"
    log_file.parent.mkdir()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    console = logging.StreamHandler(terminal)
    console.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    file = logging.FileHandler(log_file)
    file.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    root.handlers[:] = [console, file]
    root.setLevel(logging.INFO)
    yield terminal, log_file, console
    file.close()
    root.handlers[:], root.level = saved[0], saved[1]


def _on_terminal(monkeypatch, terminal: io.StringIO) -> None:
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(sys, "stdout", terminal)


def _cell_work() -> None:
    from tqdm import tqdm

    for _ in tqdm(range(3), desc="Running loglikelihood requests"):
        pass
    print("bootstrapping for stddev: perplexity")
    logging.getLogger("lm_eval.evaluator").info("Running loglikelihood requests")
    logging.getLogger("lm_eval.models").warning("Combined length of context exceeds")
    logging.getLogger("harness.run.execute").info("cell abc: ok -> /x.parquet")
    logging.getLogger("harness.models.loading").warning("kbit warning %s", 1)
    logging.getLogger("harness.models.loading").warning("kbit warning %s", 2)  # same template: once


def test_cell_output_sends_bars_and_info_to_the_file(hydra_like_logging, monkeypatch):
    terminal, log_file, console = hydra_like_logging
    _on_terminal(monkeypatch, terminal)
    with cell_output(log_file, verbose=False):
        _cell_work()
        try:
            raise RuntimeError("simulated OOM")
        except RuntimeError as exc:
            logging.getLogger("harness.run.execute").error(
                "cell %s failed: %s", "abc", exc, exc_info=True
            )
            logging.getLogger("harness.run.execute").error("cell %s failed: %s", "abc", "again")
    shown = terminal.getvalue().splitlines()
    assert shown == [
        "[harness.models.loading][WARNING] - kbit warning 1",
        "[harness.run.execute][ERROR] - cell abc failed: simulated OOM",
    ]
    text = log_file.read_text()
    for expected in ("Running loglikelihood requests: 100%", "3/3", "bootstrapping for stddev",
                     "[lm_eval.evaluator][INFO] - Running loglikelihood requests",
                     "Combined length", "cell abc: ok", "kbit warning 2", "Traceback",
                     "cell abc failed: again"):  # fmt: skip
        assert expected in text, expected
    # restored
    assert sys.stderr is terminal and sys.stdout is terminal
    assert console.level == logging.NOTSET and not console.filters
    assert type(console.formatter) is logging.Formatter
    logging.getLogger("harness.run.execute").info("after the cell")
    assert terminal.getvalue().splitlines()[-1] == "[harness.run.execute][INFO] - after the cell"


def test_cell_output_restores_after_an_exception(hydra_like_logging, monkeypatch):
    terminal, log_file, console = hydra_like_logging
    _on_terminal(monkeypatch, terminal)
    lib = logging.getLogger("kbit_test_library")  # a library that prints on its own
    own = logging.StreamHandler(terminal)
    lib.addHandler(own)
    lib.propagate = False
    try:
        with pytest.raises(ValueError, match="boom"), cell_output(log_file, verbose=False):
            lib.warning("library chatter")
            sys.stderr.write("raw stderr write\n")
            raise ValueError("boom")
        assert own.stream is terminal
        assert sys.stderr is terminal and sys.stdout is terminal
        assert console.level == logging.NOTSET and not console.filters
        assert terminal.getvalue() == ""
        assert "library chatter" in log_file.read_text()
        assert "raw stderr write" in log_file.read_text()
        lib.warning("after")
        assert terminal.getvalue() == "after\n"
    finally:
        lib.removeHandler(own)
        lib.propagate = True


def test_a_bar_created_in_one_cell_follows_the_running_cell(
    tmp_path, hydra_like_logging, monkeypatch
):
    terminal, _, _ = hydra_like_logging
    _on_terminal(monkeypatch, terminal)
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    with cell_output(first, verbose=False):
        handler = logging.StreamHandler()  # binds sys.stderr now (torch does this at import)
    lib = logging.getLogger("kbit_test_binds_late")
    lib.addHandler(handler)
    lib.propagate = False
    try:
        with cell_output(second, verbose=False):
            lib.warning("in the second cell")
        lib.warning("between cells")
    finally:
        lib.removeHandler(handler)
        lib.propagate = True
    assert "in the second cell" in second.read_text()
    assert "between cells" in terminal.getvalue()
    assert "between cells" not in first.read_text() + second.read_text()


def test_verbose_changes_nothing(hydra_like_logging, monkeypatch):
    terminal, log_file, _ = hydra_like_logging
    _on_terminal(monkeypatch, terminal)
    with cell_output(log_file, verbose=True):
        _cell_work()
    assert "Running loglikelihood requests: 100%" in terminal.getvalue()
    assert "[harness.run.execute][INFO] - cell abc: ok" in terminal.getvalue()


def test_no_log_file_discards_the_bars(hydra_like_logging, monkeypatch):
    terminal, _, _ = hydra_like_logging
    _on_terminal(monkeypatch, terminal)
    with cell_output(None, verbose=False):
        _cell_work()
    assert terminal.getvalue().splitlines() == [
        "[harness.models.loading][WARNING] - kbit warning 1"
    ]


def test_verbose_requested(monkeypatch):
    monkeypatch.delenv("KBIT_VERBOSE", raising=False)
    assert progress.verbose_requested() is False
    monkeypatch.setenv("KBIT_VERBOSE", "0")
    assert progress.verbose_requested() is False
    monkeypatch.setenv("KBIT_VERBOSE", "1")
    assert progress.verbose_requested() is True


# ----------------------------------------------------------------------------- watching the store
def _write(path: Path, status: str) -> None:
    tmp = path.with_name("." + path.name)
    tmp.write_text(status)
    os.replace(tmp, path)  # as harness.records.write_cell: atomic, a new inode


def test_watch_store_counts_new_records_once_with_one_listing_per_poll(tmp_path, monkeypatch):
    import harness.records

    reads: list[Path] = []

    def fake_status(path):
        reads.append(Path(path))
        return Path(path).read_text() or None

    monkeypatch.setattr(harness.records, "cell_status", fake_status)
    listings: list[str] = []
    real_scandir = os.scandir
    monkeypatch.setattr(
        progress.os, "scandir", lambda p: listings.append(str(p)) or real_scandir(p)
    )
    cells = [(tmp_path, sweep, f"c{i}") for sweep in ("a", "b") for i in range(50)]
    for sweep in ("a", "b"):
        (tmp_path / sweep).mkdir()
    _write(tmp_path / "a" / "c0.parquet", "failed")  # an old record of a retried cell
    out = io.StringIO()
    p = SweepProgress(total=100, stream=out)
    stop = threading.Event()
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(progress.watch_store(cells, p, poll_s=0.05, until=stop))
    )
    thread.start()
    time.sleep(0.2)
    assert p.done == 0 and reads == []  # the old failed file is not this run's result
    _write(tmp_path / "a" / "c0.parquet", "ok")
    _write(tmp_path / "a" / "c1.parquet", "failed")
    _write(tmp_path / "b" / "c7.parquet", "ok")
    (tmp_path / "b" / "c7.yaml").write_text("config")  # not a cell file
    time.sleep(0.3)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert result == {"ok": 2, "failed": 1}
    assert (p.done, p.failed) == (3, 1)
    assert len(reads) == 3  # each changed file read once
    polls = len(listings) // 2
    assert polls >= 3 and sorted(set(listings)) == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_watch_store_returns_when_every_cell_has_a_record(tmp_path):
    from harness.records import Record, write_cell

    (tmp_path / "s").mkdir()
    p = SweepProgress(total=1, stream=io.StringIO())
    fields = dict(sweep="s", cell_id="c", model="m", task="t", metric="ppl", value=1.0)
    with progress.watching([(tmp_path, "s", "c")], p, poll_s=0.05) as thread:
        time.sleep(0.1)  # a file there before the watch began is an old record, not a result
        write_cell([Record(**fields)], tmp_path / "s" / "c.parquet")
        thread.join(5)
        assert not thread.is_alive()
    assert (p.done, p.failed) == (1, 0)


def test_watch_store_until_callable_stops(tmp_path):
    p = SweepProgress(total=1, stream=io.StringIO())
    calls = []
    tic = time.monotonic()
    got = progress.watch_store([(tmp_path, "none", "c")], p, poll_s=0.05,
                               until=lambda: calls.append(1) or len(calls) > 2)  # fmt: skip
    assert got == {} and time.monotonic() - tic < 5


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from test_models_tiny import save_tiny

    return save_tiny("gpt2", tmp_path_factory.mktemp("progress") / "tiny")


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    import random

    from test_sweep_e2e import WORDS

    rng = random.Random(1)
    path = tmp_path_factory.mktemp("progress_eval") / "text.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(400)))
    return path


def _multirun(model: Path, text: Path, results: Path, data_root: Path, **env: str):
    """4 cells (int, float x 3, 4 bits) with perplexity and a zero-shot task (lm-eval's bars)."""
    exe = shutil.which("kbit-run") or str(Path(sys.executable).parent / "kbit-run")
    args = [exe, "--multirun", f"model={model}", "dtype=int,float", "bits=3,4", "block_size=16",
            "sweep=watch", f"results_dir={results}", "eval=smoke",
            f"eval.perplexity=[{{name:tiny,path:'{text}',seqlen:32,max_tokens:256}}]",
            "eval.tasks=[piqa]", "eval.mean_of=[piqa]", "eval.limit=4", "eval.batch_size=4",
            "device=cpu"]  # fmt: skip
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", "KBIT_DATA_ROOT": str(data_root), **env}  # fmt: skip
    if "KBIT_VERBOSE" not in env:
        full_env.pop("KBIT_VERBOSE", None)
    proc = subprocess.run(args, env=full_env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_in_process_multirun_keeps_the_terminal_quiet(tiny_model, eval_text, data_root, tmp_path):
    from harness.run.report import read_cells_frame, results_table

    rc, out = _multirun(tiny_model, eval_text, tmp_path / "quiet", data_root)
    assert rc == 0, out[-3000:]
    lines = [line for line in out.replace("\r", "\n").splitlines() if line.strip()]
    cells = sorted((tmp_path / "quiet" / "watch").glob("*.parquet"))
    table = set(results_table(read_cells_frame(cells)).splitlines())  # the results, on stdout
    assert len(cells) == 4 and table and table <= set(lines), out  # the sweep ends with them
    lines = [line for line in lines if line not in table]
    assert len(lines) <= 6, out
    assert "it/s]" not in out and "%|" not in out, out  # no progress bar
    assert "[INFO]" not in out and "#0 :" not in out, out  # no per-cell or per-job lines
    assert "4 cells in total" in out
    logs = sorted((tmp_path / "quiet" / ".hydra" / "watch").rglob("*.log"))
    assert len(logs) == 4, logs
    for log in logs:
        text = log.read_text()
        assert "Running loglikelihood requests" in text and "it/s]" in text, text[-2000:]
        assert "[harness.run.execute][INFO] - cell " in text

    rc, out = _multirun(tiny_model, eval_text, tmp_path / "loud", data_root, KBIT_VERBOSE="1")
    assert rc == 0, out[-3000:]
    assert "Running loglikelihood requests" in out and "it/s]" in out
    assert "[harness.run.execute][INFO] - cell " in out
