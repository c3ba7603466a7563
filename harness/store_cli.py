"""The refusals every tool reading a result store shares: kbit-status, kbit-plot, kbit-advise,
kbit-fit.

Why one place: a user who points two of these tools at the same wrong folder must get the
same answer from both. Each refusal is ONE line on stderr, ``<prog>: <field>=<value>: <why>;
allowed: ...``, with exit status 2, and it comes before any cell file is read:

* ``RESULTS_DIR`` that is not a folder (``~`` and ``$VAR`` expanded by
  :func:`harness.files.user_path`, like every user path of kbit);
* ``--sweep`` that is not a plain name (the rule of the cell config's ``sweep``: never a path,
  so ``--sweep ../..`` cannot read outside the store) or names no sweep folder of the store;
* an *empty store*: no cell file under the chosen sweeps (``kbit-status`` alone also reports
  sweeps that were planned, ``sweep_manifest.json``, and have no cell file yet: their pending
  cells are what it exists to show);
* a bad option value (argparse's own errors too: :class:`OneLineParser`).

This module lives in ``harness`` because ``harness.sweep.status`` uses it and layers run one way
(``analysis`` imports ``harness``, never the reverse).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NoReturn

from harness.files import PathError, user_path
from harness.names import did_you_mean, plain_name_problem
from harness.records import cell_entries

EXIT_REFUSED = 2  # bad input: nothing read, nothing written
MANIFEST_NAME = (
    "sweep_manifest.json"  # the one name; harness.sweep.plan imports it (and read_manifest)
)
CELL_SUFFIX = ".parquet"


class StoreRefusal(ValueError):
    """Input a store tool refuses; the message is one line without the tool's prefix."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, ``<prog>: <message>``, exit 2.

    argparse's default prints the usage block first (two or more lines); kbit's contract
    for refused input is one line naming the option, the value and what is allowed.
    """

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {_one_line(message)}; see {self.prog} --help\n")
        raise SystemExit(EXIT_REFUSED)


def refuse(prog: str, problem: str | BaseException) -> int:
    """Print ``<prog>: <problem>`` as one line on stderr; returns the exit status 2."""
    sys.stderr.write(f"{prog}: {_one_line(str(problem))}\n")
    return EXIT_REFUSED


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def plain_sweep_problem(name: str, field: str = "--sweep") -> str | None:
    """Why ``name`` is not a plain sweep name (None when it is): the cell config's rule for
    ``sweep`` (:func:`harness.names.plain_name_problem`), so no ``--sweep`` reads outside the store."""
    return plain_name_problem(field, name)


def read_manifest(path: str | os.PathLike) -> dict[str, str]:
    """cell_id -> overrides of every cell ever planned for a sweep ({} if none or unreadable).

    The one reader (the planner imports it), here so that ``kbit-status`` need not import the
    sweep planner (Hydra: half a second of a ~1 s run).
    """
    try:
        return dict(json.loads(Path(path).read_text())["cells"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def sweep_names(root: Path) -> list[str]:
    """The sweep folders of a store (folders starting with '.' hold logs, not sweeps)."""
    try:
        with os.scandir(root) as entries:
            names = [e.name for e in entries if not e.name.startswith(".") and _is_dir(e)]
    except OSError:
        return []
    return sorted(names)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def has_cell_file(folder: Path) -> bool:
    """Whether ``folder`` holds a regular ``*.parquet`` file (not a temporary '.' file).

    Only names and file types are looked at (``d_type``, or one ``stat`` that follows a
    symlink): a FIFO is never opened.
    """
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.endswith(CELL_SUFFIX) and not e.name.startswith("."):
                    try:
                        if e.is_file():
                            return True
                    except OSError:
                        continue
    except OSError:
        return False
    return False


def check_store(
    results_dir: str | os.PathLike,
    sweeps: Sequence[str] | None = None,
    *,
    planned_counts: bool = False,
) -> Path:
    """The store folder a tool may read (``user_path`` of ``results_dir``), or
    :class:`StoreRefusal` naming the first problem.

    ``planned_counts``: a sweep with a manifest but no cell file is not empty
    (``kbit-status``: its cells are pending).
    """
    try:
        root = user_path(results_dir, "RESULTS_DIR")
    except PathError as err:
        raise StoreRefusal(str(err)) from None
    if not root.is_dir():
        raise StoreRefusal(
            f"RESULTS_DIR={str(results_dir)!r} is not a folder; allowed: an existing result "
            "store (kbit-run's results_dir)"
        )
    known = sweep_names(root)
    for name in sweeps or []:
        problem = plain_sweep_problem(name)
        if problem:
            raise StoreRefusal(problem)
        if name not in known:
            shown = known if len(known) <= 20 else [*known[:20], f"... {len(known) - 20} more"]
            raise StoreRefusal(
                f"--sweep={name!r}: no such sweep in {str(root)!r}; sweeps there: {shown}"
                f"{did_you_mean(name, known)}"
            )
    chosen = list(dict.fromkeys(sweeps)) if sweeps else known
    folders = [root / name for name in chosen]
    if not any(
        has_cell_file(f) or (planned_counts and (f / MANIFEST_NAME).is_file()) for f in folders
    ):
        where = f"sweep(s) {list(chosen)} of " if sweeps else ""
        planned = " and no planned sweep (sweep_manifest.json)" if planned_counts else ""
        odd = [(p, why) for f in folders for p, why in cell_entries(root, f.name)[1]]
        skipped = (
            f" (skipped {len(odd)} non-regular entr{'y' if len(odd) == 1 else 'ies'}: "
            + ", ".join(f"{p.parent.name}/{p.name} ({why.split(',')[0]})" for p, why in odd[:3])
            + (", ..." if len(odd) > 3 else "") + ")"
            if odd else ""
        )  # fmt: skip
        raise StoreRefusal(
            f"RESULTS_DIR={str(results_dir)!r}: no cell files under {where}{str(root)!r}"
            f"{planned}{skipped}; allowed: a store that kbit-run has written cells to"
        )
    return root


# --------------------------------------------------------------------------- option values
def int_at_least(option: str, minimum: int) -> Callable[[str], int]:
    """An argparse ``type=`` for an integer >= ``minimum`` (one-line error naming the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{option}={text!r}: not an integer; allowed: an integer >= {minimum}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{option}={text!r}; allowed: an integer >= {minimum}")
        return value

    return parse


def int_between(option: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type=`` for an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        value = int_at_least(option, low)(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"{option}={text!r}; allowed: {low}..{high}")
        return value

    return parse


def open_unit_float(option: str) -> Callable[[str], float]:
    """An argparse ``type=`` for a float strictly between 0 and 1 (a confidence level)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0.0 < value < 1.0:
            raise argparse.ArgumentTypeError(
                f"{option}={text!r}; allowed: a number strictly between 0 and 1, e.g. 0.95"
            )
        return value

    return parse


def positive_float(option: str) -> Callable[[str], float]:
    """An argparse ``type=`` for a finite float > 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{option}={text!r}; allowed: a finite number > 0")
        return value

    return parse


def output_dir(option: str, value: str) -> Path:
    """The output folder a tool will write (``user_path``), or :class:`StoreRefusal` when it
    cannot be one: an existing non-folder, or an ancestor that is a file or not writable.
    Nothing is created here.
    """
    try:
        path = user_path(value, option)
    except PathError as err:
        raise StoreRefusal(str(err)) from None
    if path.exists() and not path.is_dir():
        raise StoreRefusal(
            f"{option}={value!r} exists and is not a folder; allowed: a folder (created if missing)"
        )
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise StoreRefusal(f"{option}={value!r}: {str(probe)!r} is not a folder; allowed: a "
                           "folder path whose existing part is a folder")  # fmt: skip
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StoreRefusal(f"{option}={value!r}: {str(probe)!r} is not writable")
    return path


def parse_or_exit(
    parser: argparse.ArgumentParser, argv: Iterable[str] | None
) -> argparse.Namespace | int:
    """``parser.parse_args(argv)``, or the exit status argparse chose (2 after its one-line
    error, 0 after ``--help``) instead of raising SystemExit."""
    try:
        return parser.parse_args(None if argv is None else list(argv))
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else EXIT_REFUSED
