"""Cell identity: what makes two cells the same measurement, resolved before any work.

A cell id is the sha256 of the *result-determining* part of a cell config (:func:`cell_config`),
which is the composed config with three kinds of change:

* dropped: fields that cannot change a result (:data:`NON_RESULT_FIELDS`, the ``run_only``
  fields of the schema: where results and the zoo live, the sweep name, the plot label, the
  plugin list), and the quantization fields of the 16-bit baseline (:data:`QUANT_FIELDS`, the
  ``quantization`` role; both derived from :mod:`harness.config.axes`) (so the baseline is one cell however many data types a sweep lists);
* resolved: ``device`` and ``compute_dtype`` become the *device class* and the *dtype the model
  runs in* (``auto`` is fp32 on a CPU and the checkpoint's 16-bit dtype on a GPU, so a CPU cell
  and a GPU cell of the same config are different measurements);
* replaced: ``data_root`` becomes the *source of every evaluation set* (local file + sha256, or
  hub dataset + revision) and the lm-eval task version, so a cell re-run on other data is a new
  cell, never "already done".

A sweep planned on a login node without a GPU resolves the numerics for the machine that will
run the jobs (:class:`Target`), and hands the resolved values to the jobs as overrides, so the
planner and the job compute the same id.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import harness.config.schema as cell_schema
from harness.config.axes import non_result_fields, quantization_fields
from harness.config.rules import dtype_overrides as dtype_overrides  # one rule, re-exported
from harness.config.schema import CellConfig, device_problem, mean_tasks
from harness.records import BASELINE_BITS

# Derived from the roles declared in the cell schema (harness.config.axes): run-only and
# resolved fields (+ "hydra") are dropped; quantization fields are left out of the baseline.
NON_RESULT_FIELDS = non_result_fields(CellConfig)
QUANT_FIELDS = quantization_fields(CellConfig)


@dataclass(frozen=True)
class Target:
    """The machine class a cell will run on; ``None`` fields mean "this machine"."""

    cuda_available: bool | None = None
    bf16_supported: bool | None = None


LOCAL = Target()


@dataclass(frozen=True)
class Resolved:
    """Everything :func:`cell_config` adds to the config: numerics and data provenance."""

    device_class: str
    compute_dtype: str
    model_dir: Path | None
    sources: dict[str, tuple[str, str]]  # eval set name -> (source, version)
    # (source, version) of a method's calibration data; part of the id, not of the data digest
    # (the digest names the *evaluation* data, which the 16-bit baseline shares with the cell)
    calibration: tuple[str, str] | None = None

    def data_identity(self) -> dict[str, list[str]]:
        """Per eval set: [content identity, version]. A local file counts by its sha256, not
        its path, so moving a data folder does not make every cell new."""
        return {name: [content_identity(src), version]
                for name, (src, version) in sorted(self.sources.items())}  # fmt: skip

    @property
    def data_digest(self) -> str:
        """12 hex digits naming the exact evaluation data of a cell (for labels and grouping)."""
        text = json.dumps(self.data_identity(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def content_identity(source: str) -> str:
    """``local:<path>;sha256=<hex>[+local:...]`` -> ``sha256=<hex>[+<hex>]``; others as they are."""
    digests = re.findall(r";sha256=([0-9a-f]{64})", source)
    return "sha256=" + "+".join(digests) if source.startswith("local:") and digests else source


def _numerics(model: str, zoo_dir: str, trust: bool, device: str, compute_dtype: str,
              target: Target) -> tuple[str, str, Path | None]:  # fmt: skip
    from harness.models.loading import inspect_model, resolve_numerics

    info = inspect_model(model, zoo_dir, trust_remote_code=trust)
    device_class, dtype = resolve_numerics(
        device, compute_dtype, info.checkpoint_dtype,
        cuda_available=target.cuda_available, bf16_supported=target.bf16_supported,
    )  # fmt: skip
    return device_class, dtype, info.path


def model_numerics(cfg: DictConfig, target: Target = LOCAL) -> tuple[str, str, Path | None]:
    """(device class, compute dtype, local model folder or None) of a cell, loading no weights.

    Raises a one-line ValueError for a model folder that cannot load (see
    ``harness.models.loading.inspect_model``, which keeps what it read per folder until a file in it
    changes: never stale). A sweep plan asks once per (model, settings) in
    ``harness.run.execute.CellValidator``.

    This is the validation's step (``harness.run.execute.validate_cell``), so with the ``LOCAL``
    target (the cell runs on this host, not in a planned job) a device this host lacks is
    refused too (:func:`device_problem`). :func:`resolve` and :func:`cell_id` skip that
    check: a cell's identity can be computed anywhere.
    """
    found = _numerics(
        str(cfg.model), str(cfg.zoo_dir), bool(cfg.trust_remote_code), str(cfg.device),
        str(cfg.compute_dtype), target,
    )  # fmt: skip
    if target.cuda_available is None:
        problem = device_problem(str(cfg.device))
        if problem:
            raise ValueError(problem)
    return found


def resolve(cfg: DictConfig, target: Target = LOCAL) -> Resolved:
    """Resolve numerics and data sources of a cell (reads config.json and hashes data files,
    both cached per process: a sweep pays once per model and once per file).

    A perplexity text must give at least one window of ``seqlen`` tokens with the model's own
    tokenizer (``harness.evaluate.perplexity.check_windows``, memoised per model and file):
    a data source that cannot produce a measurement is refused here, with the sources.
    """
    from harness.evaluate.datasets import text_source
    from harness.evaluate.perplexity import check_windows
    from harness.evaluate.tasks import task_sources

    device_class, dtype, model_dir = _numerics(
        str(cfg.model), str(cfg.zoo_dir), bool(cfg.trust_remote_code), str(cfg.device),
        str(cfg.compute_dtype), target,
    )  # fmt: skip
    sources: dict[str, tuple[str, str]] = {}
    for entry in cfg.eval.perplexity:
        src = text_source(entry.name, entry.get("path"), cfg.data_root, model_dir)
        sources[f"ppl:{entry.name}"] = (src.source, src.version)
    check_windows(cfg.eval.perplexity, cfg.data_root, model_dir)
    tasks = list(cfg.eval.tasks)
    for name, src in task_sources(tasks, cfg.data_root, model_dir).items() if tasks else ():
        sources[name] = (src.source, src.version)
    calib = calibration_of(cfg)
    calibration = None if calib is None else (calib.source, calib.version)
    return Resolved(device_class, dtype, model_dir, sources, calibration)


def calibration_of(cfg: DictConfig) -> Any:
    """The calibration source of a quantized cell whose method needs data, else None."""
    from harness.config.schema import method_settings
    from harness.evaluate.calibration import calibration_source
    from harness.quantize.methods import get_method

    if cfg.bits == BASELINE_BITS:
        return None
    settings = method_settings(cfg)
    if not get_method(settings.name).needs_calibration:
        return None
    return calibration_source(str(settings.calibration))


def cell_config(cfg: DictConfig, resolved: Resolved | None = None) -> dict[str, Any]:
    """The result-determining part of a cell config, as plain data (see module docstring)."""
    resolved = resolved or resolve(cfg)
    return identity_data(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), resolved)


def identity_data(
    data: dict[str, Any], resolved: Resolved, data_identity: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """:func:`cell_config` of a cell given as plain data (``OmegaConf.to_container(cfg,
    resolve=True, enum_to_str=True)``); ``data`` itself is not changed (only its top level is
    copied). ``data_identity``: ``resolved.data_identity()`` when the caller has it already."""
    data = dict(data)
    schema = cell_schema.CellConfig  # looked up now: the roles as declared when it runs
    for key in non_result_fields(schema):
        data.pop(key, None)
    if isinstance(data.get("eval"), dict):
        data["eval"] = _eval_identity(data["eval"])
    if data.get("bits") == BASELINE_BITS:
        for key in quantization_fields(schema):
            data.pop(key, None)
    if isinstance(data.get("dtype"), dict):  # a table read from a file: its numbers, not its path
        from harness.dtypes.table import identity_node

        data["dtype"] = identity_node(data["dtype"])
    data["numerics"] = {"device_class": resolved.device_class,
                        "compute_dtype": resolved.compute_dtype}  # fmt: skip
    data["data"] = resolved.data_identity() if data_identity is None else data_identity
    if resolved.calibration is not None:
        source, version = resolved.calibration
        data["calibration"] = [content_identity(source), version]
    return data


def _eval_identity(ev: dict[str, Any]) -> dict[str, Any]:
    """The ``eval`` node as the id hashes it (``limit: null`` cells keep their older ids).

    * ``mean_of: null`` (every task) is hashed as the task list it stands for, so it is the
      same cell as the same tasks listed by hand (the shipped eval configs before null).
    * a non-null ``limit`` applies to perplexity windows too (it used to cap only the zero-shot
      examples), so a limited cell with perplexity sets gets a new id (``limit_scope``) instead
      of resuming from values measured on every window. ``limit: null`` cells, and limited
      cells with ``limit_perplexity: false`` (every window scored, as before), are unchanged:
      ``limit_perplexity`` itself is never hashed, only what it changes.
    """
    ev = dict(ev)
    limit_perplexity = ev.pop("limit_perplexity", True)
    if "mean_of" in ev and ev["mean_of"] is None:
        ev["mean_of"] = mean_tasks(ev.get("tasks") or [], None)
    if ev.get("limit") is not None and ev.get("perplexity") and limit_perplexity:
        ev["limit_scope"] = "tasks+perplexity"
    return ev


def identity_hash(identity: dict[str, Any]) -> str:
    """The 16-hex-digit cell id of a :func:`cell_config` (sha256 of it as sorted JSON)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cell_id(cfg: DictConfig, resolved: Resolved | None = None) -> str:
    """Stable 16-hex-digit id of a cell: sha256 of :func:`cell_config` as sorted JSON."""
    return identity_hash(cell_config(cfg, resolved))
