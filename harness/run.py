"""One grid cell end to end: validate -> load -> quantize -> evaluate -> records (``kbit-run``).

``kbit-run model=/path/to/model dtype=quantile bits=4 block_size=64 eval=paper``; ``bits=16``
is the unquantized baseline (recorded with method/dtype/dtype_family ``none``).

Order of work, and what each failure does:

==============  ===============================================================================
compose         Hydra checks types and keys against ``harness.config.CellConfig``
validate        :func:`validate_cell`: every value rule, the results folder, the data type at k,
                the model folder (config.json, weight files, remote code), the evaluation data
                (files parse, task names exist), numerics and data sources resolved into the
                cell id, and a trial record. A refused cell writes nothing, exits 2, one line.
run             :func:`run_cell`; a failure here (OOM, an lm-eval exception) writes ONE
                ``failed`` record holding the error; a NaN/inf in any evaluation writes
                ``failed`` rows for the tasks it touched (never an ``ok`` accuracy).
exit            0 when the cell is ok (or already done), 1 when it failed, 2 when refused.
==============  ===============================================================================

Identity (``harness.identity``): the cell id hashes the result-determining config with the
resolved device class, compute dtype and evaluation data sources. A SIGKILL leaves no record
at all (the write is atomic).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from harness.config import ConfigError, check_cell, eval_limit, method_settings, register_schema
from harness.evaluate.datasets import check_text_file, resolve_text_path
from harness.evaluate.tasks import check_files, check_task_names
from harness.evaluate.zeroshot import split_tasks
from harness.files import writable_dir_problem
from harness.identity import (
    LOCAL,
    Resolved,
    Target,
    cell_id,
    dtype_overrides,
    model_numerics,
    resolve,
)
from harness.models import LoadedModel, guess_family, load_model
from harness.provenance import device_name, provenance_fields
from harness.quantize.methods import settings_dict
from harness.records import (
    BASELINE_BITS,
    MEAN_ZEROSHOT_TASK,
    STATUS_FAILED,
    STATUS_OK,
    Record,
    cell_path,
    cell_status,
    to_table,
    write_cell,
)
from harness.refusals import (
    EXIT_FAILED,
    EXIT_REFUSED,
    CellRefused,
    one_line_errors,
    target_overrides,
)

log = logging.getLogger(__name__)


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- validation
def quant_request(cfg: DictConfig, calibration: Any = None) -> Any:
    """The cell's quantization as the method registry takes it (``QuantRequest``)."""
    from harness.quantize.methods import QuantRequest

    return QuantRequest(
        str(cfg.dtype.name), cfg.bits, cfg.block_size, str(cfg.scale_format),
        bool(cfg.centering), dtype_overrides(cfg), bool(cfg.quantize_embeddings),
        bool(cfg.quantize_head), method_settings(cfg), calibration, progress=False,
    )  # fmt: skip


def _check_quantization(cfg: DictConfig) -> None:
    from harness.dtypes import check
    from harness.quantize.methods import get_method

    check(cfg.dtype.name, cfg.bits, **dtype_overrides(cfg))
    request = quant_request(cfg)
    entry = get_method(request.settings.name)
    if entry.validate is not None:
        entry.validate(request.settings, request)


def _check_eval(cfg: DictConfig, model_dir: Path | None) -> None:
    ev = cfg.eval
    for entry in ev.perplexity:
        path = resolve_text_path(entry.name, entry.get("path"), cfg.data_root, model_dir)
        if path is not None:
            check_text_file(entry.name, path)
    tasks = list(ev.tasks)
    check_task_names(tasks, cfg.data_root, model_dir)
    local, _ = split_tasks(tasks, cfg.data_root, model_dir)
    check_files(local, cfg.data_root, model_dir)


