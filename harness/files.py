"""Atomic file writes: the one helper every writer of kbit uses.

Why one place: a crash (OOM kill, Slurm timeout, SIGKILL) in the middle of a write must never
leave a partial file under its final name, and files in a shared store must be readable by
the group the user's umask allows. The pattern is a temporary file in the destination folder
(same file system), flushed and fsynced, given the umask's permissions, then renamed over the
target with ``os.replace`` (atomic on POSIX). Readers see the old complete file, the new
complete file, or none.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_DEFAULT_MODE = 0o666  # what open() would create, before the umask
_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


class PathError(ValueError):
    """A user path that cannot mean anything (an unset environment variable, an empty value)."""


def user_path(value: str | os.PathLike, field: str = "path") -> Path:
    """The path a user meant: ``$VAR`` / ``${VAR}`` and a leading ``~`` expanded, in that order.

    Why one rule: a path is checked in one place and written in another; if the two read it
    differently (``results_dir="~/x"`` checked as ``$HOME/x`` but written to a literal ``./~``
    folder) files land where nobody asked. Every user path of kbit (results, data, zoo, data
    type folder, model folder, perplexity file) goes through this function, and the *returned*
    path is the one that is both checked and written. An unset variable is refused (raising
    :class:`PathError`, one line naming ``field``) instead of staying a literal ``$VAR`` folder.
    """
    text = os.fspath(value)
    if not str(text).strip():
        raise PathError(f"{field}={text!r}: an empty path; allowed: a folder or file path")
    for match in _VARIABLE.finditer(str(text)):
        name = match.group(1).strip("{}")
        if not name or name not in os.environ:
            raise PathError(f"{field}={text!r}: environment variable {name or match.group(0)!r} "
                            "is not set; allowed: a path whose variables are all set")  # fmt: skip
    return Path(os.path.expanduser(os.path.expandvars(str(text))))


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: int = _DEFAULT_MODE) -> Iterator[IO[bytes]]:
    """Open a binary temporary file that replaces ``path`` atomically when the block ends.

    The file gets ``mode & ~umask`` (``mkstemp`` alone would create it 0600 whatever the
    umask). On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(
    path: str | os.PathLike,
    data: bytes | str,
    *,
    mode: int = _DEFAULT_MODE,
    skip_same: bool = False,
) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; see :func:`atomic_output`.

    ``skip_same``: leave the file alone when it already holds exactly ``data`` (keeps its
    mtime, so caches keyed on it stay valid, and concurrent writers of one value never race).
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if skip_same and path.is_file():
        with contextlib.suppress(OSError):
            if path.read_bytes() == raw:
                return path
    with atomic_output(path, mode) as fh:
        fh.write(raw)
    return path


def writable_dir_problem(folder: str | os.PathLike, field: str = "results_dir") -> str | None:
    """Why files cannot be written under ``folder`` (None when they can), creating nothing.

    The nearest existing ancestor must be a writable directory, probed with a temporary file
    that is removed at once. Checked before any work, so an unusable results folder is
    refused before a model loads, not after its evaluation.
    """
    try:
        path = user_path(folder, field).absolute()
    except PathError as err:
        return str(err)
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # exists() follows links: a dangling one cannot be created
            return (f"{field}={str(folder)!r}: {str(probe)!r} is a dangling symbolic link "
                    f"(to {os.readlink(probe)!r}); allowed: a folder, or a path that can be created")  # fmt: skip
        if probe == probe.parent:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{field}={str(folder)!r}: cannot be created, {str(probe)!r} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        return f"{field}={str(folder)!r}: {str(probe)!r} is not writable ({err.strerror})"
    return None
