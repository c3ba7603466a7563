"""Result store -> tidy pandas frames.

Two views of the same records:

* the *long* frame: one row per (cell, task, metric), exactly the store's columns (minus the
  heavy provenance ones), ``status == "ok"`` only;
* the *cell* frame: one row per cell, the configuration columns plus one column per measured
  ``task:metric`` (and ``task:metric:stderr``). Figures and tables work on this one.

Failed cells are reported (logged with their error) and dropped: a cell with any failed row
contributes nothing, so a half-measured cell can never sit on a curve as if it were complete.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from harness.records import MEAN_ZEROSHOT_TASK, SCHEMA, STATUS_OK, cell_files

log = logging.getLogger(__name__)

# Columns that describe a cell (identical on all of its rows).
CONFIG_COLUMNS = [
    "key",  # "<sweep>/<cell_id>": unique across sweeps even if a cell id repeats
    "sweep",
    "cell_id",
    "model",
    "model_family",
    "n_params",
    "n_nonembedding_params",
    "method",
    "dtype",
    "dtype_family",
    "bits",
    "block_size",
    "scale_format",
    "centering",
    "outlier_fraction",
    "total_model_bits",
    "bits_per_param",
]
MEASURE_COLUMNS = ["task", "metric", "value", "stderr", "n_samples"]
# Only what analysis needs is read: column projection keeps a 1000-file store fast.
LONG_COLUMNS = [*CONFIG_COLUMNS[1:], *MEASURE_COLUMNS, "status", "error"]

ACC_COLUMN = f"{MEAN_ZEROSHOT_TASK}:acc"  # the paper's y axis, in the cell frame


def measure_column(task: str, metric: str) -> str:
    """Name of the cell-frame column holding ``metric`` of ``task`` (e.g. ``wikitext2:ppl``)."""
    return f"{task}:{metric}"


@dataclass
class Results:
    """Everything analysis reads from a store, already split into usable and failed cells."""

    long: pd.DataFrame  # ok rows, one per (cell, task, metric)
    cells: pd.DataFrame  # one row per ok cell; config columns + task:metric columns
    failed: pd.DataFrame  # one row per failed cell: sweep, cell_id, model, bits, dtype, error
    results_dir: str = ""

    def per_sample(self) -> pd.DataFrame:
        """Per-example 0/1 rows (key, task, metric, per_sample), read on demand.

        Kept out of :attr:`long` because the lists are the bulk of a store and most
        analyses (figures, tables) never touch them.
        """
        return read_per_sample(self.results_dir, self.cells["key"].tolist())


def _dataset(results_dir: str | os.PathLike, sweeps: Sequence[str] | None) -> ds.Dataset | None:
    """A pyarrow dataset over the cell files of the chosen sweeps (None if there are none)."""
    if sweeps:
        files = [str(p) for s in sweeps for p in cell_files(results_dir, s)]
    else:
        files = [str(p) for p in cell_files(results_dir)]
    if not files:
        return None
    return ds.dataset(files, schema=SCHEMA, format="parquet")


def read_long_table(
    results_dir: str | os.PathLike,
    sweeps: Sequence[str] | None = None,
    columns: Iterable[str] = LONG_COLUMNS,
) -> pa.Table:
    """The store's rows (all statuses) with only ``columns``, as one Arrow table."""
    dataset = _dataset(results_dir, sweeps)
    columns = list(columns)
    if dataset is None:
        return SCHEMA.empty_table().select(columns)
    return dataset.to_table(columns=columns, use_threads=True)


def read_per_sample(results_dir: str | os.PathLike, keys: Sequence[str]) -> pd.DataFrame:
    """Per-example rows of the cells named by ``keys`` (filter pushed into the scan)."""
    cols = ["sweep", "cell_id", "task", "metric", "per_sample"]
    sweeps = sorted({k.split("/", 1)[0] for k in keys})
    dataset = _dataset(results_dir, sweeps) if keys else None
    if dataset is None:
        frame = SCHEMA.empty_table().select(cols).to_pandas()
    else:
        ids = [k.split("/", 1)[1] for k in keys]
        flt = pc.field("cell_id").isin(ids) & pc.field("per_sample").is_valid()
        frame = dataset.to_table(columns=cols, filter=flt).to_pandas()
    frame.insert(0, "key", frame["sweep"].astype(str) + "/" + frame["cell_id"].astype(str))
    return frame[frame["key"].isin(set(keys))].drop(columns=["sweep", "cell_id"])


def split_failed(long: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ok rows, one row per failed cell). A cell with any non-ok row counts as failed."""
    bad = long["status"] != STATUS_OK
    failed_keys = set(long.loc[bad, "key"])
    is_failed_cell = long["key"].isin(failed_keys)
    failed = (
        long[is_failed_cell & bad]
        .drop_duplicates("key")[["sweep", "cell_id", "model", "bits", "dtype", "error"]]
        .reset_index(drop=True)
    )
    return long[~is_failed_cell].reset_index(drop=True), failed


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
    cells = pd.concat(parts, axis=1).reset_index(drop=True)
    cells.columns.name = None
    return cells.sort_values(["model_family", "bits", "total_model_bits"], ignore_index=True)


def load_results(results_dir: str | os.PathLike, sweeps: Sequence[str] | None = None) -> Results:
    """Read a store (or some of its sweeps), report failed cells, return the tidy frames."""
    long_all = read_long_table(results_dir, sweeps).to_pandas()
    long_all.insert(0, "key", long_all["sweep"].astype(str) + "/" + long_all["cell_id"].astype(str))
    long, failed = split_failed(long_all)
    if not failed.empty:
        log.warning(
            "dropping %d failed cell(s) of %d:\n%s",
            len(failed),
            long_all["key"].nunique(),
            "\n".join(
                f"  {r.sweep}/{r.cell_id} {r.model} k={r.bits} {r.dtype}: {r.error}"
                for r in failed.itertuples()
            ),
        )
    cells = to_cells(long)
    log.info("loaded %d ok cell(s), %d row(s) from %s", len(cells), len(long), results_dir)
    return Results(long=long, cells=cells, failed=failed, results_dir=str(results_dir))
