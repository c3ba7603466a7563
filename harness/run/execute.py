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
                cells' table (``harness.sweep.plan.report_outcome``)
exit            0 when the cell is ok (or already done), 1 when it failed or its file could not
                be written (one line, ``cannot write the cell file ...``), 2 when refused.
==============  ===============================================================================

Identity (``harness.config.identity``): the cell id hashes the result-determining config with the
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

import pyarrow as pa
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from harness.config.identity import (
    LOCAL,
    Resolved,
    Target,
    cell_id,
    dtype_overrides,
    identity_data,
    identity_hash,
    model_numerics,
    resolve,
)
from harness.config.overrides import check_format_config, conf_dir
from harness.config.refusals import (
    EXIT_FAILED,
    EXIT_REFUSED,
    CellRefused,
    input_error_line,
    one_line_errors,
    target_overrides,
    target_refusal_line,
)
from harness.config.schema import (
    USER_PATH_FIELDS,
    ConfigError,
    check_bits,
    check_cell,
    eval_limit,
    mean_tasks,
    method_settings,
    register_schema,
    with_user_paths,
)
from harness.evaluate.datasets import check_text_file, resolve_text_path
from harness.evaluate.tasks import check_context, check_files, check_task_names
from harness.evaluate.zeroshot import split_tasks
from harness.files import user_path, writable_dir_problem
from harness.models.loading import LoadedModel, guess_family, load_model
from harness.models.training_tokens import train_tokens
from harness.provenance import device_name, provenance_fields
from harness.quantize.methods import settings_dict
from harness.records import (
    BASELINE_BITS,
    MEAN_ZEROSHOT_TASK,
    SCHEMA,
    STATUS_FAILED,
    STATUS_OK,
    Record,
    cell_path,
    cell_status,
    to_table,
    write_cell,
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

    check_bits(cfg.bits)  # the product's range first: 3..8 (the library may build other k)
    check(cfg.dtype.name, cfg.bits, **dtype_overrides(cfg))
    request = quant_request(cfg)
    entry = get_method(request.settings.name)
    if entry.validate is not None:
        entry.validate(request.settings, request)


def _check_eval(cfg: DictConfig, model_dir: Path | None) -> None:
    ev = cfg.eval
    root = None if cfg.data_root is None else user_path(str(cfg.data_root), "data_root")
    for entry in ev.perplexity:
        path = resolve_text_path(entry.name, entry.get("path"), root, model_dir)
        if path is not None:
            check_text_file(entry.name, path)
    tasks = list(ev.tasks)
    check_task_names(tasks, root, model_dir)
    local, _ = split_tasks(tasks, root, model_dir)
    check_files(local, root, model_dir)
    # a task of the model folder (the zoo's) must fit the model's context, else it is refused
    # here rather than scored cut; a data-root task longer than the context is truncated on
    # the left by lm-eval, as for hub tasks, and summarised once per task (zeroshot.py)
    check_context(local, root, model_dir, eval_limit(ev.limit), roots=("model",))


def _check_data_root(cfg: DictConfig) -> None:
    if cfg.data_root is not None and not user_path(str(cfg.data_root), "data_root").is_dir():
        raise ConfigError(f"data_root={cfg.data_root!r} is not a folder; allowed: a folder "
                          "laid out like shared/data (eval/, corpus/), or null for the hub")  # fmt: skip


def _check_results_dir(cfg: DictConfig) -> None:
    problem = writable_dir_problem(Path(str(cfg.results_dir)) / str(cfg.sweep))
    if problem:
        raise ConfigError(problem)


def _refusal(exc: Exception) -> Exception:
    """What :func:`validate_cell` raises for ``exc`` raised by one of its checks."""
    if isinstance(exc, ConfigError) or not isinstance(exc, ValueError | TypeError | OSError):
        return exc
    err = ConfigError(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
    err.__cause__ = exc  # as `raise ... from exc`
    return err


def validate_cell(cfg: DictConfig, target: Target = LOCAL) -> Resolved:
    """Refuse a cell that cannot run (:class:`ConfigError`, one line); cheap, loads no weights.

    Returns the resolved numerics and data sources (what the cell id is computed from).
    Every check that can fail after hours of work is made here first, including building a
    trial record: a value that cannot be stored fails now, not after the evaluation. The
    user paths are read as :func:`harness.config.schema.with_user_paths` reads them (``~``, ``$VAR``).
    """
    try:
        cfg = with_user_paths(cfg)
        check_cell(cfg)
        _check_data_root(cfg)
        _check_results_dir(cfg)
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


# Top-level fields check_cell does not read (any other, and every unknown key, is its input);
# block_size and method are not read at 16 bits either, and bits only as "16 or not".
_NOT_READ_BY_CHECK_CELL = frozenset({"bits", "dtype", "scale_format", "centering",
                                     "quantize_embeddings", "quantize_head", "data_root",
                                     "zoo_dir", "compute_dtype", "trust_remote_code"})  # fmt: skip
_QUANT_INPUTS = ("dtype", "bits", "block_size", "scale_format", "centering", "method",
                 "quantize_embeddings", "quantize_head")  # fmt: skip
_NUMERICS_INPUTS = ("model", "zoo_dir", "trust_remote_code", "device", "compute_dtype")
_SCALARS = (str, int, float, bool, type(None))


class CellValidator:
    """:func:`validate_cell` for the many cells of one sweep plan, with identical outcomes.

    Why: a grid of 20,000 cells is a few hundred distinct (model, data type, bits, method,
    evaluation) combinations in every check, and each check is a few milliseconds. Each check
    of :func:`validate_cell` runs in the same order on the real config, but its outcome
    (result, or the very refusal it raised) is kept under a key made of exactly the config
    values it reads, so it runs once per distinct key:

    ===================  ========================================================================
    user paths           (results_dir, data_root, zoo_dir): expanded as validate_cell expands them
                         (``with_user_paths``); every later key and check sees the expanded values
    check_cell           every top-level field but those in _NOT_READ_BY_CHECK_CELL (bits: 16 or
                         not; block_size and method: not at 16 bits); keys in their order
    data_root folder     data_root                  results folder    (results_dir, sweep)
    quantization         _QUANT_INPUTS (not at 16 bits)
    model numerics       _NUMERICS_INPUTS (and the target, fixed per validator)
    evaluation data      (eval, data_root, the model folder the numerics step resolved)
    resolve              numerics inputs, eval, data_root, (16 bits or the method)
    trial record         built per cell (:func:`cell_fields`; its method/dtype part keyed by
                         (16 bits or (method, dtype)), the provenance strings taken once per
                         plan); Arrow converts each column on its own, so only values new to
                         their column are converted, and ``to_table`` runs when one fails
    cell id              per cell, from the plain data as given (``identity_data``), as the
                         planner's ``cell_id(cfg, resolved)`` computes it
    ===================  ========================================================================

    One validator per plan: files (model folders, data, the results folder) are read at most
    once per plan, so use a fresh one for each plan; nothing is kept between plans.
    ``cell`` is the cell as plain data, ``OmegaConf.to_container(cfg, resolve=True,
    enum_to_str=True)``; ``make_cfg`` composes the real config, called only when a check runs.
    """

    def __init__(self, target: Target = LOCAL) -> None:
        self.target = target
        self._memo: dict[tuple, tuple[bool, Any]] = {}
        self._frozen: dict[int, tuple[Any, Any]] = {}  # id -> (object kept alive, frozen form)
        self._identity: dict[int, tuple[Resolved, dict, str]] = {}
        self._stored: set[tuple] = set()  # (column, type, value) known to be storable
        # the same strings for every trial row of the plan (a trial row is never written)
        self._provenance = provenance_fields()

    def freeze(self, value: Any) -> Any:
        """A hashable form of plain config data that tells 1, 1.0 and True apart."""
        if isinstance(value, _SCALARS):
            return (type(value), value)
        hit = self._frozen.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        if isinstance(value, dict):
            frozen: Any = ("dict", tuple((k, self.freeze(v)) for k, v in value.items()))
        elif isinstance(value, list | tuple):
            frozen = ("list", tuple(self.freeze(v) for v in value))
        else:
            frozen = ("repr", type(value), repr(value))
        self._frozen[id(value)] = (value, frozen)
        return frozen

    def _step(self, key: tuple, check: Any) -> Any:
        hit = self._memo.get(key)
        if hit is None:
            try:
                hit = (True, check())
            except Exception as exc:  # kept: every cell with this key is refused the same way
                hit = (False, _refusal(exc))
            self._memo[key] = hit
        if not hit[0]:
            raise hit[1].with_traceback(None)
        return hit[1]

    def __call__(self, cell: dict[str, Any], make_cfg: Any) -> tuple[Resolved, str]:
        """(resolved, cell id) of the cell, or what ``validate_cell(make_cfg(), target)``
        raises; the id is ``harness.config.identity.cell_id(cfg, resolved)``."""
        composed: list[DictConfig] = []

        def cfg() -> DictConfig:
            if not composed:  # the user paths as validate_cell reads them (~, $VAR)
                composed.append(with_user_paths(make_cfg()))
            return composed[0]

        given = cell
        paths = tuple((k, self.freeze(cell.get(k))) for k in USER_PATH_FIELDS)
        expanded = self._step(("user_paths", paths),
                              lambda: {k: cfg().get(k) for k in USER_PATH_FIELDS if k in cell})  # fmt: skip
        cell = {**cell, **expanded}
        f = {k: self.freeze(v) for k, v in cell.items()}
        baseline = cell.get("bits") == BASELINE_BITS
        skip = _NOT_READ_BY_CHECK_CELL | ({"block_size", "method"} if baseline else set())
        read = tuple((k, v) for k, v in f.items() if k not in skip)
        self._step(("check_cell", baseline, read), lambda: check_cell(cfg()))
        self._step(("data_root", f.get("data_root")), lambda: _check_data_root(cfg()))
        key = ("results_dir", f.get("results_dir"), f.get("sweep"))
        self._step(key, lambda: _check_results_dir(cfg()))
        if not baseline:
            key = ("quantization", *(f.get(k) for k in _QUANT_INPUTS))
            self._step(key, lambda: _check_quantization(cfg()))
        numerics = tuple(f.get(k) for k in _NUMERICS_INPUTS)
        found = self._step(("numerics", numerics), lambda: model_numerics(cfg(), self.target))
        model_dir = found[2]
        data = (f.get("eval"), f.get("data_root"))
        self._step(("eval", *data, model_dir), lambda: _check_eval(cfg(), model_dir))
        method = None if baseline else f.get("method")
        resolved = self._step(
            ("resolve", numerics, *data, baseline, method), lambda: resolve(cfg(), self.target)
        )
        dtype = None if baseline else f.get("dtype")
        quant = self._step(("quantization_fields", baseline, method, dtype),
                           lambda: quantization_fields(cfg()))  # fmt: skip
        ident = self._identity.get(id(resolved))
        if ident is None or ident[0] is not resolved:
            ident = (resolved, resolved.data_identity(), resolved.data_digest)
            self._identity[id(resolved)] = ident
        cid = identity_hash(identity_data(given, resolved, ident[1]))  # as cell_id(cfg, ...)
        try:
            fields = cell_fields(cell, resolved, cid, quant, ident[2], self._provenance)
            self._trial(Record(**fields))
        except Exception as exc:
            refusal = _refusal(exc)
            if refusal is exc:
                raise
            raise refusal from exc
        return resolved, cid

    def _trial(self, record: Record) -> None:
        """``to_table([record])``: Arrow converts each column on its own, so a row is
        storable when each of its values is; a value new to its column is converted alone,
        and the whole row is converted (raising as ``to_table`` does) when one fails."""
        new = []
        for k, v in vars(record).items():
            item = (k, type(v), v if isinstance(v, _SCALARS) else repr(v))
            if item not in self._stored:
                new.append((item, v))
        if not new:
            return
        try:
            for item, value in new:
                pa.array([value], type=SCHEMA.field(item[0]).type)
        except Exception:
            to_table([record])  # raises what a single cell's validation raises
            return
        self._stored.update(item for item, _ in new)


def _expand_in_place(config: DictConfig) -> None:
    """Write the user paths of Hydra's own config as :func:`with_user_paths` reads them, so
    Hydra's folders (``${results_dir}/.hydra/...``, resolved after the callbacks) are made
    under the expanded path, never a literal ``./~``."""
    expanded = with_user_paths(config)
    if expanded is not config:
        with read_write(config), open_dict(config):
            for name in USER_PATH_FIELDS:
                config[name] = expanded[name]


class ValidateCell(Callback):
    """Hydra callback: a single run's cell is validated before Hydra creates any folder."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            _expand_in_place(config)
            check_format_config(config, config.hydra.runtime.choices.get("format"))
            cell = copy.deepcopy(config)
            with read_write(cell), open_dict(cell):
                cell.pop("hydra", None)
            validate_cell(cell)
        except ConfigError as err:
            raise CellRefused(err) from err
        except OmegaConfBaseException as exc:  # e.g. an interpolation that does not resolve
            raise CellRefused(ConfigError(input_error_line(exc) or str(exc))) from exc

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:  # the sweep folder (hydra.sweep.dir) is made under the expanded results_dir
            _expand_in_place(config)
        except ConfigError as err:
            raise CellRefused(err) from err
        except OmegaConfBaseException as exc:
            raise CellRefused(ConfigError(input_error_line(exc) or str(exc))) from exc


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
        outlier_fraction=report.outlier_fraction, quantize_s=report.quantize_s,
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


def _nonfinite_row(row: dict[str, Any], what: str) -> dict[str, Any]:
    """A measurement that cannot be trusted: failed, its value withheld, the count named."""
    return {**row, "value": None, "stderr": None, "per_sample": None, "status": STATUS_FAILED,
            "error": f"NonFiniteError: {what}"}  # fmt: skip


def perplexity_limit(ev: DictConfig) -> int | float | None:
    """The perplexity windows a cell scores: ``eval.limit`` when ``eval.limit_perplexity``
    (the default), else every window (None)."""
    return eval_limit(ev.limit) if ev.get("limit_perplexity", True) else None


def _perplexity_rows(
    cfg: DictConfig, loaded: LoadedModel, resolved: Resolved
) -> tuple[list, float]:
    from harness.evaluate import load_text, perplexity_details

    rows, forward_s = [], 0.0
    for entry in cfg.eval.perplexity:
        text = load_text(entry.name, entry.get("path"), cfg.data_root, loaded.path)
        # one quiet progress line on stderr (a multirun cell's stderr is its job log file)
        res = perplexity_details(loaded.model, loaded.tokenizer, text, entry.seqlen,
                                 entry.max_tokens, cfg.eval.batch_size, progress=True,
                                 limit=perplexity_limit(cfg.eval),
                                 label=f"perplexity {entry.name}")  # fmt: skip
        forward_s += res.forward_s
        source, version = resolved.sources[f"ppl:{entry.name}"]
        bad = res.nonfinite or not math.isfinite(res.nll)
        for metric, value in (("ppl", res.ppl), ("nll", res.nll)):
            row = dict(task=entry.name, metric=metric, value=value, n_samples=res.n_tokens,
                       data_source=source, task_version=version)  # fmt: skip
            if metric == "nll":  # per-window NLL: paired intervals between cells (records.py)
                row["per_sample"] = res.window_nll
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
    mean_of = mean_tasks(ev.tasks, ev.mean_of)  # null: every task that ran
    if mean_of:
        mean, stderr, n = mean_accuracy(zs.tasks, mean_of)
        row = dict(task=MEAN_ZEROSHOT_TASK, metric="acc", value=mean, stderr=stderr, n_samples=n,
                   data_source=" + ".join(resolved.sources[t][0] for t in mean_of))  # fmt: skip
        bad = [t for t in mean_of if zs.tasks[t].nonfinite]
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
    quant = quantization_fields(cfg)
    fields = cell_fields(cfg, resolved, cell_id(cfg, resolved), quant)
    if with_config:
        fields["config"] = OmegaConf.to_yaml(cfg, resolve=True)
    return fields


def quantization_fields(cfg: DictConfig) -> dict[str, Any]:
    """The record fields a cell's method and data type determine ("none" at 16 bits).

    Reads only ``bits`` (is it the baseline?), ``method`` and ``dtype``.
    """
    if cfg.bits == BASELINE_BITS:
        return dict(method="none", dtype="none", dtype_family="none", dtype_overrides="{}",
                    method_settings="{}", outlier_fraction=0.0)  # fmt: skip
    settings = settings_dict(method_settings(cfg))
    return dict(
        method=str(cfg.method.name), dtype=str(cfg.dtype.name),
        dtype_family=str(cfg.dtype.family),
        dtype_overrides=json.dumps(dtype_overrides(cfg), sort_keys=True),
        method_settings=json.dumps(settings or {}, sort_keys=True),
        outlier_fraction=float((settings or {}).get("outlier_fraction", 0.0)),
    )  # fmt: skip


def cell_fields(
    cell: Any, resolved: Resolved, cid: str, quant: dict[str, Any], data_digest: str | None = None,
    provenance: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """:func:`base_fields` without the config YAML, from the cell id and
    :func:`quantization_fields`. ``cell``: the config, or the same as plain data
    (``OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)``: item access only).
    ``data_digest``, ``provenance``: already computed (else computed here)."""
    baseline = cell["bits"] == BASELINE_BITS
    return dict(
        sweep=str(cell["sweep"]), cell_id=cid, model=str(cell["model"]),
        model_family=cell.get("model_family") or guess_family(str(cell["model"])),
        **quant, bits=cell["bits"], block_size=None if baseline else cell["block_size"],
        scale_format=str(cell["scale_format"]), centering=bool(cell["centering"]),
        device_class=resolved.device_class, compute_dtype=resolved.compute_dtype,
        data_digest=resolved.data_digest if data_digest is None else data_digest,
        trust_remote_code=bool(cell["trust_remote_code"]), seed=cell["seed"], config="",
        **(provenance_fields() if provenance is None else provenance),
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
        register_schema()  # reads $KBIT_DTYPE_DIR (expanded above)
    except (ConfigError, ValueError) as err:
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
