"""One grid cell from Python (a notebook): ``kbit-run``'s path, its records as a DataFrame.

``run(model="zoo:nano/l2d64", dtype="quantile", bits=4, eval="zoo")`` is
``kbit-run model=zoo:nano/l2d64 dtype=quantile bits=4 eval=zoo``, step for step:

==============  ===============================================================================
overrides       each (key, value) becomes the override text the command line would hold
                (:func:`override_text`: ``True`` -> ``true``, ``None`` -> ``null``, a list ->
                ``[a,b]``, a string quoted where Hydra would read it otherwise); the same
                ``_target_`` refusal and :func:`harness.run.execute.prepare_command_line` (grammar,
                group options, booleans, format, ``~``/``$VAR`` in the user paths)
compose         ``conf/config.yaml`` through Hydra's compose API, after
                :func:`harness.config.schema.register_schema` (types and keys checked as the CLI)
validate        :class:`harness.run.execute.ValidateCell` (the callback ``kbit-run`` runs before its
                job): format, every value rule, :func:`harness.run.execute.validate_cell`
run, store      :func:`harness.run.execute.run_and_record`: a cell already ``ok`` in the store is not
                run again; else it runs and writes its cell file
                ``<results_dir>/<sweep>/<cell_id>.parquet``, as ``kbit-run`` writes it
result          the cell file, read back: the frame holds what the store holds
==============  ===============================================================================

What differs from ``kbit-run``, and why: Hydra's job folder (``<results_dir>/.hydra/...``:
its ``run.log`` and the composed config) is not written, since no Hydra job runs; Hydra does
not configure logging (a notebook keeps its own); and ``hydra.*`` overrides have no effect.
No multirun: a sweep stays a ``kbit-run --multirun`` thing (planned, resumable, launched on
a cluster); call :func:`run` in a loop for a few cells, each one resumed from the store.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, open_dict, read_write

from harness.config.overrides import PATH_ENV, conf_dir, parse
from harness.config.refusals import (
    CellRefused,
    input_error_line,
    target_overrides,
    target_refusal_line,
)
from harness.config.schema import ConfigError, register_schema
from harness.records import STATUS_OK, read_cell

CONFIG_NAME = "config"  # conf/config.yaml, what kbit-run composes
_KEY = re.compile(r"^(\+\+|\+|~)?[A-Za-z_][\w.@/-]*$")  # a config key as an override writes it
_WORDS = ("true", "false", "null", "inf", "-inf", "+inf", "nan")  # Hydra reads these, not strings


class CellFailedWarning(RuntimeWarning):
    """The cell ran (or was already stored) but failed: its records carry the error.

    A warning rather than an exception: the failed records are the result (``status``,
    ``error`` columns), as ``kbit-run`` writes them and exits 1. Turn it into an error with
    ``warnings.simplefilter("error", CellFailedWarning)``.
    """


def _scalar_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str):
        raise TypeError(
            f"{value!r} ({type(value).__name__}) cannot be an override value; allowed: str, "
            "int, float, bool, None, a path, or a list/tuple/dict of them"
        )
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    for candidate in (text, f"'{escaped}'"):
        if candidate and candidate.strip().lower() not in _WORDS and _reads_as(candidate, text):
            return candidate
    raise ConfigError(f"{text!r} cannot be passed as an override value; allowed: a simpler string")


def _reads_as(candidate: str, text: str) -> bool:
    """Whether Hydra's grammar reads the value ``candidate`` as the string ``text``."""
    try:
        parsed = parse([f"key={candidate}"])[0]
    except ConfigError:
        return False
    return not parsed.is_sweep_override() and parsed.value() == text


def override_text(key: str, value: Any) -> str:
    """``key=value`` as a command line writes it, for a Python value.

    ``True``/``False`` -> ``true``/``false``; ``None`` -> ``null``; numbers as Python writes
    them; a string or path plain when Hydra reads it back as that same string, else quoted
    (``'4'`` stays a string, ``'a,b'`` is never a sweep); a list or tuple -> ``[a,b]``; a dict
    -> ``{k:v}``. ``key`` is a config key (``eval.limit``, ``+name``, ``~name``); a ``~`` key
    with ``None`` deletes the key whatever its value.
    """
    if not isinstance(key, str) or not _KEY.match(key):
        raise ConfigError(
            f"{key!r} is not a config key; allowed: a setting or group of conf/config.yaml, "
            "dotted for a nested one (eval.limit), optionally prefixed by +, ++ or ~"
        )
    if key.startswith("~") and value is None:
        return key
    return f"{key}={_value_text(value)}"


def _value_text(value: Any) -> str:
    if isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_]\w*", k):
                raise ConfigError(f"{k!r} is not a key of a dict value; allowed: a plain name")
            items.append(f"{k}:{_value_text(v)}")
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_value_text(v) for v in value) + "]"
    return _scalar_text(value)


