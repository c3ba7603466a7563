"""One grid cell end to end: load -> quantize -> evaluate -> records (the ``kbit-run`` entry).

``kbit-run model=/path/to/model dtype=quantile bits=4 block_size=64 eval=paper``; ``bits=16``
is the unquantized baseline (recorded with method/dtype/dtype_family ``none``).

Cell identity (:func:`cell_id`): sha256 of the resolved cell config *without* the fields that
cannot change a result (:data:`NON_RESULT_FIELDS`: where results and data live, which device,
the sweep name, the plot label). At ``bits=16`` the quantization fields are dropped too, so
the baseline is one cell however many data types a sweep lists.

Errors: :func:`validate_cell` runs first and is cheap (no model loading); a bad input raises
and nothing is written. A failure after validation (OOM, NaN, an lm-eval exception) writes
ONE ``failed`` record holding the error, and ``main`` returns normally so a multirun goes on
with the other cells. A SIGKILL leaves no record at all (the write is atomic).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import socket
import subprocess
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.evaluate.datasets import resolve_text_path
from harness.evaluate.tasks import LOCAL_TASKS, check_files, unknown_task_error
from harness.evaluate.zeroshot import split_tasks
from harness.models import (
    LoadedModel,
    check_hub_reachable,
    guess_family,
    load_model,
    resolve_model_path,
)
from harness.records import STATUS_FAILED, Record, cell_path, cell_status, write_cell

log = logging.getLogger(__name__)

NON_RESULT_FIELDS = (
    "results_dir",
    "data_root",
    "zoo_dir",
    "device",
    "sweep",
    "model_family",
    "hydra",
)
QUANT_FIELDS = ("dtype", "block_size", "scale_format", "centering", "method", "outlier_fraction",
                "quantize_embeddings", "quantize_head")  # fmt: skip
BASELINE_BITS = 16


# ----------------------------------------------------------------------------- identity
def cell_config(cfg: DictConfig) -> dict[str, Any]:
    """The result-determining part of a cell config, as plain data (see module docstring)."""
    data = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in NON_RESULT_FIELDS:
        data.pop(key, None)
    if data.get("bits") == BASELINE_BITS:
        for key in QUANT_FIELDS:
            data.pop(key, None)
    if data.get("method") != "proxy":
        data.pop("outlier_fraction", None)
    return data


def cell_id(cfg: DictConfig) -> str:
    """Stable 16-hex-digit id of a cell: sha256 of :func:`cell_config` as sorted JSON."""
    text = json.dumps(cell_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- provenance
@functools.lru_cache(maxsize=1)
def _static_provenance() -> dict[str, str]:
    import lm_eval
    import torch
    import transformers

    import harness

    root = Path(harness.__file__).resolve().parents[1]
    commit = ""
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return dict(
        version_harness=harness.__version__, version_torch=torch.__version__,
        version_transformers=transformers.__version__,
        version_lm_eval=getattr(lm_eval, "__version__", ""), git_commit=commit,
        hostname=socket.gethostname(),
    )  # fmt: skip


def provenance_fields() -> dict[str, str]:
    """Versions, git commit, host and creation time (UTC) for a record."""
    return {**_static_provenance(), "created_at": datetime.now(timezone.utc).isoformat()}


def device_name(device: Any) -> str:
    """e.g. ``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@functools.lru_cache(maxsize=1)
def builtin_task_names() -> frozenset[str]:
    """lm-eval's built-in task and group names, from its YAML files (no TaskManager: fast)."""
    import lm_eval.tasks

    names = set()
    pattern = re.compile(r"^(?:task|group):\s*['\"]?([\w.-]+)", re.MULTILINE)
    for path in Path(lm_eval.tasks.__file__).parent.rglob("*.yaml"):
        names.update(pattern.findall(path.read_text(encoding="utf-8", errors="replace")))
    return frozenset(names)


