"""Result store -> tidy pandas frames.

Two views of the same records:

* the *long* frame: one row per (cell, task, metric), exactly the store's columns (minus the
  heavy provenance ones), ``status == "ok"`` only;
* the *cell* frame: one row per cell, the configuration columns plus one column per measured
  ``task:metric`` (and ``task:metric:stderr``). Figures and tables work on this one.

What is left out, and why (each reported once, by logging a warning):

* *problem files* (truncated, corrupt, foreign schema; :func:`harness.records.scan_store`):
  named one per line and kept on :attr:`Results.problems`; one bad file never stops a plot;
* *legacy cells* (``schema_version`` < 2): their numerics (device, compute dtype) and data
  sources are unknown, so they could silently merge with cells that differ in both;
* *failed cells* (any failed row, including non-finite evaluations written as
  ``NonFiniteError`` rows): a half-measured or NaN cell can never sit on a curve.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from harness.records import (
    AXES_COLUMN,
    MEAN_ZEROSHOT_TASK,
    SCHEMA,
    SCHEMA_VERSION,
    STATUS_OK,
    axis_columns,
    method_setting_columns,
    scan_store,
)

log = logging.getLogger(__name__)

# Columns that describe a cell (identical on all of its rows). Every result-determining
# field is here, so that cells differing in any of them can be told apart downstream.
CONFIG_COLUMNS = [
    "key",  # "<sweep>/<cell_id>": unique across sweeps even if a cell id repeats
    "sweep",
    "cell_id",
    "schema_version",
    "model",
    "model_family",
    "n_params",
    "n_nonembedding_params",
    "train_tokens",
    "method",
    "dtype",
    "dtype_family",
    "dtype_overrides",
    "bits",
    "block_size",
    "scale_format",
    "centering",
    "outlier_fraction",
    "method_settings",
    "total_model_bits",
    "bits_per_param",
    "device_class",
    "compute_dtype",
    "data_digest",
    "trust_remote_code",
]
# Every configuration axis the record schema declares is a config column (harness.records:
# a column added to the record with an axis role is here without a second list)
CONFIG_COLUMNS += [c for c in axis_columns() if c not in CONFIG_COLUMNS]
# Filled where a store leaves them empty, so that grouping never drops a cell (pandas drops
# NaN group keys) and "no override" has one spelling.
CONFIG_DEFAULTS = {
    "dtype_overrides": "{}",
    "method_settings": "{}",
    "device_class": "",
    "compute_dtype": "",
    "data_digest": "",
    "trust_remote_code": False,
    AXES_COLUMN: "{}",  # stores from before the column: every such axis at its default
}
MEASURE_COLUMNS = ["task", "metric", "value", "stderr", "n_samples"]
# Only what analysis needs is read: column projection keeps a 1000-file store fast.
LONG_COLUMNS = [*CONFIG_COLUMNS[1:], *MEASURE_COLUMNS, "status", "error"]
FAILED_COLUMNS = ["sweep", "cell_id", "model", "bits", "dtype", "error"]
LEGACY_HINT = "re-run them; docs/records.md"

ACC_COLUMN = f"{MEAN_ZEROSHOT_TASK}:acc"  # the paper's y axis, in the cell frame


def measure_column(task: str, metric: str) -> str:
    """Name of the cell-frame column holding ``metric`` of ``task`` (e.g. ``wikitext2:ppl``)."""
    return f"{task}:{metric}"


@dataclass
class Results:
    """Everything analysis reads from a store, already split into usable and left-out cells."""

    long: pd.DataFrame  # ok rows, one per (cell, task, metric)
    cells: pd.DataFrame  # one row per ok cell; config columns + task:metric columns
    failed: pd.DataFrame  # one row per failed cell: sweep, cell_id, model, bits, dtype, error
    results_dir: str = ""
    problems: list[tuple[Path, str]] = field(default_factory=list)  # unreadable files, why
    n_legacy: int = 0  # cells left out for schema_version < 2
    files: list[Path] = field(default_factory=list)  # the readable cell files

    def per_sample(self, keys: Sequence[str] | None = None) -> pd.DataFrame:
        """Per-example 0/1 rows (key, task, metric, per_sample), read on demand.

        Kept out of :attr:`long` because the lists are the bulk of a store and most
        analyses (figures, tables) never touch them.
        """
        keys = self.cells["key"].tolist() if keys is None else list(keys)
        return read_per_sample(self.results_dir, keys, files=self.files)


def scan_files(
    results_dir: str | os.PathLike, sweeps: Sequence[str] | None = None
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(readable cell files, [(problem file, reason)]) of the chosen sweeps (all if None)."""
    scans = [scan_store(results_dir, s) for s in sweeps] if sweeps else [scan_store(results_dir)]
    files = sorted({p for s in scans for p in s.files})
    problems = sorted({(p, r) for s in scans for p, r in s.problems})
    return files, problems