def validate_cell(cfg: DictConfig, target: Target = LOCAL) -> Resolved:
    """Refuse a cell that cannot run (:class:`ConfigError`, one line); cheap, loads no weights.

    Returns the resolved numerics and data sources (what the cell id is computed from).
    Every check that can fail after hours of work is made here first, including building a
    trial record: a value that cannot be stored fails now, not after the evaluation.
    """
    try:
        check_cell(cfg)
        if cfg.data_root is not None and not Path(str(cfg.data_root)).expanduser().is_dir():
            raise ConfigError(f"data_root={cfg.data_root!r} is not a folder; allowed: a folder "
                              "laid out like shared/data (eval/, corpus/), or null for the hub")  # fmt: skip
        problem = writable_dir_problem(Path(str(cfg.results_dir)) / str(cfg.sweep))
        if problem:
            raise ConfigError(problem)
        if cfg.bits != BASELINE_BITS:
            _check_quantization(cfg)
        model_dir = model_numerics(cfg, target)[2]
        _check_eval(cfg, model_dir)
        resolved = resolve(cfg, target)
        to_table([Record(**base_fields(cfg, resolved, with_config=False))])
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(
            str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        ) from exc
    return resolved


class ValidateCell(Callback):
    """Hydra callback: a single run's cell is validated before Hydra creates any folder."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        cell = copy.deepcopy(config)
        with read_write(cell), open_dict(cell):
            cell.pop("hydra", None)
        try:
            validate_cell(cell)
        except ConfigError as err:
            raise CellRefused(err) from err


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
    from harness.models import count_params
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
        outlier_fraction=report.outlier_fraction, quantize_s=report.quantize_s,
        total_model_bits=float(count.total_bits), bits_per_param=float(count.bits_per_param),
    )  # fmt: skip
    return fields


def _calibration(cfg: DictConfig, loaded: LoadedModel) -> Any:
    """Calibration token ids for a method that needs them (GPTQ's protocol), else None."""
    from harness.calibration import calibration_text
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


def _nonfinite_row(row: dict[str, Any], what: str) -> dict[str, Any]:
    """A measurement that cannot be trusted: failed, its value withheld, the count named."""
    return {**row, "value": None, "stderr": None, "per_sample": None, "status": STATUS_FAILED,
            "error": f"NonFiniteError: {what}"}  # fmt: skip


def _perplexity_rows(
    cfg: DictConfig, loaded: LoadedModel, resolved: Resolved
) -> tuple[list, float]:
    from harness.evaluate import load_text, perplexity_details

    rows, forward_s = [], 0.0
    for entry in cfg.eval.perplexity:
        text = load_text(entry.name, entry.get("path"), cfg.data_root, loaded.path)
        res = perplexity_details(loaded.model, loaded.tokenizer, text, entry.seqlen,
                                 entry.max_tokens, cfg.eval.batch_size, progress=False)  # fmt: skip
        forward_s += res.forward_s
        source, version = resolved.sources[f"ppl:{entry.name}"]
        bad = res.nonfinite or not math.isfinite(res.nll)
        for metric, value in (("ppl", res.ppl), ("nll", res.nll)):
            row = dict(task=entry.name, metric=metric, value=value, n_samples=res.n_tokens,
                       data_source=source, task_version=version)  # fmt: skip
            what = (f"perplexity {entry.name}: {res.nonfinite} of {res.n_windows} windows have "
                    "a NaN/inf loss")  # fmt: skip
            rows.append(_nonfinite_row(row, what) if bad else row)
    return rows, forward_s


def _zeroshot_rows(cfg: DictConfig, loaded: LoadedModel, resolved: Resolved) -> tuple[list, float]:
    from harness.evaluate import evaluate_zeroshot, mean_accuracy

    ev, rows = cfg.eval, []
    zs = evaluate_zeroshot(
        loaded.model, loaded.tokenizer, list(ev.tasks), data_root=cfg.data_root,
        model_dir=loaded.path, limit=eval_limit(ev.limit), batch_size=ev.batch_size,
        num_fewshot=ev.num_fewshot, bootstrap_iters=ev.bootstrap_iters, seed=cfg.seed,
    )  # fmt: skip
    for name, tr in zs.tasks.items():
        source, version = resolved.sources[name]
        for metric, value in tr.values.items():
            row = dict(task=name, metric=metric, value=value, stderr=tr.stderr[metric],
                       n_samples=tr.n, per_sample=tr.per_sample[metric], data_source=source,
                       task_version=version)  # fmt: skip
            what = (
                f"task {name}: {tr.nonfinite} of the log-likelihoods of {tr.n} examples are NaN/inf"
            )
            rows.append(_nonfinite_row(row, what) if tr.nonfinite else row)
    if ev.mean_of:
        mean, stderr, n = mean_accuracy(zs.tasks, list(ev.mean_of))
        row = dict(task=MEAN_ZEROSHOT_TASK, metric="acc", value=mean, stderr=stderr, n_samples=n,
                   data_source=" + ".join(resolved.sources[t][0] for t in ev.mean_of))  # fmt: skip
        bad = [t for t in ev.mean_of if zs.tasks[t].nonfinite]
        rows.append(
            _nonfinite_row(row, f"{MEAN_ZEROSHOT_TASK}: tasks {bad} are non-finite") if bad else row
        )
    return rows, zs.forward_s


def _evaluate(cfg: DictConfig, loaded: LoadedModel, resolved: Resolved) -> tuple[list, float]:
    """Measurement rows (task, metric, value, status, ...) and seconds in forward passes.

    Every task is evaluated even when an earlier one is non-finite, so a broken model gets a
    failed row for each task (with the count of non-finite values), never a plausible score.
    """
    rows, forward_s = _perplexity_rows(cfg, loaded, resolved)
    if cfg.eval.tasks:
        zs_rows, zs_s = _zeroshot_rows(cfg, loaded, resolved)
        rows, forward_s = rows + zs_rows, forward_s + zs_s
    return rows, forward_s


def base_fields(cfg: DictConfig, resolved: Resolved, with_config: bool = True) -> dict[str, Any]:
    """Identity, configuration, numerics and provenance fields shared by every row of a cell.

    ``with_config=False`` leaves out the config YAML (always a storable string, and the
    slowest field to build): validation builds a trial record of every cell of a sweep.
    """
    baseline = cfg.bits == BASELINE_BITS
    settings = None if baseline else settings_dict(method_settings(cfg))
    method = "none" if baseline else str(cfg.method.name)
    return dict(
        sweep=str(cfg.sweep), cell_id=cell_id(cfg, resolved), model=str(cfg.model),
        model_family=cfg.get("model_family") or guess_family(str(cfg.model)),
        method=method, dtype="none" if baseline else str(cfg.dtype.name),
        dtype_family="none" if baseline else str(cfg.dtype.family),
        dtype_overrides="{}" if baseline else json.dumps(dtype_overrides(cfg), sort_keys=True),
        bits=cfg.bits, block_size=None if baseline else cfg.block_size,
        scale_format=str(cfg.scale_format), centering=bool(cfg.centering),
        method_settings=json.dumps(settings or {}, sort_keys=True),
        outlier_fraction=float((settings or {}).get("outlier_fraction", 0.0)),
        device_class=resolved.device_class, compute_dtype=resolved.compute_dtype,
        data_digest=resolved.data_digest, trust_remote_code=bool(cfg.trust_remote_code),
        seed=cfg.seed, config=OmegaConf.to_yaml(cfg, resolve=True) if with_config else "",
        **provenance_fields(),
    )  # fmt: skip


def run_cell(
    cfg: DictConfig, model_cache: ModelCache | None = None, resolved: Resolved | None = None
) -> list[Record]:
    """Validate, load (or reuse), quantize, evaluate one cell; one Record per (task, metric).

    Raises on failure; the weights are restored to pristine whatever happens, so a cached
    model is clean for the next cell.
    """
    from harness.quantize import restore_model

    start = time.perf_counter()
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
                      load_s=0.0 if reused else loaded.load_s)  # fmt: skip
        fields["model_family"] = cfg.get("model_family") or guess_family(
            str(cfg.model), loaded.architecture
        )
        fields.update(_quantize(cfg, loaded, _calibration(cfg, loaded)))
        eval_start = time.perf_counter()
        rows, forward_s = _evaluate(cfg, loaded, resolved)
        fields.update(eval_s=time.perf_counter() - eval_start, forward_s=forward_s)
    finally:
        restore_model(loaded.model)
        if model_cache is None:
            cache.clear()
    fields["wall_s"] = time.perf_counter() - start
    return [Record(**fields, **row) for row in rows]


