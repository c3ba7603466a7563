"""The one result schema of kbit, and the parquet store that holds it.

Long format: one row per (cell, task, metric). A *cell* is one resolved configuration
(model x quantization config x evaluation). Every number the harness reports lands here
together with the configuration and versions that produced it, so a figure can always be
traced back to the exact run.

Store layout::

    RESULTS_DIR/<sweep>/<cell_id>.parquet   # all rows of one cell (ok rows, or one failed row)
    RESULTS_DIR/<sweep>/<cell_id>.yaml      # the resolved cell config, for humans
    RESULTS_DIR/<sweep>/.cells.index        # one line per write (harness.store_index)

Each cell file is written atomically (temporary file in the same folder, fsync, rename), so a
crash or SIGKILL mid-write never leaves a partial file under a final name, and two jobs
writing the same cell cannot interleave bytes. Only regular files are cell files: a FIFO (or
socket, device, folder) named ``*.parquet`` is named as a problem and never opened.

Why one module: the schema and the store that holds it change together (a new column is what
the store's schema check and old-file reading must accept), and every reader of results needs
both; kbit's layers keep it at the bottom, imported by the runner, the cluster and analysis.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from harness import store_index
from harness.files import atomic_output, atomic_write, user_path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: resolved numerics, data provenance, dtype overrides (docs/records.md)

STATUS_OK = "ok"
STATUS_FAILED = "failed"

# k of the unquantized baseline: the one cell of a model that is not quantized at all.
BASELINE_BITS = 16

# The derived row that the paper plots: mean zero-shot accuracy over its four tasks
# (LAMBADA, WinoGrande, HellaSwag, PIQA), or over whichever tasks the eval config names.
MEAN_ZEROSHOT_TASK = "zeroshot_mean"


def _arrow(arrow_type: pa.DataType) -> dict[str, pa.DataType]:
    """Field metadata pinning the Arrow type where the default mapping would widen it."""
    return {"arrow": arrow_type}


# Roles of the record columns that are configuration axes (what analysis groups and pairs
# cells by; analysis reads them here, never from the cell schema):
AXIS_QUANTIZATION = "quantization"  # a curve's configuration apart from k
AXIS_NUMERICS = "numerics"  # how the forward passes ran (resolved)
AXIS_EVALUATION = "evaluation"  # what the cell was measured on
AXIS_ROLES = (AXIS_QUANTIZATION, AXIS_NUMERICS, AXIS_EVALUATION)
# The generic column of the axes that have no column of their own (harness.config.axes): a new
# axis of the cell schema reaches every record, grouping and pairing through it.
AXES_COLUMN = "axes"


def _axis(role: str, rank: int, **extra: Any) -> dict[str, Any]:
    """Field metadata of a configuration column: its role and its rank in the grouping key
    (the order analysis has always built its keys in, so a stored grouping never reorders).
    ``method_setting=True``: the column mirrors the method setting of the same name (filled
    from the method's settings by the generic record code; analysis derives it from
    ``method_settings`` where a store lacks it)."""
    return {"axis": role, "rank": rank, **extra}


@dataclass
class Record:
    """One row of the store. Field comments are the schema's documentation."""

    # --- identity ---------------------------------------------------------------------
    # bumped on any incompatible change of this schema
    schema_version: int = field(default=SCHEMA_VERSION, metadata=_arrow(pa.int32()))
    sweep: str = "adhoc"  # sweep name; the store's subfolder
    cell_id: str = (
        ""  # stable hash of the resolved cell config (see harness.config.identity.cell_id)
    )
    # --- model ------------------------------------------------------------------------
    model: str = ""  # what the user passed: local path, hub id or zoo:<family>/<size>
    model_family: str = ""  # family for plot panels (zoo family, or e.g. "opt", "pythia")
    architecture: str = ""  # HF config.model_type, e.g. gpt_neox, gpt2, opt, bloom, llama
    n_params: int = 0  # all parameters of the model
    n_nonembedding_params: int = 0  # parameters outside token/position embeddings and head
    # tokens the model was trained on (zoo builds and checkpoints, Pythia steps); None when
    # unknown (harness.models.training_tokens)
    train_tokens: int | None = None
    n_quantized_params: int = 0  # parameters actually stored in k bits
    quantized_modules: list[str] = field(default_factory=list)  # module names quantized
    # --- quantization config -----------------------------------------------------------
    # blockwise | proxy | gptq | hqq | ... | none (16-bit baseline)
    method: str = field(default="blockwise", metadata=_axis(AXIS_QUANTIZATION, 0))
    # the method's own settings (conf/method/<name>.yaml) as sorted JSON; "{}" when none
    method_settings: str = field(default="{}", metadata=_axis(AXIS_QUANTIZATION, 7))
    # data type entry name (conf/dtype/<name>.yaml), e.g. int, quantile, nf4
    dtype: str = field(default="", metadata=_axis(AXIS_QUANTIZATION, 1))
    dtype_family: str = ""  # int | float | dynamic | quantile | normal | none
    # fields of the data type set apart from its entry (e.g. exponent_bits=3), as sorted
    # JSON; "{}" when the entry is used as it is. Part of every label: variants never merge.
    dtype_overrides: str = field(default="{}", metadata=_axis(AXIS_QUANTIZATION, 2))
    bits: int = field(default=BASELINE_BITS, metadata=_arrow(pa.int32()))  # k; 16 = baseline
    # elements per block; None = one scale per tensor
    block_size: int | None = field(default=None, metadata=_axis(AXIS_QUANTIZATION, 3))
    # fp16 | bf16 | fp32 | e8m0 | mx | nvfp4
    scale_format: str = field(default="fp16", metadata=_axis(AXIS_QUANTIZATION, 4))
    # block mean subtracted and stored
    centering: bool = field(default=False, metadata=_axis(AXIS_QUANTIZATION, 5))
    # proxy's setting (share of input dims kept in 16 bit), kept as a column for the stores
    # that have it: a mirror of method_settings, 0.0 for methods without the setting
    outlier_fraction: float = field(
        default=0.0, metadata=_axis(AXIS_QUANTIZATION, 6, method_setting=True)
    )
    # the axes of the cell schema without a column of their own (harness.config.axes), as
    # sorted JSON of their non-default values; "{}" when every one is at its default
    axes: str = field(default="{}", metadata=_axis(AXIS_QUANTIZATION, 8))
    total_model_bits: float = 0.0  # harness.bits.total_model_bits: every parameter counted
    bits_per_param: float = 16.0  # total_model_bits / n_params
    # --- numerics (resolved, never "auto"; part of the cell id) -----------------------
    # cpu | cuda | mps: where the forward passes ran
    device_class: str = field(default="", metadata=_axis(AXIS_NUMERICS, 0))
    # float32 | bfloat16 | float16: the dtype the model ran in
    compute_dtype: str = field(default="", metadata=_axis(AXIS_NUMERICS, 1))
    # --- the measurement ---------------------------------------------------------------
    task: str | None = None  # e.g. wikitext2, lambada_openai, zeroshot_mean; None on failure
    metric: str | None = None  # ppl | acc | acc_norm | nll (mean per-token cross-entropy, nats)
    value: float | None = None
    stderr: float | None = None  # standard error as reported by lm-eval; None for ppl
    n_samples: int | None = None  # examples (zero-shot) or predicted tokens (perplexity)
    # per-example values for paired CIs: 0/1 correctness (zero-shot acc rows), or the mean
    # NLL of each window (perplexity nll rows; windows are identical across cells on one text)
    per_sample: list[float] | None = field(default=None, metadata=_arrow(pa.list_(pa.float32())))
    # where this row's data came from: "local:<path>;sha256=<hex>" or
    # "hub:<dataset>[/<config>]@<revision>"; for zeroshot_mean the sources of its tasks
    data_source: str | None = None
    task_version: str | None = None  # lm-eval task version (local tasks: "+kbitN" added)
    # short hash of every task's source and version: one per cell
    data_digest: str = field(default="", metadata=_axis(AXIS_EVALUATION, 2))
    # --- outcome and cost --------------------------------------------------------------
    status: str = STATUS_OK  # ok | failed (non-finite results are failed, never ok)
    error: str | None = None  # "ExceptionType: message" (+ short traceback) when failed
    load_s: float = 0.0  # seconds loading model + tokenizer
    quantize_s: float = 0.0  # seconds quantizing weights
    eval_s: float = 0.0  # seconds evaluating (all tasks of the cell)
    forward_s: float = 0.0  # seconds inside model forward passes (overhead accounting)
    wall_s: float = 0.0  # seconds for the whole cell
    # the scheduler job that ran the cell ("<array job>_<task>" on Slurm, "local:<pid>" for
    # submitit's local processes); None when run in the launching process
    job_id: str | None = None
    # True when the model was already in memory, loaded by an earlier cell of the same job or
    # process (a shared load); model loads of a sweep = its cells with model_reused False
    model_reused: bool = False
    # --- provenance --------------------------------------------------------------------
    version_harness: str = ""
    version_torch: str = ""
    version_transformers: str = ""
    version_lm_eval: str = ""
    git_commit: str = ""  # commit of the harness checkout, "+dirty" if modified; "" if none
    # plugins loaded by the process that ran the cell (harness.plugins.loaded(): name ->
    # version or file digest) as sorted JSON; "{}" when none
    plugins: str = "{}"
    hostname: str = ""
    device: str = ""  # e.g. cpu, cuda:0 (NVIDIA H100 ...)
    trust_remote_code: bool = False  # whether the model folder's own code was allowed to run
    created_at: str = ""  # UTC ISO-8601 time the record was made
    seed: int = 0
    config: str = ""  # the resolved cell config as YAML