def report_problems(problems: Iterable[tuple[Path, str]]) -> None:
    """One warning line per unreadable file: its name and why, so it can be fixed or removed."""
    for path, reason in problems:
        log.warning("skipping unreadable cell file %s: %s", path, reason)


def _dataset(files: Sequence[Path]) -> ds.Dataset | None:
    """A pyarrow dataset over ``files`` with the store schema (missing columns read as null)."""
    if not files:
        return None
    return ds.dataset([str(p) for p in files], schema=SCHEMA, format="parquet")


def _read_columns(
    files: Sequence[Path], columns: list[str], flt: pc.Expression | None = None
) -> tuple[pa.Table, list[tuple[Path, str]]]:
    """(rows of ``files`` with ``columns``, files whose data failed to read and why).

    One multi-threaded scan; only when some file's data pages are damaged (its footer read
    fine, so the scan kept it) is each file read on its own, so that one file cannot sink
    the rest.
    """
    dataset = _dataset(files)
    if dataset is None:
        return SCHEMA.empty_table().select(columns), []
    try:
        return dataset.to_table(columns=columns, filter=flt, use_threads=True), []
    except Exception:  # any read error: fall back to per-file reads below
        pass
    tables, problems = [], []
    for path in files:
        try:
            tables.append(_dataset([path]).to_table(columns=columns, filter=flt))
        except Exception as err:  # one damaged file: named, the rest kept
            problems.append((path, f"unreadable data: {type(err).__name__}: {err}"[:300]))
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table().select(columns)
    return table, problems


def read_long_table(
    results_dir: str | os.PathLike,
    sweeps: Sequence[str] | None = None,
    columns: Iterable[str] = LONG_COLUMNS,
    files: Sequence[Path] | None = None,
) -> pa.Table:
    """The rows (all statuses) of the readable cell files with only ``columns``."""
    files = scan_files(results_dir, sweeps)[0] if files is None else files
    table, problems = _read_columns(files, list(columns))
    report_problems(problems)
    return table


def read_per_sample(
    results_dir: str | os.PathLike, keys: Sequence[str], files: Sequence[Path] | None = None
) -> pd.DataFrame:
    """Per-example rows of the cells named by ``keys`` (filter pushed into the scan).

    ``files``: the readable cell files (default: scanned again), so that a corrupt file in
    the store cannot break the read.
    """
    cols = ["sweep", "cell_id", "task", "metric", "per_sample"]
    sweeps = sorted({k.split("/", 1)[0] for k in keys})
    if keys and files is None:
        files = scan_files(results_dir, sweeps)[0]
    files = [p for p in files or [] if p.parent.name in sweeps] if keys else []
    ids = sorted({k.split("/", 1)[1] for k in keys})
    flt = pc.field("cell_id").isin(ids) & pc.field("per_sample").is_valid()
    table, problems = _read_columns(files, cols, flt)
    report_problems(problems)
    frame = table.to_pandas()
    frame.insert(0, "key", frame["sweep"].astype(str) + "/" + frame["cell_id"].astype(str))
    return frame[frame["key"].isin(set(keys))].drop(columns=["sweep", "cell_id"])


