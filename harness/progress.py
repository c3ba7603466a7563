"""A sweep you can watch: one progress line on the terminal, each cell's chatter in its log file.

Two halves:

``SweepProgress``
    One line on the real terminal (stderr): ``sweep NAME: DONE/TOTAL cells, F failed, ETA
    h:mm:ss``. On a TTY it is redrawn in place after every finished cell; otherwise (a log
    file, CI) it is printed as a plain line at most every :data:`LOG_INTERVAL_S` seconds and
    once at the end. DONE counts every finished cell (ok, failed, or skipped because it was
    already done); FAILED is the failed part of it. The ETA is the mean wall time of the cells
    finished in this run (for a parallel launcher: the time between completions) times the
    cells left. The sweeper owns the object: :func:`start` before launching, :func:`finish`
    after; an in-process cell reports through :func:`current`; a launcher that waits on
    external jobs (Slurm, local processes) runs :func:`watch_store` / :func:`watching`, which
    read the store.

``StepProgress``
    One quiet line for a long step inside a cell (perplexity windows): ``perplexity
    wikitext2: 120/330 windows, ETA 0:01:05``, redrawn in place on a TTY (at most every
    :data:`REDRAW_S`) and erased when the step ends; elsewhere (a job log, a pipe) a plain
    line at most every :data:`LOG_INTERVAL_S`, so a short step writes nothing and a log file
    never gets carriage-return bars.

``cell_output``
    While a cell of a multirun runs: library progress bars (lm-eval's request bars, tokenizing,
    ``datasets``' split generation, transformers' weight loading), prints, Python warnings and
    every INFO log line go to the cell's log file (Hydra's ``<job dir>/<job name>.log``) instead
    of the terminal. The terminal still gets kbit's own warnings and anyone's errors, one line
    each (a failed cell is visible; its traceback is in the log file). Opt out with
    ``KBIT_VERBOSE=1`` or ``hydra.verbose=true`` (:func:`verbose_requested`).

Why one module: the halves share the process's terminal. The progress lines write to the real
terminal through the redirection ``cell_output`` installs (``_terminal`` sees through it), and
a line ``cell_output`` lets through first clears the sweep's progress line (:func:`current`);
apart, each half would import the other's private state, in both directions.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "LOG_INTERVAL_S",
    "StepProgress",
    "SweepProgress",
    "cell_output",
    "current",
    "finish",
    "format_eta",
    "job_log_file",
    "new_records",
    "start",
    "store_snapshot",
    "verbose_requested",
    "watch_store",
    "watching",
]

LOG_INTERVAL_S = 30.0  # a non-TTY progress line at most this often (and once at the end)
REDRAW_S = 0.2  # a TTY step line is redrawn at most this often
VERBOSE_ENV = "KBIT_VERBOSE"
KBIT_LOGGERS = ("harness", "hydra_plugins.kbit_sweeper", "__main__")  # warnings reach the terminal
STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = "ok", "failed", "skipped"


# ----------------------------------------------------------------------------- the line
def format_eta(seconds: float | None) -> str:
    """``h:mm:ss`` (hours unbounded); ``-:--:--`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-:--:--"
    total = round(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class SweepProgress:
    """The one terminal line of a sweep (thread-safe: a store watcher may report from a thread).

    ``total`` cells in the sweep, ``already_done`` of them finished before this run (resumed
    ok cells: counted as done, excluded from the ETA). ``stream`` defaults to the real stderr
    at construction (never a cell's log file, even when built inside :func:`cell_output`).
    """

    def __init__(
        self, total: int, already_done: int = 0, name: str = "", stream: TextIO | None = None
    ) -> None:
        self.total = int(total)
        self.already_done = int(already_done)
        self.name = str(name)
        self.stream: Any = _terminal(stream if stream is not None else sys.stderr)
        self.counts: Counter[str] = Counter()
        self.started = time.monotonic()
        self.last_emit = self.started
        self.closed = False
        self._drawn = False  # a TTY line is on screen (needs clearing before other output)
        self._lock = threading.RLock()
        self.tty = _isatty(self.stream)
        if self.tty:
            self._draw()

    # -- counts
    @property
    def done(self) -> int:
        """Finished cells: resumed ones plus every cell finished in this run."""
        return self.already_done + sum(self.counts.values())

    @property
    def failed(self) -> int:
        return self.counts[STATUS_FAILED]

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left: mean wall time of the cells run (not skipped) here x cells left."""
        ran = self.counts[STATUS_OK] + self.counts[STATUS_FAILED]
        left = max(self.total - self.done, 0)
        if left == 0:
            return 0.0
        if ran == 0:
            return None
        elapsed = (time.monotonic() if now is None else now) - self.started
        return elapsed / ran * left

    def line(self, now: float | None = None) -> str:
        label = f"sweep {self.name}" if self.name else "sweep"
        return (f"{label}: {self.done}/{self.total} cells, {self.failed} failed, "
                f"ETA {format_eta(self.eta_s(now))}")  # fmt: skip

    # -- events
    def cell_finished(self, status: str) -> None:
        """One cell ended: ``ok``, ``failed`` or ``skipped`` (anything else counts as failed)."""
        status = status if status in (STATUS_OK, STATUS_SKIPPED) else STATUS_FAILED
        with self._lock:
            if self.closed:
                return
            self.counts[status] += 1
            now = time.monotonic()
            if self.tty:
                self._draw(now)
            elif now - self.last_emit >= LOG_INTERVAL_S:
                self._emit(now)

    def clear_line(self) -> None:
        """Erase the in-place line (TTY) so another line can be printed; redrawn on the next
        event. No-op on a non-TTY stream."""
        with self._lock:
            if self.tty and self._drawn:
                self._write("\r\x1b[K")
                self._drawn = False

    def close(self) -> None:
        """Final state: the line ends with a newline (TTY) or is printed once more (non-TTY)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.tty:
                self._draw()
                self._write("\n")
                self._drawn = False
            else:
                self._emit(time.monotonic())

    # -- output
    def _draw(self, now: float | None = None) -> None:
        self._write("\r\x1b[K" + self.line(now))
        self._drawn = True

    def _emit(self, now: float) -> None:
        self._write(self.line(now) + "\n")
        self.last_emit = now

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed terminal must not fail the sweep
            pass


class StepProgress:
    """The quiet progress line of one long step of a cell (see the module docstring).

    ``label`` names the step (``perplexity wikitext2``), ``total`` its units (``unit``, e.g.
    windows). ``stream`` defaults to ``sys.stderr`` *as it is now*: inside a multirun cell
    (:func:`cell_output`) that is the cell's log file, which gets plain lines only. Use as a
    context manager, calling :meth:`advance` after each batch.
    """

    def __init__(self, label: str, total: int, unit: str = "steps",
                 stream: TextIO | None = None) -> None:  # fmt: skip
        self.label, self.total, self.unit = str(label), int(total), str(unit)
        self.stream: Any = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream)
        self.done = 0
        self.started = time.monotonic()
        self.last_emit = self.started
        self._drawn = False

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        return (f"{self.label}: {self.done}/{self.total} {self.unit}, "
                f"ETA {format_eta(eta)}")  # fmt: skip

    def advance(self, n: int = 1) -> None:
        """``n`` more units done; redraws (TTY) or prints (non-TTY) when it is time."""
        self.done += int(n)
        now = time.monotonic()
        if self.tty:
            if now - self.last_emit >= REDRAW_S or self.done >= self.total:
                self._write("\r\x1b[K" + self.line(now))
                self._drawn = True
                self.last_emit = now
        elif now - self.last_emit >= LOG_INTERVAL_S:
            self._write(self.line(now) + "\n")
            self.last_emit = now

    def close(self) -> None:
        """Erase the TTY line (the step's result is reported elsewhere)."""
        if self._drawn:
            self._write("\r\x1b[K")
            self._drawn = False

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed terminal must not fail the cell
            pass


_CURRENT: SweepProgress | None = None


def current() -> SweepProgress | None:
    """The running sweep's progress in this process (None outside a sweep, or in a job of an
    out-of-process launcher, where the sweeper watches the store instead)."""
    return _CURRENT


def start(
    total: int, already_done: int = 0, name: str = "", stream: TextIO | None = None
) -> SweepProgress:
    """Begin the sweep's line (the sweeper calls this before launching); replaces any other."""
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.close()
    _CURRENT = SweepProgress(total, already_done, name, stream)
    return _CURRENT


def finish() -> SweepProgress | None:
    """End the sweep's line (the sweeper calls this after launching, also on errors)."""
    global _CURRENT
    progress, _CURRENT = _CURRENT, None
    if progress is not None:
        progress.close()
    return progress


# ----------------------------------------------------------------------------- watching the store
CellKey = tuple[Any, str, str]  # (results_dir, sweep, cell_id)
Snapshot = dict[Path, dict[str, int]]  # sweep folder -> {cell file name: inode}


def _folders(cells: Sequence[CellKey]) -> dict[Path, set[str]]:
    folders: dict[Path, set[str]] = {}
    for results_dir, sweep, cell_id in cells:
        folders.setdefault(Path(results_dir) / str(sweep), set()).add(f"{cell_id}.parquet")
    return folders


def store_snapshot(cells: Sequence[CellKey]) -> Snapshot:
    """The cells' files as they are now (one listing per sweep folder): the baseline a watch
    compares against. Take it *before* submitting, so a cell that a fast job writes while
    the rest is still being submitted counts as new."""
    return {folder: _inodes(folder, names) for folder, names in _folders(cells).items()}


def new_records(cells: Sequence[CellKey], baseline: Snapshot) -> set[CellKey]:
    """The cells whose file is new or replaced since ``baseline`` (:func:`store_snapshot`)."""
    now = store_snapshot(cells)
    fresh = set()
    for key in cells:
        folder, name = Path(key[0]) / str(key[1]), f"{key[2]}.parquet"
        inode = now.get(folder, {}).get(name)
        if inode is not None and baseline.get(folder, {}).get(name) != inode:
            fresh.add(key)
    return fresh


def watch_store(
    cells: Sequence[CellKey],
    progress: SweepProgress,
    poll_s: float = 10.0,
    until: Callable[[], bool] | threading.Event | None = None,
    baseline: Snapshot | None = None,
) -> Counter[str]:
    """Report cells to ``progress`` as their files appear in the store; returns the statuses.

    For launchers whose jobs run elsewhere (``hydra/launcher=slurm|local``). Returns when every
    cell has a new record, or when ``until`` (a callable, or a ``threading.Event``) says stop,
    after one last look. A cell counts once, when its file is new or replaced since
    ``baseline`` (:func:`store_snapshot`, taken before the jobs were submitted; default: when
    the watch begins), so a retried cell's old ``failed`` file is not its result and a cell
    finished before the watch began is not lost. Cheap at 20,000 cells: each poll lists each
    sweep folder once and reads only files that changed (an atomic write replaces the file, so
    its inode from the listing is enough: no stat per cell).
    """
    from harness.records import cell_status

    folders = _folders(cells)
    if baseline is None:
        baseline = store_snapshot(cells)
    seen = {folder: dict(baseline.get(folder, {})) for folder in folders}
    statuses: Counter[str] = Counter()
    stop = _stopper(until)

    def poll() -> None:
        for folder, pending in folders.items():
            if not pending:
                continue
            for name, inode in _inodes(folder, pending).items():
                if seen[folder].get(name) == inode:
                    continue
                seen[folder][name] = inode
                status = cell_status(folder / name)
                if status is None:  # unreadable: logged by cell_status; wait for a rewrite
                    continue
                pending.discard(name)
                statuses[status] += 1
                progress.cell_finished(status)

    while True:
        poll()
        if not any(folders.values()):
            break
        if stop(poll_s):
            poll()
            break
    return statuses


def _inodes(folder: Path, names: set[str]) -> dict[str, int]:
    """Inode of each of ``names`` present in ``folder`` (one directory listing, no stat)."""
    try:
        with os.scandir(folder) as entries:
            return {e.name: e.inode() for e in entries if e.name in names}
    except OSError:
        return {}


def _stopper(until: Callable[[], bool] | threading.Event | None) -> Callable[[float], bool]:
    """wait(seconds) -> whether to stop: an Event is waited on (stops promptly)."""
    if isinstance(until, threading.Event):
        return until.wait
    if until is None:
        return lambda s: bool(time.sleep(s))

    def wait(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until():
                return True
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
        return bool(until())

    return wait


@contextmanager
def watching(
    cells: Sequence[CellKey], progress: SweepProgress | None = None, poll_s: float = 10.0
) -> Iterator[threading.Thread | None]:
    """Run :func:`watch_store` in a daemon thread for the duration (e.g. around a blocking
    ``launcher.launch``); on exit it takes one last look and stops. ``progress`` defaults to
    :func:`current`; without one this does nothing."""
    progress = progress or current()
    if progress is None or not cells:
        yield None
        return
    stop = threading.Event()
    thread = threading.Thread(target=watch_store, args=(list(cells), progress, poll_s, stop),
                              name="kbit-watch-store", daemon=True)  # fmt: skip
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=max(60.0, poll_s))


# ----------------------------------------------------------------------------- cell output
def verbose_requested() -> bool:
    """``KBIT_VERBOSE=1`` (any value but empty/0/false/no), or ``hydra.verbose`` set."""
    if os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    try:
        from hydra.core.hydra_config import HydraConfig

        return bool(HydraConfig.get().verbose)
    except (ImportError, ValueError):
        return False


def job_log_file() -> Path | None:
    """Hydra's log file of the running job (``<output dir>/<job name>.log``); None outside a
    Hydra job. Where Hydra's job logging writes it by default (``hydra/job_logging=default``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return Path(str(hc.runtime.output_dir)) / f"{hc.job.name}.log"
    except (ImportError, ValueError):
        return None


class _Redirect:
    """A stand-in for sys.stdout/sys.stderr: writes go to the active cell's log file, else to
    the stream it replaced. One per stream for the whole process, so a handler or bar that
    captured it in one cell follows the cell that is running now (and the terminal between)."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.target: Any = None

    @property
    def _out(self) -> Any:
        return self.target if self.target is not None else self.original

    def write(self, text: str) -> int:
        out = self._out
        n = out.write(text)
        if out is self.target:
            out.flush()  # keeps its order with the log handler's lines in the same file
        return n if n is not None else len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._out.flush()

    def isatty(self) -> bool:
        return self.target is None and _isatty(self.original)

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, buffer, ...
        return getattr(self._out, name)


_PROXIES: dict[str, _Redirect] = {}


def _terminal(stream: Any) -> Any:
    """The stream a redirect stands in for (the real terminal), else ``stream`` itself."""
    while isinstance(stream, _Redirect):
        stream = stream.original
    return stream


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def _own(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in KBIT_LOGGERS)


class _ConsoleFilter(logging.Filter):
    """While a cell runs, the terminal gets kbit's warnings and anyone's errors, each message
    template once per cell (a failed cell is one line; the file gets everything)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, Any]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and not (
            record.levelno >= logging.WARNING and _own(record.name)
        ):
            return False
        key = (record.name, record.msg if isinstance(record.msg, str) else id(record.msg))
        if key in self.seen:
            return False
        self.seen.add(key)
        progress = current()
        if progress is not None:
            progress.clear_line()
        return True


class _OneLine(logging.Formatter):
    """The wrapped formatter's first line, without traceback (that stays in the log file)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            text = self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        return text.splitlines()[0] if text else text


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


@contextmanager
def cell_output(log_file: Path | None, verbose: bool = False) -> Iterator[None]:
    """Send one cell's output to ``log_file`` instead of the terminal, for the duration.

    - ``sys.stdout``/``sys.stderr`` (tqdm bars of lm-eval, ``datasets``, transformers, prints,
      Python warnings) are appended to ``log_file`` (discarded when it is None);
    - library loggers with their own terminal handlers (transformers, torch) write there too;
    - the root logger's console handlers pass only kbit's warnings and anyone's errors, one
      line each; its file handler (Hydra's job log) keeps every line.

    Everything is restored on exit, also on an exception. ``verbose=True``: nothing changes.
    """
    if verbose:
        yield
        return
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        sink: Any = open(log_file, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
    else:
        sink = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    saved_streams = {"stdout": sys.stdout, "stderr": sys.stderr}
    terminal = {id(s) for s in (sys.__stdout__, sys.__stderr__, *saved_streams.values())}
    restore: list[Callable[[], None]] = []
    try:
        for name, stream in saved_streams.items():
            proxy = stream if isinstance(stream, _Redirect) else _PROXIES.get(name)
            if proxy is None or (proxy is not stream and proxy.original is not stream):
                proxy = _Redirect(stream)
                _PROXIES[name] = proxy
            previous = proxy.target
            proxy.target = sink
            restore.append(lambda p=proxy, t=previous: setattr(p, "target", t))
            setattr(sys, name, proxy)
        restore.append(lambda: (setattr(sys, "stdout", saved_streams["stdout"]),
                                setattr(sys, "stderr", saved_streams["stderr"])))  # fmt: skip

        # library loggers that print on their own (propagate=False): into the file
        for logger in list(logging.root.manager.loggerDict.values()):
            for handler in list(getattr(logger, "handlers", [])):
                stream = getattr(handler, "stream", None)
                if _is_console(handler) and id(stream) in terminal:
                    handler.setStream(sys.stderr)  # the proxy, now pointing at the file
                    restore.append(lambda h=handler, s=stream: h.setStream(s))

        # the root logger's console: kbit's warnings and errors, one line each
        console_filter = _ConsoleFilter()
        for handler in list(logging.root.handlers):
            if not _is_console(handler):
                continue
            level, formatter = handler.level, handler.formatter
            handler.setLevel(max(level, logging.WARNING))
            handler.addFilter(console_filter)
            handler.setFormatter(_OneLine(formatter))

            def undo(h: logging.Handler = handler, lv: int = level, f: Any = formatter) -> None:
                h.setLevel(lv)
                h.removeFilter(console_filter)
                h.setFormatter(f)

            restore.append(undo)
        yield
    finally:
        for step in reversed(restore):
            with suppress(Exception):  # restoring one thing must not keep the others from it
                step()
        with suppress(OSError):
            sink.close()