_PLAIN_TYPES: dict[str, pa.DataType] = {
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
    "bool": pa.bool_(),
    "list[str]": pa.list_(pa.string()),
}


def _arrow_type(f: dataclasses.Field) -> pa.DataType:
    """The Arrow type of one Record field: pinned in its metadata, else from its annotation."""
    if "arrow" in f.metadata:
        return f.metadata["arrow"]
    name = str(f.type).replace(" | None", "").replace("Optional[", "").rstrip("]")
    name = "list[str]" if str(f.type).startswith("list[str]") else name
    if name not in _PLAIN_TYPES:
        raise TypeError(f"Record.{f.name}: no Arrow type for annotation {f.type!r}; pin one")
    return _PLAIN_TYPES[name]


# The store's Arrow schema, derived from Record so the two can never disagree.
SCHEMA = pa.schema([(f.name, _arrow_type(f)) for f in dataclasses.fields(Record)])

_FIELDS = [f.name for f in dataclasses.fields(Record)]


def axis_columns(*roles: str) -> list[str]:
    """The record columns that are configuration axes with one of ``roles`` (all axis roles
    when none given), each role's columns in their grouping-key rank, roles in the order
    given. What analysis groups, labels and pairs cells by (analysis reads the record schema,
    never the cell schema)."""
    out = []
    for role in roles or AXIS_ROLES:
        tagged = [f for f in dataclasses.fields(Record) if f.metadata.get("axis") == role]
        out += [f.name for f in sorted(tagged, key=lambda f: f.metadata["rank"])]
    return out