def split_legacy(long: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(rows of current-schema cells, number of legacy cells left out)."""
    version = pd.to_numeric(long["schema_version"], errors="coerce").fillna(0)
    legacy_keys = set(long.loc[version < SCHEMA_VERSION, "key"])
    return long[~long["key"].isin(legacy_keys)].reset_index(drop=True), len(legacy_keys)


def split_failed(long: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ok rows, one row per failed cell). A cell with any non-ok row counts as failed."""
    bad = long["status"] != STATUS_OK
    failed_keys = set(long.loc[bad, "key"])
    is_failed_cell = long["key"].isin(failed_keys)
    failed = (
        long[is_failed_cell & bad].drop_duplicates("key")[FAILED_COLUMNS].reset_index(drop=True)
    )
    return long[~is_failed_cell].reset_index(drop=True), failed


def fill_config_defaults(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every :data:`CONFIG_DEFAULTS` column present and without nulls, and the
    columns that mirror a method setting (``outlier_fraction``) derived from
    ``method_settings`` where a store lacks them (:func:`mirrored_setting_values`)."""
    fills = {}
    for col, default in CONFIG_DEFAULTS.items():
        if col not in frame.columns:
            fills[col] = default
        elif frame[col].isna().any():
            fills[col] = frame[col].astype(object).where(frame[col].notna(), default)
    frame = frame.assign(**fills) if fills else frame
    return _fill_mirrored(frame)


def _settings(text: object) -> dict:
    """A cell's ``method_settings`` JSON as a dict ({} when empty or missing)."""
    if not isinstance(text, str) or not text:
        return {}
    parsed = json.loads(text)
    return parsed if isinstance(parsed, dict) else {}


def mirrored_setting_values(frame: pd.DataFrame, column: str) -> pd.Series:
    """Column ``column`` (one that mirrors the method setting of the same name,
    :func:`harness.records.method_setting_columns`) as recorded, else from ``method_settings``
    (the method's value, or the record's default when its settings have none): method-agnostic,
    so a store written without the column reads as one written with it."""
    default = method_setting_columns()[column]
    have = frame[column] if column in frame.columns else pd.Series(None, index=frame.index)
    if have.notna().all():
        return have
    settings = frame["method_settings"] if "method_settings" in frame.columns else None
    derived = pd.Series(default, index=frame.index, dtype=object)
    if settings is not None:
        derived = settings.map(lambda t: _settings(t).get(column, default))
    return have.astype(object).where(have.notna(), derived).astype(type(default))


def _fill_mirrored(frame: pd.DataFrame) -> pd.DataFrame:
    fills = {}
    for col in method_setting_columns():
        if col not in frame.columns and "method_settings" not in frame.columns:
            continue  # a frame of other columns (a test's, a selection's): nothing to derive
        if col not in frame.columns or frame[col].isna().any():
            fills[col] = mirrored_setting_values(frame, col)
    return frame.assign(**fills) if fills else frame


def axis_values(frame: pd.DataFrame) -> pd.DataFrame:
    """The cell schema's axes that have no record column of their own, one column per axis
    (from the record's ``axes`` JSON; empty where every cell is at the defaults, so an older
    store gets no column). A value absent from a cell's JSON is the axis' default: ""."""
    if AXES_COLUMN not in frame.columns:
        return pd.DataFrame(index=frame.index)
    parsed = frame[AXES_COLUMN].map(_settings)
    names = sorted({k for d in parsed for k in d})
    return pd.DataFrame(
        {n: parsed.map(lambda d, n=n: json.dumps(d[n]) if n in d else "") for n in names},
        index=frame.index,
    )


def to_cells(long: pd.DataFrame) -> pd.DataFrame:
    """Long ok rows -> one row per cell with a ``task:metric`` column per measurement."""
    if long.empty:
        return pd.DataFrame(columns=CONFIG_COLUMNS)
    config = long.drop_duplicates("key")[CONFIG_COLUMNS].set_index("key", drop=False)
    measures = long.dropna(subset=["task", "metric"])
    measures = measures.assign(
        _m=measures["task"].astype(str) + ":" + measures["metric"].astype(str)
    )
    values = measures.pivot_table(index="key", columns="_m", values="value", aggfunc="first")
    stderr = measures.dropna(subset=["stderr"])
    parts = [config, values]
    if not stderr.empty:
        se = stderr.pivot_table(index="key", columns="_m", values="stderr", aggfunc="first")
        parts.append(se.add_suffix(":stderr"))
    axes = axis_values(config)
    axes = axes[[c for c in axes.columns if c not in config.columns]]
    if not axes.empty and len(axes.columns):
        parts.insert(1, axes)
    cells = pd.concat(parts, axis=1).reset_index(drop=True)
    cells.columns.name = None
    return cells.sort_values(["model_family", "bits", "total_model_bits"], ignore_index=True)


def training_tokens(cells: pd.DataFrame) -> pd.Series:
    """Tokens each cell's model was trained on (NaN when unknown), one rule for all analyses.

    ``train_tokens`` where recorded. Cells written before the column existed have none; the
    same model name (a zoo checkpoint or a hub id: one set of weights) recorded it in newer
    cells, so they take that count instead of standing apart as "unknown".
    """
    if "train_tokens" not in cells.columns:
        return pd.Series(float("nan"), index=cells.index)
    tok = pd.to_numeric(cells["train_tokens"], errors="coerce")
    return tok.fillna(tok.groupby(cells["model"].astype(str)).transform("max"))


def tokens_text(tokens: float) -> str:
    """8000000 -> '8M', 501760 -> '502k' (as zoo checkpoint names write them); '' if NaN."""
    if pd.isna(tokens):
        return ""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if tokens >= div:
            return f"{tokens / div:.3g}{unit}"
    return f"{tokens:g}"


def _log_failed(failed: pd.DataFrame, n_cells: int) -> None:
    if failed.empty:
        return
    log.warning(
        "dropping %d failed cell(s) of %d:\n%s",
        len(failed),
        n_cells,
        "\n".join(
            f"  {r.sweep}/{r.cell_id} {r.model} k={r.bits} {r.dtype}: {r.error}"
            for r in failed.itertuples()
        ),
    )


def load_results(results_dir: str | os.PathLike, sweeps: Sequence[str] | None = None) -> Results:
    """Read a store (or some of its sweeps), report what is left out, return the tidy frames."""
    files, problems = scan_files(results_dir, sweeps)
    report_problems(problems)
    table, data_problems = _read_columns(files, LONG_COLUMNS)
    report_problems(data_problems)
    bad = {p for p, _ in data_problems}
    files, problems = [p for p in files if p not in bad], sorted([*problems, *data_problems])
    long_all = table.to_pandas()
    long_all.insert(0, "key", long_all["sweep"].astype(str) + "/" + long_all["cell_id"].astype(str))
    long_all, n_legacy = split_legacy(long_all)
    if n_legacy:
        log.warning(
            "excluding %d legacy cell(s) (schema_version < %d: numerics and data source "
            "unknown, so they cannot be told apart from current cells); %s",
            n_legacy,
            SCHEMA_VERSION,
            LEGACY_HINT,
        )
    long, failed = split_failed(fill_config_defaults(long_all))
    _log_failed(failed, long_all["key"].nunique())
    cells = to_cells(long)
    log.info("loaded %d ok cell(s), %d row(s) from %s", len(cells), len(long), results_dir)
    return Results(
        long=long,
        cells=cells,
        failed=failed,
        results_dir=str(results_dir),
        problems=problems,
        n_legacy=n_legacy,
        files=files,
    )
