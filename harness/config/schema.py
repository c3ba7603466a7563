"""The typed cell config: one schema for everything a grid cell reads, and every rule on it.

Why a schema: a grid of 20,000 cells must refuse a wrong value before anything runs, not in
pyarrow after an hour of evaluation. Hydra checks *types* against these dataclasses when it
composes (``centering=maybe``, ``seed=abc``, ``scale_format=fp17``, an unknown key such as
``blocksize=32`` all fail there); :func:`check_cell` checks *values* and relations right
after composition (single runs: a Hydra callback, before any folder is created; sweeps: the
planner, for every cell before anything is queued). Each rule lives here once, and each
error is one line naming the field, the value and what is allowed.

==========================  ==================================================================
CellConfig                  the top level: model, quantization, run settings (``conf/config.yaml``)
DtypeSpec                   ``dtype`` (``harness.dtypes.spec``; one YAML entry per data type)
EvalConfig                  ``eval`` (``conf/eval/<name>.yaml``): perplexity sets + zero-shot tasks
PerplexitySpec              one entry of ``eval.perplexity``
==========================  ==================================================================
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf, open_dict, read_write

from harness.config.axes import Role, axis, flagged
from harness.dtypes.spec import DtypeSpec
from harness.files import PathError, user_path
from harness.kernels.scale_formats import names as scale_format_names
from harness.names import did_you_mean, plain_name_problem, short_allowed
from harness.records import BASELINE_BITS


class ConfigError(ValueError):
    """A cell config that cannot run: one line naming the field, the value and what is allowed."""


class _Choice(str, Enum):
    """A closed set of strings that behaves as its value everywhere (str, f-strings, JSON)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


# How each block's absmax scale is stored (and counted in total model bits): one member per
# entry of the scale-format registry (harness.kernels.scale_formats), so a format declared
# there is a config value here and ``scale_format=fp17`` still fails when Hydra composes.
ScaleFormat = _Choice(
    "ScaleFormat",
    [(name, name) for name in scale_format_names()],
    module=__name__,
    qualname="ScaleFormat",
)
ScaleFormat.__doc__ = "How each block's absmax scale is stored (harness.kernels.scale_formats)."


class ComputeDtype(_Choice):
    """The dtype the model runs in; ``auto`` is resolved before the cell id is computed."""

    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


@dataclass
class PerplexitySpec:
    """One perplexity set (GPTQ protocol: non-overlapping windows of ``seqlen`` tokens)."""

    name: str = MISSING  # wikitext2 | ptb | a label for `path`
    path: str | None = None  # local file/folder, or model:<relative path>; null = by name
    seqlen: int | None = None  # null = min(model max positions, 2048)
    max_tokens: int | None = None  # null = the whole text


@dataclass
class EvalConfig:
    """What a cell measures: perplexity sets and lm-eval zero-shot tasks."""

    name: str = MISSING  # the conf/eval entry's name
    perplexity: list[PerplexitySpec] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)  # lm-eval task names
    # tasks averaged into the derived zeroshot_mean row (acc): null = every task of eval.tasks
    # (a row whenever a task ran), a list = those tasks, [] = no mean row (mean_tasks)
    mean_of: list[str] | None = None
    # smoke tests only: examples per task and perplexity windows per set (the first ones):
    # N >= 1, or a fraction in (0, 1); null = all. n_samples records what was scored.
    limit: float | None = None
    # whether ``limit`` also caps the perplexity windows (true); false: every window is scored
    # (sweeps whose held-out analyses rest on the whole text limit only their tasks)
    limit_perplexity: bool = True
    batch_size: int = 8  # windows (perplexity) and requests (lm-eval) per forward
    num_fewshot: int = 0
    bootstrap_iters: int = 1000  # lm-eval bootstrap for non-mean metrics


