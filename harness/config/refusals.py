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
import re
import sys
from collections.abc import Iterator
from typing import Any

from harness.config.schema import ConfigError

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


# OmegaConf's type errors, and what a user may write instead
_TYPE_WORDS = {"valid bool": "true or false", "to Integer": "an integer",
               "to Float": "a number", "not a valid int": "an integer"}  # fmt: skip


def input_error_line(exc: BaseException) -> str | None:
    """One line for an input error (a refused config), or None for anything else.

    Hydra reports a composition error as the override, then OmegaConf's message, key and
    object type on further lines; a user needs the field, the value and what is allowed.
    """
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import OmegaConfBaseException

    from harness.names import unknown_name

    if isinstance(exc, ConfigError) or getattr(exc, "refused", False):  # a refused sweep plan
        return str(exc)
    if isinstance(exc, OverrideParseException):  # Hydra's grammar: a caret line, a URL
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (f"not a valid override ({first}); allowed: key=value, a value with special "
                "characters quoted, e.g. results_dir='~/x'")  # fmt: skip
    if isinstance(exc, MissingConfigException) and getattr(exc, "options", None):
        group, _, name = str(exc.missing_cfg_file or "").rpartition("/")
        options = [o for o in exc.options if not o.endswith("_schema")]
        return str(unknown_name(group or "config", name, options))
    if isinstance(exc, ConfigCompositionException | OmegaConfBaseException):
        # Hydra keeps a sweep file's composition error in __context__, not __cause__
        inner = exc.__cause__ or exc.__context__
        cause = inner if isinstance(inner, OmegaConfBaseException) else exc
        msg = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
        key = getattr(cause, "full_key", None)
        head = str(exc).splitlines()[0].rstrip(".") if cause is not exc else ""
        parts = [p for p in (head, f"{key}: {msg}" if key else msg) if p]
        allowed = next((a for word, a in _TYPE_WORDS.items() if word in msg), None)
        if allowed is None and key and (line := _unknown_key_line(str(key), msg, cause)):
            where = re.match(r"In '([^']+)'", head)  # the config file Hydra was composing
            return f"{where.group(1)}.yaml: {line}" if where else line
        return "; ".join(parts) + (f"; allowed: {allowed}" if allowed else "")
    return None


# Keys that moved into a config group: a hint instead of "not a setting"
MOVED_KEYS = {"outlier_fraction": "method.outlier_fraction (with method=proxy)"}


def _unknown_key_line(full_key: str, msg: str, cause: BaseException) -> str | None:
    """For "Key 'x' not in 'SomeSchema'": one short line, the key, a few of the schema's keys
    (the closest first, then a count and where the rest are listed) and "did you mean"."""
    import dataclasses
    import re

    from harness.names import did_you_mean, short_allowed

    match = re.search(r"Key '([^']+)' not in '([^']+)'", msg)
    schema = getattr(cause, "object_type", None)
    if not match or schema is None or not dataclasses.is_dataclass(schema):
        return None
    key = match.group(1)
    if key in MOVED_KEYS and schema.__name__ == "CellConfig":
        return f"{full_key} is not a setting of the cell; allowed instead: {MOVED_KEYS[key]}"
    keys = [f.name for f in dataclasses.fields(schema)]
    name = next((f.default for f in dataclasses.fields(schema) if f.name == "name"), None)
    method = bool(name) and "method" in schema.__module__
    of = f" of method={name}" if method else ""
    where = _SCHEMA_FILES.get(schema.__name__, f"conf/method/{name}.yaml" if method else "docs")
    allowed = short_allowed(key, keys, where)
    return f"{full_key} is not a setting{of}; allowed: {allowed}{did_you_mean(key, keys)}"


# where the full list of a schema's keys is written down (refusal lines list only a few)
_SCHEMA_FILES = {"CellConfig": "conf/config.yaml", "EvalConfig": "conf/eval/<name>.yaml",
                 "DtypeSpec": "docs/dtypes.md", "PerplexitySpec": "conf/eval/<name>.yaml"}  # fmt: skip


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
