"""A per-sweep index of cell outcomes, so ``kbit-status`` need not open every cell file.

Why: a paper-scale sweep holds ~20,000 cell files; opening each one to read its status took
~30 s on a local disk, more on a shared file system. The index is an append-only text file,
``RESULTS_DIR/<sweep>/.cells.index`` (a dot-file: never taken for a cell or a sweep), with one
line per cell write::

    k1 <TAB> cell_id <TAB> state <TAB> size <TAB> mtime_ns <TAB> error (JSON) <TAB> crc32

``state`` is ``ok`` / ``failed`` / ``other`` (:func:`harness.records.summarize_cell`) and
``error`` the first line of the cell's first error. ``size`` and ``mtime_ns`` describe the
exact bytes the line was derived from (``fstat`` of the written or read file).

**The cell files stay the truth.** A reader trusts a line only when the cell file's current
``(size, mtime_ns)`` (one ``stat`` from the directory listing) equals the line's; any file
without such a line (written by an older kbit, edited, replaced, copied) is opened and read,
and a reader may append a line for it (best effort), which heals an old store on its first
``kbit-status``. A line whose checksum or fields do not parse (two writers interleaving on a
file system without atomic appends, a truncated write) is ignored; a lost or corrupt index
only costs time. Each line is written by a single ``write`` on an ``O_APPEND`` descriptor, so
concurrent writers on a local file system never interleave within a line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

INDEX_NAME = ".cells.index"
_MAGIC = "k1"
_FIELDS = 7


@dataclass(frozen=True)
class Entry:
    """What the index says about one cell file of the given size and mtime."""

    cell_id: str
    state: str  # ok | failed | other
    error: str  # first line of the first error; "" when none
    size: int
    mtime_ns: int

    def matches(self, st: os.stat_result) -> bool:
        """Whether this entry describes the file whose ``stat`` is ``st``."""
        return self.size == st.st_size and self.mtime_ns == st.st_mtime_ns


def index_path(folder: str | os.PathLike) -> Path:
    """The index file of one sweep folder."""
    return Path(folder) / INDEX_NAME


def format_line(entry: Entry) -> str:
    """One index line (with its trailing newline) for ``entry``."""
    if (
        "\t" in entry.cell_id
        or "\n" in entry.cell_id
        or entry.state not in {"ok", "failed", "other"}
    ):
        raise ValueError(f"index entry cannot hold cell_id={entry.cell_id!r} state={entry.state!r}")
    body = "\t".join(
        [_MAGIC, entry.cell_id, entry.state, str(entry.size), str(entry.mtime_ns),
         json.dumps(entry.error, ensure_ascii=True)]
    )  # fmt: skip
    return f"{body}\t{zlib.crc32(body.encode()):08x}\n"


def parse_line(line: str) -> Entry | None:
    """The entry of one line, or None when the line is damaged in any way."""
    parts = line.rstrip("\n").split("\t")
    if len(parts) != _FIELDS or parts[0] != _MAGIC:
        return None
    body = "\t".join(parts[:-1])
    try:
        if int(parts[-1], 16) != zlib.crc32(body.encode()):
            return None
        error = "" if parts[5] == '""' else json.loads(parts[5])
        entry = Entry(parts[1], parts[2], error, int(parts[3]), int(parts[4]))
    except ValueError:
        return None
    return entry if isinstance(error, str) else None


def append(
    folder: str | os.PathLike, cell_id: str, state: str, error: str, size: int, mtime_ns: int
) -> bool:
    """Append one entry to the sweep's index; False (logged) when it could not be written.

    Never raises: the index only saves time, and a cell whose entry is missing is read from
    its file.
    """
    try:
        data = format_line(Entry(cell_id, state, error, size, mtime_ns)).encode()
        # O_NONBLOCK: a FIFO under the index's name must not block the open (it fails with
        # ENXIO instead, or is refused below); on a regular file it changes nothing.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
        fd = os.open(index_path(folder), flags, 0o666)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "the index is not a regular file")
            written = os.write(fd, data)
        finally:
            os.close(fd)
    except (OSError, ValueError) as err:
        log.debug("index of %s not updated for %s: %s", folder, cell_id, err)
        return False
    return written == len(data)


def read(folder: str | os.PathLike) -> dict[str, Entry]:
    """cell id -> its latest intact entry ({} when there is no readable index).

    Damaged lines are skipped; an index that cannot be read at all counts as empty.
    """
    path = index_path(folder)
    try:  # O_NONBLOCK: a FIFO under the index's name must not block the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read()
    except OSError:
        return {}
    finally:
        os.close(fd)
    entries: dict[str, Entry] = {}
    for line in raw.decode("utf-8", errors="replace").splitlines():
        entry = parse_line(line)
        if entry is not None:
            entries[entry.cell_id] = entry
    return entries