# ----------------------------------------------------------------------------- validation
def dtype_overrides(cfg: DictConfig) -> dict[str, Any]:
    """Fields of ``cfg.dtype`` that differ from its catalogue entry (command-line overrides)."""
    from harness.dtypes import get_spec

    node = OmegaConf.to_container(cfg.dtype, resolve=True, enum_to_str=True)
    spec = get_spec(node["name"])
    out = {}
    for key, value in node.items():
        base = getattr(spec, key, None)
        base = getattr(base, "value", base)
        if key != "name" and value != base:
            out[key] = value
    return out


def _check_quantization(cfg: DictConfig) -> None:
    from harness.dtypes import check
    from harness.quantize.blockwise import SCALE_FORMATS
    from harness.quantize.model import METHODS

    check(cfg.dtype.name, cfg.bits, **dtype_overrides(cfg))
    bs = cfg.block_size
    if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0):
        raise ValueError(
            f"block_size={bs!r}; allowed: a positive int or null (one scale per tensor)"
        )
    if cfg.scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format={cfg.scale_format!r}; allowed: {list(SCALE_FORMATS)}")
    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r} is unknown; allowed: {list(METHODS)}")
    if cfg.method == "proxy" and not 0.0 < cfg.outlier_fraction < 1.0:
        raise ValueError(
            f"outlier_fraction={cfg.outlier_fraction!r}; allowed with method=proxy: 0 < f < 1"
        )


def _check_eval(cfg: DictConfig, model_dir: Any) -> None:
    ev = cfg.eval
    for entry in ev.perplexity:
        resolve_text_path(entry.name, entry.get("path"), cfg.data_root, model_dir)
    tasks = list(ev.tasks)
    local, builtin = split_tasks(tasks, cfg.data_root, model_dir)
    check_files(local, cfg.data_root, model_dir)
    zoo_without_folder = [t for t in builtin if t in LOCAL_TASKS]
    if zoo_without_folder:
        check_files(zoo_without_folder, cfg.data_root, model_dir)  # raises a clear error
    known = builtin_task_names() if builtin else set()
    for name in builtin:
        if name not in known:
            raise unknown_task_error(name, sorted(known | set(LOCAL_TASKS)))
    missing = [t for t in ev.mean_of if t not in tasks]
    if missing:
        raise ValueError(f"eval.mean_of={list(ev.mean_of)}: {missing} not in eval.tasks={tasks}")


def validate_cell(cfg: DictConfig) -> None:
    """Raise a clear ValueError for a cell that cannot run; cheap (no model is loaded)."""
    if OmegaConf.is_missing(cfg, "model") or not str(cfg.model).strip():
        raise ValueError(
            "model is not set; allowed: a local folder, a hub id, or zoo:<family>/<size>"
        )
    model_dir = resolve_model_path(cfg.model, cfg.zoo_dir)
    if model_dir is None:
        check_hub_reachable(cfg.model)
    if cfg.bits != BASELINE_BITS:
        _check_quantization(cfg)
    _check_eval(cfg, model_dir)


# ----------------------------------------------------------------------------- the cell
class ModelCache:
    """Keeps the last loaded model, keyed by (model, device, compute_dtype).

    Consecutive cells of one model (an in-process multirun) reuse it; its weights are
    restored to pristine after every cell. One slot: a sweep orders cells model-major.
    """

    def __init__(self) -> None:
        self.key: tuple[str, str, str] | None = None
        self.loaded: LoadedModel | None = None

    def get(self, cfg: DictConfig) -> tuple[LoadedModel, bool]:
        key = (str(cfg.model), str(cfg.device), str(cfg.compute_dtype))
        if self.key == key and self.loaded is not None:
            return self.loaded, True
        self.clear()
        self.loaded = load_model(
            cfg.model, device=cfg.device, compute_dtype=cfg.compute_dtype, zoo_dir=cfg.zoo_dir
        )
        self.key = key
        return self.loaded, False

    def clear(self) -> None:
        self.key, self.loaded = None, None
        _free_memory()


