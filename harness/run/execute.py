"""One grid cell end to end: validate -> load -> quantize -> evaluate -> records (``kbit-run``).

``kbit-run model=/path/to/model dtype=quantile bits=4 block_size=64 eval=paper``; ``bits=16``
is the unquantized baseline (recorded with method/dtype/dtype_family ``none``).

Order of work, and what each failure does:

==============  ===============================================================================
command line    :func:`prepare_command_line` (``harness.config.overrides``): no ``_target_``, plain config
                group options, ``true``/``false`` booleans, nothing set beside a ``format=``;
                ``~`` and ``$VAR`` in the user paths expanded once (Hydra's folders included)
compose         Hydra checks types and keys against ``harness.config.schema.CellConfig``
validate        :func:`validate_cell`: every value rule, the results folder, the data type at k,
                the model folder (config.json, weight files, remote code), the evaluation data
                (files parse, task names exist), numerics and data sources resolved into the
                cell id, and a trial record. A refused cell writes nothing, exits 2, one line.
run             :func:`run_cell`; a failure here (OOM, an lm-eval exception) writes ONE
                ``failed`` record holding the error; a NaN/inf in any evaluation writes
                ``failed`` rows for the tasks it touched (never an ``ok`` accuracy).
report          a single run prints the cell's results table on stdout, read back from its file
                (``harness.run.report``; also for a cell already done); a sweep prints its launched
                cells' table (``harness.sweep.outcome.report_outcome``)
exit            0 when the cell is ok (or already done), 1 when it failed or its file could not
                be written (one line, ``cannot write the cell file ...``), 2 when refused.
==============  ===============================================================================

Identity (``harness.config.identity``): the cell id hashes the result-determining config with the
resolved device class, compute dtype and evaluation data sources. A SIGKILL leaves no record
at all (the write is atomic).

Modules: validation in :mod:`harness.run.validate`, the record fields in
:mod:`harness.run.record`, the measurement rows in :mod:`harness.run.measure`; this one loads,
quantizes, writes and is the entry point. ``plugins=[...]`` on the command line is loaded
(``harness.plugins.load_plugins``) before Hydra composes, so the plugins' data types and
methods are in the schema the cell is checked against.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.config.identity import Resolved, cell_id, dtype_overrides
from harness.config.overrides import conf_dir
from harness.config.refusals import (
    EXIT_FAILED,
    EXIT_REFUSED,
    CellRefused,
    one_line_errors,
    target_overrides,
    target_refusal_line,
)
from harness.config.schema import (
    ConfigError,
    method_settings,
    register_schema,
    with_user_paths,
)
from harness.models.loading import LoadedModel, guess_family, load_model
from harness.models.training_tokens import train_tokens
from harness.provenance import device_name
from harness.records import (
    BASELINE_BITS,
    STATUS_FAILED,
    STATUS_OK,
    Record,
    cell_path,
    cell_status,
    write_cell,
)
from harness.run.measure import evaluate_rows, perplexity_limit
from harness.run.record import base_fields, cell_outcome, failed_record
from harness.run.validate import CellValidator, ValidateCell, validate_cell

# Names kept importable from this module (their homes are harness.run.validate, .record, .measure)
__all__ = [
    "CellValidator",
    "CellWriteError",
    "ModelCache",
    "ValidateCell",
    "base_fields",
    "cell_id",
    "load_command_line_plugins",
    "main",
    "perplexity_limit",
    "prepare_command_line",
    "record_cell",
    "register_schema",
    "run_and_record",
    "run_cell",
    "validate_cell",
]

log = logging.getLogger(__name__)


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the cell
class ModelCache:
    """Keeps the last loaded model, keyed by (model, device, compute dtype, remote code).

    Consecutive cells of one model (an in-process multirun) reuse it; its weights are
    restored to pristine after every cell. One slot: a sweep orders cells model-major.
    """

    def __init__(self) -> None:
        self.key: tuple[str, str, str, bool] | None = None
        self.loaded: LoadedModel | None = None

    def get(self, cfg: DictConfig, resolved: Resolved) -> tuple[LoadedModel, bool]:
        key = (str(cfg.model), str(cfg.device), resolved.compute_dtype, bool(cfg.trust_remote_code))
        if self.key == key and self.loaded is not None:
            return self.loaded, True
        self.clear()
        self.loaded = load_model(
            str(cfg.model), device=str(cfg.device), compute_dtype=resolved.compute_dtype,
            zoo_dir=cfg.zoo_dir, trust_remote_code=bool(cfg.trust_remote_code),
        )  # fmt: skip
        self.key = key
        return self.loaded, False

    def clear(self) -> None:
        self.key, self.loaded = None, None
        _free_memory()


def _quantize(cfg: DictConfig, loaded: LoadedModel, calibration: Any = None) -> dict[str, Any]:
    """Quantize in place (or not, at 16 bit); returns the record fields it determines."""
    from harness.models.loading import count_params
    from harness.quantize import quantize_model
    from harness.quantize.model import count_bits

    n_params, n_nonembed = count_params(loaded.model)
    fields: dict[str, Any] = {"n_params": n_params, "n_nonembedding_params": n_nonembed}
    if cfg.bits == BASELINE_BITS:
        fields.update(total_model_bits=float(BASELINE_BITS * n_params), bits_per_param=16.0)
        return fields
    settings = method_settings(cfg)
    report = quantize_model(
        loaded.model, cfg.dtype.name, cfg.bits, cfg.block_size,
        scale_format=str(cfg.scale_format), centering=cfg.centering, method=settings.name,
        settings=settings, quantize_embeddings=cfg.quantize_embeddings,
        quantize_head=cfg.quantize_head, dtype_overrides=dtype_overrides(cfg),
        calibration=calibration, progress=False,
    )  # fmt: skip
    count = count_bits(loaded.model, report)
    fields.update(
        n_quantized_params=report.n_quantized_params, quantized_modules=report.modules,
        quantize_s=report.quantize_s,
        total_model_bits=float(count.total_bits), bits_per_param=float(count.bits_per_param),
    )  # fmt: skip
    return fields


def _calibration(cfg: DictConfig, loaded: LoadedModel) -> Any:
    """Calibration token ids for a method that needs them (GPTQ's protocol), else None."""
    from harness.evaluate.calibration import calibration_text
    from harness.evaluate.datasets import token_ids
    from harness.evaluate.perplexity import default_seqlen
    from harness.quantize.gptq import calibration_ids
    from harness.quantize.methods import get_method

    if cfg.bits == BASELINE_BITS:
        return None
    settings = method_settings(cfg)
    if not get_method(settings.name).needs_calibration:
        return None
    ids = token_ids(loaded.tokenizer, calibration_text(str(settings.calibration)))
    seqlen = int(settings.seqlen or default_seqlen(loaded.model))
    return calibration_ids(ids, None, int(settings.n_samples), seqlen, int(settings.seed))


def run_cell(
    cfg: DictConfig, model_cache: ModelCache | None = None, resolved: Resolved | None = None
) -> list[Record]:
    """Validate, load (or reuse), quantize, evaluate one cell; one Record per (task, metric).

    Raises on failure; the weights are restored to pristine whatever happens, so a cached
    model is clean for the next cell.
    """
    from harness.quantize import restore_model

    start = time.perf_counter()
    cfg = with_user_paths(cfg)
    resolved = resolved or validate_cell(cfg)
    cache = model_cache or ModelCache()
    loaded, reused = cache.get(cfg, resolved)
    try:
        if loaded.device_class != resolved.device_class:
            raise RuntimeError(f"cell resolved for device class {resolved.device_class!r} but the "
                               f"model loaded on {loaded.device_class!r}")  # fmt: skip
        restore_model(loaded.model)
        fields = base_fields(cfg, resolved)
        fields.update(architecture=loaded.architecture, device=device_name(loaded.device),
                      load_s=0.0 if reused else loaded.load_s, model_reused=reused)  # fmt: skip
        fields["model_family"] = cfg.get("model_family") or guess_family(
            str(cfg.model), loaded.architecture
        )
        fields["train_tokens"] = train_tokens(str(cfg.model), loaded.path)
        fields.update(_quantize(cfg, loaded, _calibration(cfg, loaded)))
        eval_start = time.perf_counter()
        rows, forward_s = evaluate_rows(cfg, loaded, resolved)
        fields.update(eval_s=time.perf_counter() - eval_start, forward_s=forward_s)
    finally:
        restore_model(loaded.model)
        if model_cache is None:
            cache.clear()
    fields["wall_s"] = time.perf_counter() - start
    return [Record(**fields, **row) for row in rows]


# ----------------------------------------------------------------------------- entry point
_MODEL_CACHE = ModelCache()  # one per process: in-process multirun cells share the model
_OUTCOMES: list[str] = []  # statuses of the cells this process ran (the single-run exit code)
_WRITE_ERRORS: list[str] = []  # a single run's cell file that could not be written (one line)


class CellWriteError(OSError):
    """The cell ran but its file could not be written (a full disk, a folder made read-only).

    One line, ``cannot write the cell file <path>: <strerror>``; a single ``kbit-run`` prints
    it and exits 1 instead of Hydra's traceback.
    """

    def __init__(self, path: Path, err: OSError) -> None:
        super().__init__(err.errno, f"cannot write the cell file {path}: "
                                    f"{err.strerror or str(err).splitlines()[0]}")  # fmt: skip
        self.path = path

    def __str__(self) -> str:
        return str(self.strerror)


def run_and_record(cfg: DictConfig, model_cache: ModelCache | None = None) -> str:
    """Skip a finished cell, else run it and write its file; returns the cell's status.

    A cell that cannot run raises :class:`ConfigError` and writes nothing.
    """
    return record_cell(cfg, model_cache)[0]


def record_cell(cfg: DictConfig, model_cache: ModelCache | None = None) -> tuple[str, Path]:
    """:func:`run_and_record`, also returning the cell file's path (status ``skipped`` when
    the file already held an ok cell): what a single run prints its results table from."""
    cfg = with_user_paths(cfg)
    resolved = validate_cell(cfg)
    cid = cell_id(cfg, resolved)
    path = cell_path(cfg.results_dir, cfg.sweep, cid)
    if cell_status(path) == STATUS_OK:
        log.info("cell %s already done (%s); skipping", cid, path)
        return "skipped", path
    start = time.perf_counter()
    try:
        records = run_cell(cfg, model_cache, resolved)
    except Exception as exc:  # after validation: record the failure, let the sweep go on
        log.error("cell %s failed: %s", cid, exc, exc_info=True)
        records = [failed_record(cfg, exc, time.perf_counter() - start, resolved)]
    try:
        write_cell(records, path, OmegaConf.to_yaml(cfg, resolve=True))
    except OSError as err:
        raise CellWriteError(path, err) from err
    status = cell_outcome(records)
    errors = sorted({(r.error or "").splitlines()[0] for r in records if r.status != STATUS_OK})
    if errors:
        log.error("cell %s failed: %s", cid, "; ".join(errors))
    log.info("cell %s: %s -> %s", cid, status, path)
    return status, path


def _hydra_task(cfg: DictConfig) -> None:
    """One cell as Hydra runs it. A single run prints the cell's results table on stdout
    (``harness.run.report.print_results``). In a multirun the cell's progress bars, prints and INFO
    lines go to its job log file (``harness.progress.cell_output``; ``KBIT_VERBOSE=1`` or
    ``hydra.verbose=true`` keeps them on the terminal) and the sweep's progress line counts it.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from harness import progress
    from harness.run.report import print_results

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if not multirun:  # a single cell ends with its results table (also when already done)
        try:
            status, path = record_cell(cfg, _MODEL_CACHE)
            _OUTCOMES.append(status)
        except CellWriteError as err:  # reported by main() in one line, exit 1
            log.error("%s", err)
            _WRITE_ERRORS.append(str(err))
            _OUTCOMES.append(STATUS_FAILED)
            return
        print_results([path])
        return
    status = STATUS_FAILED
    try:
        with progress.cell_output(progress.job_log_file(), progress.verbose_requested()):
            status = run_and_record(cfg, _MODEL_CACHE)
        _OUTCOMES.append(status)
    finally:
        sweep_progress = progress.current()
        if sweep_progress is not None:
            sweep_progress.cell_finished(status)


def main() -> None:
    """``kbit-run``: register the schemas, let Hydra compose and run the cell(s), exit truthfully.

    Exit status: 0 every cell ok (or already done); 1 a cell failed (a multirun runs the rest
    first); 2 the input was refused before any work (one line on stderr).
    """
    import hydra

    _OUTCOMES.clear()
    _WRITE_ERRORS.clear()
    bad = target_overrides(sys.argv[1:])
    if bad:
        sys.stderr.write(f"kbit-run: {target_refusal_line(bad[0])}\n")
        sys.exit(EXIT_REFUSED)
    try:
        sys.argv = [sys.argv[0], *prepare_command_line(sys.argv[1:])]
        load_command_line_plugins(sys.argv[1:])  # before composing: their entries are options
        register_schema()  # reads $KBIT_DTYPE_DIR (expanded above)
    except (ConfigError, ValueError, ImportError) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.stderr.write(f"kbit-run: {(str(err).strip().splitlines() or [repr(err)])[0]}\n")
        sys.exit(EXIT_REFUSED)
    conf = conf_dir()  # absolute: a relative config_path means a package to Hydra
    try:
        with one_line_errors():
            hydra.main(config_path=str(conf), config_name="config", version_base="1.3")(
                _hydra_task
            )()
    except CellRefused as refused:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise refused.error from None
        sys.stderr.write(f"kbit-run: {refused.error}\n")
        sys.exit(EXIT_REFUSED)
    if _WRITE_ERRORS:
        sys.stderr.write(f"kbit-run: {_WRITE_ERRORS[-1]}\n")
    if STATUS_FAILED in _OUTCOMES:
        sys.exit(EXIT_FAILED)


def load_command_line_plugins(argv: list[str]) -> dict[str, str]:
    """Load the plugins of ``plugins=[module, ...]`` on the command line (and the installed
    entry-point plugins) before Hydra composes: ``harness.plugins.load_plugins``, so a data
    type, method or figure a plugin registers is known to the schema and every check.
    Returns name -> version or file digest; ``{}`` when no plugin loader is installed and
    none is named (an ImportError when one is named: refused in one line)."""
    from harness.config.overrides import command_overrides, plugin_modules

    modules = plugin_modules(command_overrides(argv))
    try:
        from harness.plugins import load_plugins
    except ModuleNotFoundError as err:
        if modules or err.name != "harness.plugins":
            raise
        return {}
    return load_plugins(modules)


def prepare_command_line(argv: list[str]) -> list[str]:
    """``argv`` checked and normalised before Hydra composes (:mod:`harness.config.overrides`).

    Refuses (:class:`ConfigError`, one line) an override Hydra's grammar rejects, a config
    group option that is not a plain name, a non-boolean value of a boolean setting, and a
    field set beside a format that fixes it. Rewrites the user paths (``results_dir``,
    ``data_root``, ``zoo_dir`` and the ``KBIT_*`` path variables, in ``os.environ``) to the
    expanded path, so this process and every job a launcher starts compose the same path.
    """
    from harness.config.overrides import (
        check_overrides,
        command_overrides,
        expand_path_env,
        expand_path_overrides,
    )

    overrides = command_overrides(argv)
    check_overrides(overrides)
    rewritten = dict(zip(overrides, expand_path_overrides(overrides), strict=True))
    expand_path_env()
    return [rewritten.get(a, a) for a in argv]


if __name__ == "__main__":
    main()
