"""The one result schema of kbit, and the parquet store that holds it.

Long format: one row per (cell, task, metric). A *cell* is one resolved configuration
(model x quantization config x evaluation). Every number the harness reports lands here
together with the configuration and versions that produced it, so a figure can always be
traced back to the exact run.

Store layout::

    RESULTS_DIR/<sweep>/<cell_id>.parquet   # all rows of one cell (ok rows, or one failed row)
    RESULTS_DIR/<sweep>/<cell_id>.yaml      # the resolved cell config, for humans

Each cell file is written atomically (temporary file in the same folder, fsync, rename), so a
crash or SIGKILL mid-write never leaves a partial file under a final name, and two jobs
writing the same cell cannot interleave bytes.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1

STATUS_OK = "ok"
STATUS_FAILED = "failed"

# The derived row that the paper plots: mean zero-shot accuracy over its four tasks
# (LAMBADA, WinoGrande, HellaSwag, PIQA), or over whichever tasks the eval config names.
MEAN_ZEROSHOT_TASK = "zeroshot_mean"


@dataclass
class Record:
    """One row of the store. Field comments are the schema's documentation."""

    # --- identity ---------------------------------------------------------------------
    schema_version: int = SCHEMA_VERSION  # bumped on any incompatible change of this schema
    sweep: str = "adhoc"  # sweep name; the store's subfolder
    cell_id: str = ""  # stable hash of the resolved cell config (see harness.run.cell_id)
    # --- model ------------------------------------------------------------------------
    model: str = ""  # what the user passed: local path, hub id or zoo:<family>/<size>
    model_family: str = ""  # family for plot panels (zoo family, or e.g. "opt", "pythia")
    architecture: str = ""  # HF config.model_type, e.g. gpt_neox, gpt2, opt, bloom, llama
    n_params: int = 0  # all parameters of the model
    n_nonembedding_params: int = 0  # parameters outside token/position embeddings and head
    n_quantized_params: int = 0  # parameters actually stored in k bits
    quantized_modules: list[str] = field(default_factory=list)  # module names quantized
    # --- quantization config -----------------------------------------------------------
    method: str = "blockwise"  # blockwise | proxy | none (16-bit baseline)
    dtype: str = ""  # data type entry name (conf/dtype/<name>.yaml), e.g. int, quantile, nf4
    dtype_family: str = ""  # int | float | dynamic | quantile | normal | none
    bits: int = 16  # k; 16 = unquantized baseline
    block_size: int | None = None  # elements per block; None = one scale per tensor
    scale_format: str = "fp16"  # fp16 | bf16 | fp32 | e8m0
    centering: bool = False  # block mean subtracted and stored
    outlier_fraction: float = 0.0  # proxy quantization: share of input dims kept in 16 bit
    total_model_bits: float = 0.0  # harness.bits.total_model_bits: every parameter counted
    bits_per_param: float = 16.0  # total_model_bits / n_params
    # --- the measurement ---------------------------------------------------------------
    task: str | None = None  # e.g. wikitext2, lambada_openai, zeroshot_mean; None on failure
    metric: str | None = None  # ppl | acc | acc_norm | nll (mean per-token cross-entropy, nats)
    value: float | None = None
    stderr: float | None = None  # standard error as reported by lm-eval; None for ppl
    n_samples: int | None = None  # examples (zero-shot) or predicted tokens (perplexity)
    per_sample: list[float] | None = None  # per-example correctness (0/1) for paired CIs
    # --- outcome and cost --------------------------------------------------------------
    status: str = STATUS_OK  # ok | failed
    error: str | None = None  # "ExceptionType: message" (+ short traceback) when failed
    load_s: float = 0.0  # seconds loading model + tokenizer
    quantize_s: float = 0.0  # seconds quantizing weights
    eval_s: float = 0.0  # seconds evaluating (all tasks of the cell)
    forward_s: float = 0.0  # seconds inside model forward passes (overhead accounting)
    wall_s: float = 0.0  # seconds for the whole cell
    # --- provenance --------------------------------------------------------------------
    version_harness: str = ""
    version_torch: str = ""
    version_transformers: str = ""
    version_lm_eval: str = ""
    git_commit: str = ""  # commit of the harness checkout, "+dirty" if modified; "" if none
    hostname: str = ""
    device: str = ""  # e.g. cpu, cuda:0 (NVIDIA H100 ...)
    created_at: str = ""  # UTC ISO-8601 time the record was made
    seed: int = 0
    config: str = ""  # the resolved cell config as YAML


SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("sweep", pa.string()),
        ("cell_id", pa.string()),
        ("model", pa.string()),
        ("model_family", pa.string()),
        ("architecture", pa.string()),
        ("n_params", pa.int64()),
        ("n_nonembedding_params", pa.int64()),
        ("n_quantized_params", pa.int64()),
        ("quantized_modules", pa.list_(pa.string())),
        ("method", pa.string()),
        ("dtype", pa.string()),
        ("dtype_family", pa.string()),
        ("bits", pa.int32()),
        ("block_size", pa.int64()),
        ("scale_format", pa.string()),
        ("centering", pa.bool_()),
        ("outlier_fraction", pa.float64()),
        ("total_model_bits", pa.float64()),
        ("bits_per_param", pa.float64()),
        ("task", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("stderr", pa.float64()),
        ("n_samples", pa.int64()),
        ("per_sample", pa.list_(pa.float32())),
        ("status", pa.string()),
        ("error", pa.string()),
        ("load_s", pa.float64()),
        ("quantize_s", pa.float64()),
        ("eval_s", pa.float64()),
        ("forward_s", pa.float64()),
        ("wall_s", pa.float64()),
        ("version_harness", pa.string()),
        ("version_torch", pa.string()),
        ("version_transformers", pa.string()),
        ("version_lm_eval", pa.string()),
        ("git_commit", pa.string()),
        ("hostname", pa.string()),
        ("device", pa.string()),
        ("created_at", pa.string()),
        ("seed", pa.int64()),
        ("config", pa.string()),
    ]
)

_FIELDS = [f.name for f in dataclasses.fields(Record)]


def cell_path(results_dir: str | os.PathLike, sweep: str, cell_id: str) -> Path:
    """Where the parquet file of one cell lives."""
    return Path(results_dir) / sweep / f"{cell_id}.parquet"


def to_table(records: list[Record]) -> pa.Table:
    """Records -> an Arrow table with exactly :data:`SCHEMA` (types enforced, not inferred)."""
    rows = [dataclasses.asdict(r) for r in records]
    columns = {name: [row[name] for row in rows] for name in SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def write_cell(
    records: list[Record], path: str | os.PathLike, config_yaml: str | None = None
) -> Path:
    """Atomically write all rows of one cell to ``path`` (and its config beside it).

    The rows go to a temporary file in the destination folder, which is flushed, fsynced and
    renamed over ``path``. ``os.replace`` is atomic on POSIX within one file system, so readers
    see either the old complete file, the new complete file, or none.
    """
    if not records:
        raise ValueError("write_cell: records is empty; a cell writes at least one row")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if config_yaml is not None:
        _atomic_write_bytes(path.with_suffix(".yaml"), config_yaml.encode())
    table = to_table(records)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_cell(path: str | os.PathLike) -> pa.Table:
    """Read one cell file with the store schema."""
    return pq.read_table(path, schema=SCHEMA)


def cell_files(results_dir: str | os.PathLike, sweep: str | None = None) -> list[Path]:
    """Every complete cell file in the store (temporary files start with '.' and are ignored)."""
    root = Path(results_dir)
    pattern = f"{sweep}/*.parquet" if sweep else "*/*.parquet"
    return sorted(p for p in root.glob(pattern) if not p.name.startswith("."))


def read_store(results_dir: str | os.PathLike, sweep: str | None = None) -> pa.Table:
    """All rows of the store (or of one sweep) as one Arrow table with :data:`SCHEMA`."""
    files = cell_files(results_dir, sweep)
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables([read_cell(p) for p in files])


def cell_status(path: str | os.PathLike) -> str | None:
    """``ok``, ``failed``, or None if the cell has no file yet. Used to resume sweeps."""
    path = Path(path)
    if not path.exists():
        return None
    statuses = set(pq.read_table(path, columns=["status"]).column("status").to_pylist())
    return STATUS_FAILED if STATUS_FAILED in statuses or not statuses else STATUS_OK


def records_from_table(table: pa.Table) -> list[Record]:
    """Arrow table -> Records (the inverse of :func:`to_table`)."""
    return [Record(**row) for row in table.to_pylist()]


def empty_record(**fields: Any) -> Record:
    """A Record with the given fields set; unknown field names fail loudly."""
    unknown = set(fields) - set(_FIELDS)
    if unknown:
        raise TypeError(f"Record has no field(s) {sorted(unknown)}; known: {_FIELDS}")
    return Record(**fields)