def _quantize(cfg: DictConfig, loaded: LoadedModel) -> tuple[dict[str, Any], Any]:
    """Quantize in place (or not, at 16 bit); returns (record fields, report)."""
    from harness.models import count_params
    from harness.quantize import quantize_model
    from harness.quantize.model import count_bits

    n_params, n_nonembed = count_params(loaded.model)
    fields: dict[str, Any] = {"n_params": n_params, "n_nonembedding_params": n_nonembed}
    if cfg.bits == BASELINE_BITS:
        fields.update(method="none", dtype="none", dtype_family="none", block_size=None,
                      total_model_bits=float(BASELINE_BITS * n_params), bits_per_param=16.0)  # fmt: skip
        return fields, None
    report = quantize_model(
        loaded.model, cfg.dtype.name, cfg.bits, cfg.block_size,
        scale_format=cfg.scale_format, centering=cfg.centering, method=cfg.method,
        outlier_fraction=cfg.outlier_fraction, quantize_embeddings=cfg.quantize_embeddings,
        quantize_head=cfg.quantize_head, dtype_overrides=dtype_overrides(cfg),
    )  # fmt: skip
    count = count_bits(loaded.model, report)
    fields.update(
        method=cfg.method, dtype=cfg.dtype.name, dtype_family=cfg.dtype.family,
        n_quantized_params=report.n_quantized_params, quantized_modules=report.modules,
        outlier_fraction=report.outlier_fraction, quantize_s=report.quantize_s,
        total_model_bits=float(count.total_bits), bits_per_param=float(count.bits_per_param),
    )  # fmt: skip
    return fields, report


def _evaluate(cfg: DictConfig, loaded: LoadedModel) -> tuple[list[dict[str, Any]], float]:
    """Measurement rows (task, metric, value, ...) and seconds inside forward passes."""
    from harness.evaluate import evaluate_zeroshot, load_text, mean_accuracy, perplexity_details
    from harness.records import MEAN_ZEROSHOT_TASK

    ev, rows, forward_s = cfg.eval, [], 0.0
    for entry in ev.perplexity:
        text = load_text(entry.name, entry.get("path"), cfg.data_root, loaded.path)
        res = perplexity_details(loaded.model, loaded.tokenizer, text, entry.seqlen,
                                 entry.max_tokens, ev.batch_size)  # fmt: skip
        forward_s += res.forward_s
        for metric, value in (("ppl", res.ppl), ("nll", res.nll)):
            rows.append(dict(task=entry.name, metric=metric, value=value, n_samples=res.n_tokens))
    if ev.tasks:
        zs = evaluate_zeroshot(
            loaded.model, loaded.tokenizer, list(ev.tasks), data_root=cfg.data_root,
            model_dir=loaded.path, limit=ev.limit, batch_size=ev.batch_size,
            num_fewshot=ev.num_fewshot, bootstrap_iters=ev.bootstrap_iters, seed=cfg.seed,
        )  # fmt: skip
        forward_s += zs.forward_s
        for name, tr in zs.tasks.items():
            for metric, value in tr.values.items():
                rows.append(dict(task=name, metric=metric, value=value, stderr=tr.stderr[metric],
                                 n_samples=tr.n, per_sample=tr.per_sample[metric]))  # fmt: skip
        if ev.mean_of:
            mean, stderr, n = mean_accuracy(zs.tasks, list(ev.mean_of))
            rows.append(
                dict(task=MEAN_ZEROSHOT_TASK, metric="acc", value=mean, stderr=stderr, n_samples=n)
            )
    return rows, forward_s