@dataclass
class CellConfig:
    """One grid cell. Field comments are the documentation of ``conf/config.yaml``.

    Each field is declared with its role (:mod:`harness.config.axes`): the cell id, the
    validator's memo keys, the user paths, the fields a format fixes and the record's columns
    are derived from these declarations, so a new axis is one line here.
    """

    # local folder, hub id, or zoo:<family>/<size>
    model: str = field(default=MISSING, metadata=axis(Role.identity, column="model",
                                                      model_input=True))  # fmt: skip
    # k: bits per weight; 16 = the unquantized baseline
    bits: int = field(default=4, metadata=axis(Role.identity, column="bits", format=True))
    # elements per absmax block; null = one scale per tensor
    block_size: int | None = field(default=64, metadata=axis(Role.quantization,
                                                             column="block_size", format=True))  # fmt: skip
    scale_format: ScaleFormat = field(default=ScaleFormat.fp16, metadata=axis(
        Role.quantization, column="scale_format", format=True))  # fmt: skip
    # subtract the block mean before quantizing
    centering: bool = field(default=False, metadata=axis(Role.quantization, column="centering"))
    # conf/method/<name>.yaml: name + the method's own settings
    method: Any = field(default=MISSING, metadata=axis(Role.quantization,
                                                       column=("method", "method_settings")))  # fmt: skip
    # no record column of their own: the record's generic ``axes`` column carries them
    quantize_embeddings: bool = field(default=False, metadata=axis(Role.quantization))
    quantize_head: bool = field(default=False, metadata=axis(Role.quantization))
    dtype: DtypeSpec = field(default_factory=DtypeSpec, metadata=axis(
        Role.quantization, column=("dtype", "dtype_family", "dtype_overrides")))  # fmt: skip
    # hashed as its identity (mean_of, limit scope) with the data sources; recorded per row
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=axis(
        Role.evaluation, column=("data_digest", "task", "metric")))  # fmt: skip
    # a plain name: the store's subfolder
    sweep: str = field(default="adhoc", metadata=axis(Role.run_only, column="sweep"))
    results_dir: str = field(default="results", metadata=axis(Role.run_only, user_path=True))
    # folder laid out like shared/data; null = hub datasets (the id hashes the data sources)
    data_root: str | None = field(default=None, metadata=axis(
        Role.evaluation, column="data_digest", resolved=True, user_path=True))  # fmt: skip
    zoo_dir: str = field(default=MISSING, metadata=axis(Role.run_only, user_path=True,
                                                        model_input=True))  # fmt: skip
    # auto | cpu | cuda | cuda:N | mps (the id hashes the device class)
    device: str = field(default="auto", metadata=axis(
        Role.numerics, column="device_class", resolved=True, model_input=True))  # fmt: skip
    compute_dtype: ComputeDtype = field(default=ComputeDtype.auto, metadata=axis(
        Role.numerics, column="compute_dtype", resolved=True, model_input=True))  # fmt: skip
    # run Python shipped in a model folder (never by default)
    trust_remote_code: bool = field(default=False, metadata=axis(
        Role.numerics, column="trust_remote_code", model_input=True))  # fmt: skip
    seed: int = field(default=0, metadata=axis(Role.identity, column="seed"))
    # family name for plot panels; null = guessed
    model_family: str | None = field(default=None, metadata=axis(Role.run_only,
                                                                 column="model_family"))  # fmt: skip
    # modules that register data types, methods or figures, loaded before composing (every
    # process that runs a cell loads the same list; records name each with its version)
    plugins: list[str] = field(default_factory=list, metadata=axis(Role.run_only,
                                                                   column="plugins"))  # fmt: skip


CELL_FIELDS = tuple(f.name for f in fields(CellConfig))
EVAL_FIELDS = tuple(f.name for f in fields(EvalConfig))
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")  # the device names a cell takes
DEVICES_ALLOWED = "auto, cpu, cuda, cuda:N, mps"


def device_problem(device: str) -> str:
    """Why ``device`` cannot run on *this* host ("" when it can); a well-formed name only.

    Why: ``device=cuda`` on a host without CUDA (or ``cuda:3`` on a two-GPU host, ``mps``
    off Apple silicon) would pass validation and fail once the model is on its way to the
    device; an in-process run is refused first instead. Only for cells that run here: a sweep
    planned for Slurm jobs resolves the device for the jobs' host (:class:`Target`).
    """
    import torch

    kind, _, index = device.partition(":")
    allowed = ["auto", "cpu"]
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_cuda:
        allowed += ["cuda", *(f"cuda:{i}" for i in range(n_cuda))]
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if has_mps:
        allowed.append("mps")
    if kind == "cuda" and not n_cuda:
        problem = "this host has no CUDA device"
    elif kind == "cuda" and index and int(index) >= n_cuda:
        problem = f"this host has {n_cuda} CUDA device(s), cuda:0 to cuda:{n_cuda - 1}"
    elif kind == "mps" and not has_mps:
        problem = "this host has no MPS (Apple GPU) device"
    else:
        return ""
    return f"device={device!r}: {problem}; allowed: {', '.join(allowed)}"