def method_setting_columns() -> dict[str, Any]:
    """{column: default} of the record columns that mirror a method setting of the same name
    (``outlier_fraction``): filled from whichever method's settings have it, the default
    otherwise. Method-agnostic: no code names the method that owns a setting."""
    return {
        f.name: f.default for f in dataclasses.fields(Record) if f.metadata.get("method_setting")
    }


def mirrored_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """The values of :func:`method_setting_columns` for a method's settings (plain data)."""
    settings = settings or {}
    return {name: type(default)(settings.get(name, default) or default)
            for name, default in method_setting_columns().items()}  # fmt: skip


def cell_path(results_dir: str | os.PathLike, sweep: str, cell_id: str) -> Path:
    """Where the parquet file of one cell lives (``results_dir`` read by
    :func:`harness.files.user_path`, the rule every check of it uses too)."""
    return user_path(results_dir, "results_dir") / sweep / f"{cell_id}.parquet"


def to_table(records: list[Record]) -> pa.Table:
    """Records -> an Arrow table with exactly :data:`SCHEMA` (types enforced, not inferred)."""
    rows = [dataclasses.asdict(r) for r in records]
    columns = {name: [row[name] for row in rows] for name in SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def write_cell(
    records: list[Record], path: str | os.PathLike, config_yaml: str | None = None
) -> Path:
    """Atomically write all rows of one cell to ``path`` (and its config beside it).

    Through :func:`harness.files.atomic_output`: readers see either the old complete file,
    the new complete file, or none, and the file gets the umask's permissions.

    The pair stays consistent on a full disk or any write error: the parquet is written
    completely (to its temporary file) before the ``.yaml`` sidecar is touched, and a
    sidecar written for a parquet that then fails to land is removed, so a sidecar never
    stands without its cell file. The error is re-raised as an :class:`OSError` naming
    ``path`` (kbit-run reports it as one line). After the file is in place, one line is
    appended to the sweep's index (:mod:`harness.store_index`) so ``kbit-status`` need not
    open it; failing to append is logged, never fatal: the cell file is the truth.
    """
    if not records:
        raise ValueError("write_cell: records is empty; a cell writes at least one row")
    path = Path(path)
    table = to_table(records)  # before any file exists: a value that cannot be stored fails here
    sidecar = path.with_suffix(".yaml")
    wrote_sidecar = False
    try:
        with atomic_output(path) as fh:
            pq.write_table(table, fh)
            fh.flush()  # every byte in the file now: its size and mtime are final
            written = os.fstat(fh.fileno())
            if config_yaml is not None:
                atomic_write(sidecar, config_yaml)
                wrote_sidecar = True
    except OSError as err:
        if wrote_sidecar and not path.is_file():
            sidecar.unlink(missing_ok=True)  # never a sidecar without its cell file
        # strerror stays the system's words and filename is the cell file, so the message
        # reads "[Errno 28] No space left on device: '<path>'" (kbit-run words it as one line)
        raise OSError(err.errno, err.strerror or str(err).splitlines()[0], str(path)) from err
    state, error = summarize_cell(table.column("status").to_pylist(),
                                  table.column("error").to_pylist())  # fmt: skip
    store_index.append(path.parent, path.stem, state, error, written.st_size,
                       written.st_mtime_ns)  # fmt: skip
    return path


def summarize_cell(statuses: list[str | None], errors: list[str | None]) -> tuple[str, str]:
    """(state, first error line) of one cell from its rows' ``status`` and ``error``.

    ``failed`` when any row failed (or there are no rows), ``ok`` when every row is ok,
    else ``other``; the error is the first line of the first non-empty error ("" if none).
    The one rule kbit-status counts by, from a cell file or from its index entry.
    """
    if STATUS_FAILED in statuses or not statuses:
        found = [e for e in errors if e]
        return STATUS_FAILED, (found[0].strip().splitlines() or [""])[0] if found else ""
    if all(s == STATUS_OK for s in statuses):
        return STATUS_OK, ""
    return "other", ""


def read_cell(path: str | os.PathLike) -> pa.Table:
    """Read one cell file with the store schema (columns an older file lacks come back null)."""
    return pq.read_table(path, schema=SCHEMA)


def cell_files(results_dir: str | os.PathLike, sweep: str | None = None) -> list[Path]:
    """Every complete cell file in the store (temporary files start with '.' and are ignored).

    Only regular files (or symlinks to them): a FIFO, socket, device or folder named
    ``*.parquet`` is left out without being opened (:func:`cell_entries` names them).
    """
    return cell_entries(results_dir, sweep)[0]


def cell_entries(
    results_dir: str | os.PathLike, sweep: str | None = None
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(regular cell files, [(non-regular entry named ``*.parquet``, why)]), both sorted.

    Why: opening a FIFO blocks until a writer appears (``kbit-status`` hung on one), and a
    device or socket is no cell either. The type comes from the directory listing (or one
    ``stat``), never from opening the entry.
    """
    root = Path(results_dir)
    if sweep:
        folders = [root / sweep]
    else:
        try:
            with os.scandir(root) as it:
                folders = sorted(root / e.name for e in it if _entry_is_dir(e))
        except OSError:
            folders = []
    files: list[Path] = []
    odd: list[tuple[Path, str]] = []
    for folder in folders:
        for entry, mode in _parquet_entries(folder):
            path = folder / entry.name
            if mode is None or stat.S_ISREG(mode):
                files.append(path)
            else:
                odd.append((path, f"{file_kind(mode)}, not a regular file: skipped unopened"))
    return sorted(files), sorted(odd)


def cell_stats(
    folder: str | os.PathLike,
) -> tuple[list[tuple[str, os.stat_result]], list[tuple[Path, str]]]:
    """(sorted (file name, ``stat``) of the regular cell files of one sweep folder, its
    non-regular ``*.parquet`` entries with why) from one listing: nothing is opened.

    Names and stats rather than paths: ``kbit-status`` compares 20,000 of them with its
    index, and building and sorting Path objects was most of its time.
    """
    folder = Path(folder)
    files: list[tuple[str, os.stat_result]] = []
    odd: list[tuple[Path, str]] = []
    for entry, mode in _parquet_entries(folder):
        if mode is not None and not stat.S_ISREG(mode):
            odd.append((folder / entry.name, f"{file_kind(mode)}, not a regular file: "
                        "skipped unopened"))  # fmt: skip
            continue
        try:
            files.append((entry.name, entry.stat()))
        except OSError:  # removed meanwhile
            continue
    files.sort(key=lambda item: item[0])
    return files, sorted(odd)


def _entry_is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _parquet_entries(folder: Path) -> list[tuple[os.DirEntry, int | None]]:
    """(entry, file mode or None for a plain regular file) of ``folder``'s ``*.parquet``
    names that do not start with '.'; a dangling symlink is left out."""
    found = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith(".") or not entry.name.endswith(".parquet"):
                    continue
                try:
                    if entry.is_file():  # follows a symlink; d_type, else one stat
                        found.append((entry, None))
                        continue
                    mode = entry.stat().st_mode  # follows a symlink
                except OSError:  # a dangling symlink, or gone meanwhile
                    continue
                found.append((entry, mode))
    except (FileNotFoundError, NotADirectoryError):
        pass
    return found


def file_kind(mode: int) -> str:
    """A name for a non-regular file type: 'a FIFO', 'a socket', 'a directory', ..."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "a special file"


def is_regular_file(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a regular file (after symlinks), else why not (never opens it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        return f"cannot stat: {err.strerror or err}"
    return None if stat.S_ISREG(mode) else f"{file_kind(mode)}, not a regular file"


# Without these two a file says nothing about any cell: it cannot be a cell file.
_REQUIRED_COLUMNS = ("cell_id", "status")
_MAX_REASON = 300  # characters of one problem line
T = TypeVar("T")
_MAX_SCAN_THREADS = 8  # footer reads are file opens and small reads: threads overlap them


def map_files(func: Callable[[Path], T], paths: Sequence[Path]) -> list[T]:
    """``[func(p) for p in paths]``, on a few threads when there are many files: reading a
    cell file is mostly opening it and small reads, which threads overlap (the GIL is free)."""
    workers = min(_MAX_SCAN_THREADS, os.cpu_count() or 1, max(1, len(paths) // 64))
    if workers <= 1:
        return [func(p) for p in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(func, paths, chunksize=32))


@dataclass
class StoreScan:
    """The store's cell files split into readable ones and problems (path, one-line reason).

    Why: one truncated or foreign parquet (a disk filled up, a file copied in by hand) must
    not stop a sweep, kbit-status or the analysis; it is named and its cell runs again.
    """

    files: list[Path]
    problems: list[tuple[Path, str]]


def _one_line(text: str) -> str:
    """The first non-empty line of ``text``, cut to :data:`_MAX_REASON` characters."""
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "..."


def reason_line(text: str) -> str:
    """The first non-empty line of ``text``, cut to 300 characters: one problem line."""
    return _one_line(text)


def schema_problem(schema: pa.Schema) -> str | None:
    """Why a file with this Arrow schema is not a cell file of :data:`SCHEMA`, or None.

    A file may lack columns (an older ``schema_version`` predates them: they read as null)
    but every column it has must be one of :data:`SCHEMA` with the same type, and
    ``cell_id`` and ``status`` must be there.
    """
    names = schema.names
    missing = [name for name in _REQUIRED_COLUMNS if name not in names]
    if missing:
        return _one_line(f"not a kbit cell file: no column(s) {missing}; it has {names}")
    for col in schema:
        want = _SCHEMA_TYPES.get(col.name)
        if want is None:
            return _one_line(f"column {col.name!r} is not in the store's schema")
        if not col.type.equals(want):
            return f"column {col.name!r} is {col.type}; the store's schema has {want}"
    return None


_SCHEMA_TYPES = {f.name: f.type for f in SCHEMA}


def cell_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a readable cell file (footer only: cheap), or None when it is."""
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # truncated, empty, random bytes, unreadable: all one outcome
        return _one_line(f"unreadable parquet: {type(err).__name__}: {err}")
    return schema_problem(schema)


def scan_store(results_dir: str | os.PathLike, sweep: str | None = None) -> StoreScan:
    """Sort every cell file of the store (or of one sweep) into readable files and problems.

    Reads only each file's footer (its schema), on a few threads since the time is file
    opening and I/O, so scanning tens of thousands of cells takes seconds.
    """
    paths, odd = cell_entries(results_dir, sweep)
    found = map_files(cell_file_problem, paths)
    scan = StoreScan(files=[], problems=list(odd))
    for path, problem in zip(paths, found, strict=True):
        if problem is None:
            scan.files.append(path)
        else:
            scan.problems.append((path, problem))
    scan.problems.sort()
    return scan


def log_problems(problems: list[tuple[Path, str]], what: str = "skipped") -> None:
    """One warning per problem file, so a reader of the log can find and remove it."""
    for path, reason in problems:
        log.warning("cell file %s %s: %s", path, what, reason)


def read_store(
    results_dir: str | os.PathLike, sweep: str | None = None, columns: list[str] | None = None
) -> pa.Table:
    """All rows of the store (or of one sweep) as one Arrow table with :data:`SCHEMA`
    (or only ``columns`` of it: a planner reading cell costs skips the heavy ones).

    Problem files (see :func:`scan_store`, or a file whose data pages fail to read) are
    logged and skipped: the rest of the store stays usable.
    """
    scan = scan_store(results_dir, sweep)
    log_problems(scan.problems)
    if not scan.files:
        empty = SCHEMA.empty_table()
        return empty if columns is None else empty.select(columns)
    import pyarrow.dataset as ds  # here: it imports pandas, which kbit-status never needs

    try:  # one multi-threaded scan; per file only when some file's data is damaged
        dataset = ds.dataset([str(p) for p in scan.files], schema=SCHEMA, format="parquet")
        return dataset.to_table(columns=columns)
    except Exception:
        table = _read_each(scan.files)
        return table if columns is None else table.select(columns)


def _read_each(files: list[Path]) -> pa.Table:
    """The cells of ``files`` one by one, skipping (and logging) those that fail to read."""
    tables = []
    for path in files:
        try:
            tables.append(read_cell(path))
        except Exception as err:  # a footer that reads but data that does not
            log_problems([(path, _one_line(f"unreadable data: {type(err).__name__}: {err}"))])
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def cell_status(path: str | os.PathLike) -> str | None:
    """``ok``, ``failed``, or None if the cell has no readable file. Used to resume sweeps.

    Never raises: an unreadable or foreign file is logged and reported as None, so a
    resumed sweep runs that cell again (and its new file replaces the bad one).
    """
    path = Path(path)
    if not path.exists():
        return None
    odd = is_regular_file(path)
    if odd:  # a FIFO would block the open: never opened
        log_problems([(path, odd)], "cannot be read; its cell will run again")
        return None
    try:
        with pq.ParquetFile(path) as pf:
            problem = schema_problem(pf.schema_arrow)
            statuses = set() if problem else set(pf.read(columns=["status"])["status"].to_pylist())
    except Exception as err:
        problem = _one_line(f"unreadable parquet: {type(err).__name__}: {err}")
    if problem:
        log_problems([(path, problem)], "cannot be read; its cell will run again")
        return None
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