def base_fields(cfg: DictConfig) -> dict[str, Any]:
    """Identity, configuration and provenance fields shared by every row of a cell."""
    return dict(
        sweep=cfg.sweep, cell_id=cell_id(cfg), model=str(cfg.model),
        model_family=cfg.get("model_family") or guess_family(str(cfg.model)),
        method=cfg.method, dtype=cfg.dtype.name, dtype_family=cfg.dtype.family, bits=cfg.bits,
        block_size=cfg.block_size, scale_format=cfg.scale_format, centering=cfg.centering,
        outlier_fraction=cfg.outlier_fraction if cfg.method == "proxy" else 0.0, seed=cfg.seed,
        config=OmegaConf.to_yaml(cfg, resolve=True), **provenance_fields(),
    )  # fmt: skip


def run_cell(cfg: DictConfig, model_cache: ModelCache | None = None) -> list[Record]:
    """Validate, load (or reuse), quantize, evaluate one cell; one Record per (task, metric).

    Raises on failure; the weights are restored to pristine whatever happens, so a cached
    model is clean for the next cell.
    """
    from harness.quantize import restore_model

    start = time.perf_counter()
    validate_cell(cfg)
    cache = model_cache or ModelCache()
    loaded, reused = cache.get(cfg)
    try:
        restore_model(loaded.model)
        fields = base_fields(cfg)
        fields.update(architecture=loaded.architecture, device=device_name(loaded.device),
                      load_s=0.0 if reused else loaded.load_s)  # fmt: skip
        fields["model_family"] = cfg.get("model_family") or guess_family(
            str(cfg.model), loaded.architecture
        )
        quant_fields, _ = _quantize(cfg, loaded)
        fields.update(quant_fields)
        eval_start = time.perf_counter()
        rows, forward_s = _evaluate(cfg, loaded)
        fields.update(eval_s=time.perf_counter() - eval_start, forward_s=forward_s)
    finally:
        restore_model(loaded.model)
        if model_cache is None:
            cache.clear()
    fields["wall_s"] = time.perf_counter() - start
    return [Record(**fields, **row) for row in rows]


def failed_record(cfg: DictConfig, exc: BaseException, wall_s: float) -> Record:
    """The single row a cell writes when it fails after validation."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
    fields = base_fields(cfg)
    if cfg.bits == BASELINE_BITS:
        fields.update(method="none", dtype="none", dtype_family="none", block_size=None)
    return Record(**fields, status=STATUS_FAILED, error=f"{type(exc).__name__}: {exc}\n{tb}",
                  wall_s=wall_s)  # fmt: skip


# ----------------------------------------------------------------------------- entry point
_MODEL_CACHE = ModelCache()  # one per process: in-process multirun cells share the model


def run_and_record(cfg: DictConfig, model_cache: ModelCache | None = None) -> str:
    """Skip a finished cell, else run it and write its file; returns the cell's status."""
    path = cell_path(cfg.results_dir, cfg.sweep, cell_id(cfg))
    if cell_status(path) == "ok":
        log.info("cell %s already done (%s); skipping", cell_id(cfg), path)
        return "skipped"
    validate_cell(cfg)  # an input error: raise, write nothing
    start = time.perf_counter()
    try:
        records = run_cell(cfg, model_cache)
    except Exception as exc:  # after validation: record the failure, let the sweep go on
        log.error("cell %s failed: %s", cell_id(cfg), exc, exc_info=True)
        records = [failed_record(cfg, exc, time.perf_counter() - start)]
    write_cell(records, path, OmegaConf.to_yaml(cfg, resolve=True))
    log.info("cell %s: %s -> %s", cell_id(cfg), records[0].status, path)
    return records[0].status


def _hydra_task(cfg: DictConfig) -> None:
    run_and_record(cfg, _MODEL_CACHE)


def main() -> None:
    """``kbit-run``: register the dtype schema, then let Hydra compose and run the cell(s)."""
    import hydra

    from harness.dtypes import register_configs

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"  # absolute: relative means a package
    hydra.main(config_path=str(conf), config_name="config", version_base="1.3")(_hydra_task)()


if __name__ == "__main__":
    main()