def register_schema() -> None:
    """Store the schemas in Hydra's ConfigStore (``cell_schema``; ``dtype/dtype_schema``;
    ``method/<name>_schema`` for every registered method).

    ``conf/config.yaml`` lists ``cell_schema`` first in its defaults, so Hydra checks every key
    and type against :class:`CellConfig` when it composes. Called by the ``kbit-run`` entry
    point and the tests before composing (nothing is registered at import time).
    """
    from hydra.core.config_store import ConfigStore

    from harness.dtypes import register_configs

    register_configs()
    store = ConfigStore.instance()
    store.store(name="cell_schema", node=CellConfig)
    from harness.quantize.methods import methods

    for name, entry in methods().items():  # conf/method/<name>.yaml lists <name>_schema first
        store.store(group="method", name=f"{name}_schema", node=entry.settings)


# ----------------------------------------------------------------------------- rules
USER_PATH_FIELDS = flagged(CellConfig, "user_path")  # results_dir, data_root, zoo_dir
CELL_BITS = (3, 4, 5, 6, 7, 8)  # k of a quantized cell; 16 (BASELINE_BITS) is the baseline
CELL_BITS_ALLOWED = "3..8, or 16 for the baseline"


def with_user_paths(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``results_dir``, ``data_root`` and ``zoo_dir`` as :func:`user_path`
    reads them (``$VAR`` then ``~`` expanded): the path that is checked is the path written.

    Returns ``cfg`` itself when nothing changes, else a copy (the caller's config is left
    alone). Raises :class:`ConfigError` for an unset variable in a path.
    """
    changes = {}
    for name in USER_PATH_FIELDS:
        value = cfg.get(name)
        if isinstance(value, str) and value.strip():
            try:
                expanded = str(user_path(value, name))
            except PathError as err:
                raise ConfigError(str(err)) from err
            if expanded != value:
                changes[name] = expanded
    if not changes:
        return cfg
    out = copy.deepcopy(cfg)
    with read_write(out), open_dict(out):
        for name, value in changes.items():
            out[name] = value
    return out


def check_bits(bits: Any) -> None:
    """k of a cell: 3..8 bits (the range the product is built and measured for), or 16 for
    the unquantized baseline. The library's codebooks may build other k (data type tests)."""
    if isinstance(bits, bool) or bits not in (*CELL_BITS, BASELINE_BITS):
        raise ConfigError(f"bits={bits!r} is not a cell's k; allowed: {CELL_BITS_ALLOWED}")


def plain_name(field_name: str, value: Any) -> str:
    """A name that is safe as one folder: letters, digits, ``_ . -``; never a path."""
    problem = plain_name_problem(field_name, value)
    if problem is not None:
        raise ConfigError(problem)
    return str(value)


def _int_at_least(name: str, value: Any, minimum: int = 1, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        null = " or null" if nullable else ""
        raise ConfigError(f"{name}={value!r}; allowed: an integer >= {minimum}{null}")


def eval_limit(value: float | None) -> int | float | None:
    """``eval.limit`` as lm-eval takes it: a count as an int, a fraction as a float."""
    return int(value) if value is not None and value >= 1 else value


def mean_tasks(tasks: Any, mean_of: Any) -> list[str]:
    """The tasks of the ``zeroshot_mean`` row: ``mean_of`` as listed, or every one of ``tasks``
    when ``mean_of`` is null (so a cell has a mean whenever a task ran without listing them
    twice); ``[]``: no mean row. The cell id hashes this list (``harness.config.identity``), so
    ``mean_of: null`` and the same tasks listed by hand are one cell."""
    return list(tasks) if mean_of is None else list(mean_of)


def check_limit(value: Any) -> None:
    """``eval.limit``: null, a count N >= 1 (integral), or a fraction in (0, 1) (lm-eval's rule)."""
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and value > 0 and (value < 1 or float(value).is_integer())
    if not ok:
        raise ConfigError(
            f"eval.limit={value!r}; allowed: null (all), an integer count >= 1, "
            "or a fraction 0 < f < 1"
        )


def _check_keys(node: DictConfig, allowed: tuple[str, ...], prefix: str) -> None:
    """Keys added with ``+key=value`` bypass the schema; refuse them here (one short line:
    the closest keys, then a count and where the rest are listed)."""
    where = "conf/eval/<name>.yaml" if prefix == "eval." else "conf/config.yaml"
    for key in node:
        if key not in allowed and key != "hydra":
            raise ConfigError(
                f"{prefix}{key}={repr(node[key])[:40]} is not a setting of the cell; allowed "
                f"keys: {short_allowed(str(key), allowed, where)}{did_you_mean(str(key), allowed)}"
            )


def _check_eval(ev: DictConfig) -> None:
    _check_keys(ev, EVAL_FIELDS, "eval.")
    check_limit(ev.limit)
    _int_at_least("eval.batch_size", ev.batch_size)
    _int_at_least("eval.num_fewshot", ev.num_fewshot, minimum=0)
    _int_at_least("eval.bootstrap_iters", ev.bootstrap_iters, minimum=0)
    for i, entry in enumerate(ev.perplexity):
        if not str(entry.name).strip():
            raise ConfigError(f"eval.perplexity.{i}.name={entry.name!r}; allowed: a non-empty name")
        _int_at_least(f"eval.perplexity.{i}.seqlen", entry.seqlen, 2, nullable=True)
        _int_at_least(f"eval.perplexity.{i}.max_tokens", entry.max_tokens, 2, nullable=True)
    tasks = list(ev.tasks)
    dupes = sorted({t for t in tasks if tasks.count(t) > 1})
    if dupes:
        raise ConfigError(f"eval.tasks={tasks}: {dupes} listed twice; allowed: each task once")
    missing = [t for t in mean_tasks(tasks, ev.mean_of) if t not in tasks]
    if missing:
        raise ConfigError(
            f"eval.mean_of={list(ev.mean_of)}: {missing} not in eval.tasks={tasks}; "
            "allowed: null (every task), a subset of eval.tasks, or [] (no mean)"
        )
    if not tasks and not ev.perplexity:
        raise ConfigError("eval: no perplexity set and no task; allowed: at least one of them")


def method_settings(cfg: DictConfig) -> Any:
    """The cell's method settings as its registered dataclass (its value rules applied)."""
    from harness.quantize.methods import make_settings

    node = OmegaConf.to_container(cfg.method, resolve=True, enum_to_str=True)
    if not isinstance(node, dict) or "name" not in node:
        raise ConfigError(f"method={node!r}; allowed: a method entry, e.g. method=blockwise")
    try:
        return make_settings(str(node["name"]), node)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from exc


def _check_quantization(cfg: DictConfig) -> None:
    """k, the block size, the method's settings, then every cross-field rule of the
    registries (:func:`harness.config.rules.quantization_problem`)."""
    from harness.config.rules import quantization_problem

    check_bits(cfg.bits)  # the product's range first: 3..8 (the library may build other k)
    _int_at_least("block_size", cfg.block_size, nullable=True)
    problem = quantization_problem(cfg, method_settings(cfg))
    if problem:
        raise ConfigError(problem)


def check_cell(cfg: DictConfig) -> None:
    """Every value rule of a composed cell config; raises :class:`ConfigError` (one line).

    Cheap (no model or data file is read; the data-type catalogue is read once and cached):
    a quantized cell's cross-field rules are :mod:`harness.config.rules`'. The checks that
    need the model folder or data files live in :func:`harness.run.execute.validate_cell`,
    which calls this first.
    """
    if OmegaConf.is_missing(cfg, "model") or not str(cfg.model).strip():
        raise ConfigError(
            "model is not set; allowed: a local folder, a hub id, or zoo:<family>/<size>"
        )
    _check_keys(cfg, CELL_FIELDS, "")
    plain_name("sweep", cfg.sweep)
    if cfg.model_family is not None:
        plain_name("model_family", cfg.model_family)
    if not str(cfg.results_dir).strip():
        raise ConfigError("results_dir=''; allowed: a folder path")
    if not DEVICE_PATTERN.match(str(cfg.device)):
        raise ConfigError(f"device={cfg.device!r} is unknown; allowed: {DEVICES_ALLOWED}")
    _int_at_least("seed", cfg.seed, minimum=0)
    if cfg.bits != BASELINE_BITS:
        _check_quantization(cfg)
    _check_eval(cfg.eval)