def command_line(overrides: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> list[str]:
    """The override arguments ``kbit-run`` would get: ``overrides`` first, then ``kwargs``."""
    given = dict(overrides or {})
    twice = sorted(set(given) & set(kwargs))
    if twice:
        raise TypeError(f"run() got {twice} both in the mapping and as keyword arguments")
    return [override_text(k, v) for k, v in {**given, **kwargs}.items()]


def compose_cell(argv: list[str]) -> DictConfig:
    """The cell ``kbit-run <argv>`` runs, composed and validated as ``kbit-run`` does; raises
    :class:`ConfigError` with the line ``kbit-run`` prints after ``kbit-run: `` for a refusal.

    Rewrites the ``KBIT_*`` path variables in ``os.environ`` as ``kbit-run`` does
    (:func:`harness.run.execute.prepare_command_line`); :func:`run` restores them. Hydra's global
    state (``GlobalHydra``) is as it was on return.
    """
    from harness.run.execute import load_command_line_plugins, prepare_command_line
    from harness.run.validate import ValidateCell

    bad = target_overrides(argv)
    if bad:  # the line kbit-run's main() prints
        raise ConfigError(target_refusal_line(bad[0]))
    try:
        argv = prepare_command_line(argv)
        load_command_line_plugins(argv)  # as kbit-run: before composing
        register_schema()  # reads $KBIT_DTYPE_DIR (expanded above)
    except ConfigError:
        raise
    except (ValueError, ImportError) as err:
        raise ConfigError((str(err).strip().splitlines() or [repr(err)])[0]) from err
    config = _compose(argv)
    try:
        ValidateCell().on_run_start(config)
    except CellRefused as refused:
        raise ConfigError(str(refused.error)) from refused.error
    task = copy.deepcopy(config)  # what Hydra hands the task: the config without its own node
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def _compose(argv: list[str]) -> DictConfig:
    """``conf/config.yaml`` with ``argv`` through Hydra's compose API (with the ``hydra``
    node, which the validation callback reads); a composition error is the CLI's line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    previous = GlobalHydra.instance().hydra  # a notebook's own Hydra session, kept
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            return compose(CONFIG_NAME, overrides=argv, return_hydra_config=True)
    except Exception as exc:
        line = input_error_line(exc)
        if line is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise ConfigError(line) from exc
    finally:
        GlobalHydra.instance().hydra = previous


def run(overrides: Mapping[str, Any] | None = None, /, **kwargs: Any) -> pd.DataFrame:
    """Run one cell as ``kbit-run`` would and return its records, one row per (task, metric).

    ``run(model="zoo:nano/l2d64", dtype="quantile", bits=4, eval="zoo")``; dotted keys go in
    the mapping: ``run({"eval.limit": 20, "method.damp": 0.01}, model=..., method="gptq")``.
    Values are Python values (:func:`override_text`). Same checks, same cell id, same store
    (``results_dir``/``sweep``, default ``$KBIT_RESULTS_DIR`` or ``./results``, ``adhoc``),
    same records as the command line; a cell already ``ok`` there is returned as stored,
    without running again (the ``status`` of the call: ``frame.attrs["outcome"]``,
    ``ok``/``failed``/``skipped``; the file: ``frame.attrs["cell_file"]``).

    Raises :class:`harness.config.schema.ConfigError` for refused input, with the one line
    ``kbit-run`` prints after ``kbit-run: `` (nothing is written, no model loads), and
    :class:`harness.run.execute.CellWriteError` when the cell file cannot be written. A cell that
    fails after validation returns its ``failed`` records (``status``, ``error``) and warns
    :class:`CellFailedWarning`, as ``kbit-run`` writes them and exits 1.

    Leaves no global state behind: Hydra's global state is restored, the ``KBIT_*`` path
    variables ``kbit-run`` rewrites are restored, no logging handler is added, the model is
    freed. The schemas stay registered in Hydra's ConfigStore (idempotent, as ``kbit-run``).
    No multirun: a sweep is ``kbit-run --multirun`` (module docstring).
    """
    from harness.run.execute import record_cell

    argv = command_line(overrides, kwargs)
    saved = {name: os.environ.get(name) for name in PATH_ENV}
    try:
        cfg = compose_cell(argv)
        outcome, path = record_cell(cfg)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return records_frame(path, outcome)


def records_frame(path: str | os.PathLike, outcome: str | None = None) -> pd.DataFrame:
    """The records of the cell file ``path`` (every column of the store), warning
    :class:`CellFailedWarning` when any row failed."""
    frame = read_cell(path).to_pandas()
    frame.attrs.update(cell_file=str(path), outcome=outcome)
    bad = frame[frame["status"] != STATUS_OK]
    if not bad.empty:
        errors = sorted({str(e).splitlines()[0] for e in bad["error"].fillna("")})
        warnings.warn(
            f"cell {Path(path).stem} failed ({len(bad)} of {len(frame)} records): "
            f"{'; '.join(errors)}",
            CellFailedWarning,
            stacklevel=3,
        )
    return frame