def failed_record(cfg: DictConfig, exc: BaseException, wall_s: float, resolved: Resolved) -> Record:
    """The single row a cell writes when it fails after validation."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
    return Record(**base_fields(cfg, resolved), status=STATUS_FAILED,
                  error=f"{type(exc).__name__}: {exc}\n{tb}", wall_s=wall_s)  # fmt: skip


def cell_outcome(records: list[Record]) -> str:
    """``failed`` when any row failed (a half-trustworthy cell is not ok), else ``ok``."""
    return STATUS_FAILED if any(r.status != STATUS_OK for r in records) else STATUS_OK


# ----------------------------------------------------------------------------- entry point
_MODEL_CACHE = ModelCache()  # one per process: in-process multirun cells share the model
_OUTCOMES: list[str] = []  # statuses of the cells this process ran (the single-run exit code)


def run_and_record(cfg: DictConfig, model_cache: ModelCache | None = None) -> str:
    """Skip a finished cell, else run it and write its file; returns the cell's status.

    A cell that cannot run raises :class:`ConfigError` and writes nothing.
    """
    resolved = validate_cell(cfg)
    cid = cell_id(cfg, resolved)
    path = cell_path(cfg.results_dir, cfg.sweep, cid)
    if cell_status(path) == STATUS_OK:
        log.info("cell %s already done (%s); skipping", cid, path)
        return "skipped"
    start = time.perf_counter()
    try:
        records = run_cell(cfg, model_cache, resolved)
    except Exception as exc:  # after validation: record the failure, let the sweep go on
        log.error("cell %s failed: %s", cid, exc, exc_info=True)
        records = [failed_record(cfg, exc, time.perf_counter() - start, resolved)]
    write_cell(records, path, OmegaConf.to_yaml(cfg, resolve=True))
    status = cell_outcome(records)
    errors = sorted({(r.error or "").splitlines()[0] for r in records if r.status != STATUS_OK})
    if errors:
        log.error("cell %s failed: %s", cid, "; ".join(errors))
    log.info("cell %s: %s -> %s", cid, status, path)
    return status


def _hydra_task(cfg: DictConfig) -> None:
    _OUTCOMES.append(run_and_record(cfg, _MODEL_CACHE))


def main() -> None:
    """``kbit-run``: register the schemas, let Hydra compose and run the cell(s), exit truthfully.

    Exit status: 0 every cell ok (or already done); 1 a cell failed (a multirun runs the rest
    first); 2 the input was refused before any work (one line on stderr).
    """
    import hydra

    bad = target_overrides(sys.argv[1:])
    if bad:
        sys.stderr.write(f"kbit-run: {bad[0]!r}: overriding a _target_ (an import path Hydra "
                         "would call) is not allowed on the command line; allowed: the "
                         "config fields of conf/config.yaml and the launcher settings\n")  # fmt: skip
        sys.exit(EXIT_REFUSED)
    register_schema()
    conf = Path(__file__).resolve().parents[1] / "conf"  # absolute: relative means a package
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
    if STATUS_FAILED in _OUTCOMES:
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
