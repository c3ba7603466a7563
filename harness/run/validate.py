"""Refuse a cell that cannot run, before any weight loads: one cell, or every cell of a plan.

:func:`validate_cell` is every check a single ``kbit-run`` makes after Hydra composes (also as
the :class:`ValidateCell` callback, before Hydra creates a folder); :class:`CellValidator` makes
the same checks for the thousands of cells of a sweep plan, each once per distinct input. The
inputs each check reads are derived from the roles the cell schema declares
(:mod:`harness.config.axes`), so a new axis is in the right memo keys without a list to update.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pyarrow as pa
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

import harness.config.schema as cell_schema
from harness.config.axes import Role, flagged, names
from harness.config.identity import (
    LOCAL,
    Resolved,
    Target,
    dtype_overrides,
    identity_data,
    identity_hash,
    model_numerics,
    resolve,
)
from harness.config.overrides import check_format_config
from harness.config.refusals import CellRefused, input_error_line
from harness.config.schema import (
    USER_PATH_FIELDS,
    ConfigError,
    check_bits,
    check_cell,
    eval_limit,
    method_settings,
    with_user_paths,
)
from harness.evaluate.datasets import check_text_file, resolve_text_path
from harness.evaluate.tasks import check_context, check_files, check_task_names
from harness.evaluate.zeroshot import split_tasks
from harness.files import user_path, writable_dir_problem
from harness.provenance import provenance_fields
from harness.records import BASELINE_BITS, SCHEMA, Record, to_table
from harness.run.record import base_fields, cell_fields, quantization_fields


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


# The inputs of each memoised check, from the roles the schema declares (harness.config.axes).
# check_cell: every field (its cross-field rules may read any), except the model, which it reads
# only as "set or not" (26 models of a paper grid share one verdict), and the quantization
# fields at 16 bits (the baseline has none); the quantization check: k and the quantization
# fields; the model's numerics: the fields the model inspection reads.
def _not_read_by_check_cell(baseline: bool) -> frozenset[str]:
    quant = names(cell_schema.CellConfig, Role.quantization) if baseline else ()
    return frozenset({"model", *quant})


def _quant_inputs() -> tuple[str, ...]:
    return ("bits", *names(cell_schema.CellConfig, Role.quantization))


def _numerics_inputs() -> tuple[str, ...]:
    return flagged(cell_schema.CellConfig, "model_input")


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
    check_cell           every top-level field in their order (its cross-field rules may read
                         any), but the model (only "set or not") and, at 16 bits, the
                         quantization fields
    data_root folder     data_root                  results folder    (results_dir, sweep)
    quantization         bits and the schema's quantization fields (not at 16 bits)
    model numerics       the schema's model_input fields (and the target, fixed per validator)
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
        skip = _not_read_by_check_cell(baseline)
        read = tuple((k, v) for k, v in f.items() if k not in skip)
        model = cell.get("model")
        model_set = model is not None and model != MISSING and bool(str(model).strip())
        self._step(("check_cell", model_set, read), lambda: check_cell(cfg()))
        self._step(("data_root", f.get("data_root")), lambda: _check_data_root(cfg()))
        key = ("results_dir", f.get("results_dir"), f.get("sweep"))
        self._step(key, lambda: _check_results_dir(cfg()))
        if not baseline:
            key = ("quantization", *(f.get(k) for k in _quant_inputs()))
            self._step(key, lambda: _check_quantization(cfg()))
        numerics = tuple(f.get(k) for k in _numerics_inputs())
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
