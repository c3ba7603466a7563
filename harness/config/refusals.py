"""How ``kbit-run`` reports input it refuses: one line, exit status 2, nothing written.

Why a module of its own: Hydra reports a composition error over several lines (the override,
OmegaConf's message, the key, the object type) and an exception from a task as a traceback,
and it turns an exception raised by a callback into a warning and runs the job anyway. A
refused input must instead stop before anything is created and say, on one line, the field,
the value and what is allowed. ``HYDRA_FULL_ERROR=1`` still shows the full traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from harness.config.schema import ConfigError
from harness.error_lines import composition_error_line

EXIT_FAILED, EXIT_REFUSED = 1, 2


class CellRefused(BaseException):
    """Carries a :class:`ConfigError` out of a Hydra callback.

    Hydra turns an ``Exception`` raised by a callback into a warning and runs the job anyway;
    a refused cell must stop before Hydra creates its output folder, so the callback raises
    this (like ``SystemExit``, not an ``Exception``) and :func:`main` reports it.
    """

    def __init__(self, error: ConfigError) -> None:
        super().__init__(str(error))
        self.error = error


def target_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides that set a ``_target_`` (an import path Hydra would call),
    in the key (``hydra.callbacks.x._target_=...``) or anywhere in the value
    (``+hydra.callbacks.x={_target_:logging.FileHandler,filename:x.log}``)."""
    return [a for a in argv if "_target_" in a]


def target_refusal_line(override: str) -> str:
    """The one line that refuses ``override`` (a :func:`target_overrides` hit): ``kbit-run``
    prints it after its prefix and :func:`harness.api.run` raises it, word for word."""
    return (f"{override!r}: a _target_ (an import path Hydra would call) in an override's key "
            "or value is not allowed; allowed: the config fields of conf/config.yaml and the "
            "launcher settings")  # fmt: skip


def input_error_line(exc: BaseException) -> str | None:
    """One line for an input error (a refused config), or None for anything else.

    A :class:`ConfigError` (or a refused sweep plan) is already one line; Hydra's and
    OmegaConf's errors are cut to one by :func:`harness.error_lines.composition_error_line`.
    """
    if isinstance(exc, ConfigError) or getattr(exc, "refused", False):  # a refused sweep plan
        return str(exc)
    return composition_error_line(exc)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Report refused input as one line and exit 2 (``HYDRA_FULL_ERROR=1``: the traceback).

    Hydra's reporter prints composition errors over several lines and task errors as a
    traceback. Its reporting function is wrapped for the duration of ``kbit-run``; anything
    that is not an input error still goes through Hydra's own reporting unchanged.
    """
    try:
        import hydra._internal.utils as hydra_utils

        original = hydra_utils.run_and_report
    except (ImportError, AttributeError):  # a Hydra without it: its own reporting applies
        yield
        return

    def report(func: Any) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except Exception as exc:
                line = input_error_line(exc)
                if line is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                sys.stderr.write(f"kbit-run: {line}\n")
                sys.exit(EXIT_REFUSED)

        return original(guarded)

    hydra_utils.run_and_report = report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original
