"""One line for an error Hydra or OmegaConf raise about a user's input.

Why a module at the bottom: ``kbit-run`` (harness.config.refusals), ``kbit-zoo`` and the zoo's
family files (harness.zoo.config) report these errors the same way, and the zoo's family files
are read by harness.models (``model=zoo:...``), below the cell's configuration stage; so the
rule depends only on Hydra, OmegaConf and :mod:`harness.names`.
"""

from __future__ import annotations

import dataclasses
import re

from harness.names import did_you_mean, short_allowed, unknown_name

# OmegaConf's type errors, and what a user may write instead
_TYPE_WORDS = {"valid bool": "true or false", "to Integer": "an integer",
               "to Float": "a number", "not a valid int": "an integer"}  # fmt: skip


def composition_error_line(exc: BaseException) -> str | None:
    """One line for Hydra's or OmegaConf's error about an input, or None for anything else.

    Hydra reports a composition error as the override, then OmegaConf's message, key and
    object type on further lines; a user needs the field, the value and what is allowed.
    """
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import OmegaConfBaseException

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
