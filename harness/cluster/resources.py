"""What one scheduler job asks for (GPUs, host memory, CPUs, time), sized from its model.

Why: a paper-scale sweep runs models from 70M to 176B parameters, one model per job
(harness.cluster.packing). One ``mem_gb`` and one ``gpus_per_node`` for all of them either
wastes a node on pythia-70m or cannot hold bloom. The size comes from the parameter count,
read from config.json (or the safetensors headers) without loading a weight, so a login node
without a GPU can plan the whole sweep.

The rule (:func:`resources_for`), per job, with ``W`` = parameters x bytes of the compute
dtype, in GB of 2**30 bytes (the unit of nvidia-smi and of Slurm's ``--mem=..G``):

==============  =============================================================================
gpus            ceil(W x headroom / gpu_memory_gb), at least 1 (0 with ``device: cpu``)
mem_gb          max(min_mem_gb, ceil(W x host_memory_factor)); with ``device: cpu`` the model
                itself lives in host memory too: W x (headroom + host_memory_factor)
cpus            cpus_per_gpu x gpus (a CPU job gets one GPU's worth: cpus_per_gpu)
timeout_min     ceil(job_minutes x timeout_factor + startup_min + W / load_gb_per_min),
                clamped to [min_timeout_min, max_timeout_min]; max_timeout_min when the
                job's duration is not known
==============  =============================================================================

then a size class (``classes``: the first whose ``max_params`` >= the count), then a per-model
override (``models``: the spec itself, else the first matching fnmatch glob) replace any of
the four. A model the rule cannot fit on one node (more GPUs than ``gpus_per_node``) is an
error naming the model, its size, what it needs and the limit, unless an override sets its
``gpus`` explicitly: that is the user's decision (e.g. a smaller eval batch), logged.

Why one module: the settings schema (:class:`ResourceConf`), the rule that reads it and the
checks of its values are one contract that changes together (a new setting is a field, its
range and its use), and the model's size is read only for this rule; split, each part would
repeat the others' field names.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from harness.names import unknown_name

log = logging.getLogger(__name__)

CONF_PATH = "hydra.sweeper.resources"  # where the sweep sets ResourceConf; named in errors
GIB = 2**30
DEVICES = ("cuda", "cpu")
OVERRIDE_KEYS = ("gpus", "mem_gb", "cpus", "timeout_min")  # what a class or a model may set
CLASS_KEYS = ("max_params", *OVERRIDE_KEYS)
_SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


@dataclass
class ResourceConf:
    """``hydra.sweeper.resources``: the cluster's GPUs and the sizing rule's knobs."""

    gpu_memory_gb: float = 80.0  # memory of one GPU of the partition, GB (2**30 bytes)
    gpus_per_node: int = 8  # the most GPUs one job can get (the harness runs on one node)
    # GPU memory over the weights in the compute dtype: activations, eval batches (lm-eval's
    # log-likelihood batches, the perplexity window), quantization scratch, CUDA context.
    headroom: float = 1.3
    # Host RAM over the weights: the pristine copy of every quantized weight is kept on the
    # CPU to restore the model after each cell (~1x), plus shards passing through on load.
    host_memory_factor: float = 1.5
    min_mem_gb: int = 16  # Python, torch, lm-eval, tokenizer and datasets, whatever the model
    cpus_per_gpu: int = 8  # data loading, tokenization, lm-eval bookkeeping
    min_timeout_min: int = 30  # a job never asks for less (startup, slow file systems)
    max_timeout_min: int = (
        2880  # the partition's MaxTime; also the limit of a job of unknown length
    )
    timeout_factor: float = 1.5  # margin over the job's expected minutes (estimates are rough)
    startup_min: float = 5.0  # Python + torch + lm-eval imports, dataset loading
    load_gb_per_min: float = 30.0  # weights read from a shared file system (~0.5 GB/s)
    # Size classes, e.g. [{max_params: 1.5e9, gpus: 1, mem_gb: 32}, {max_params: 2e10, gpus: 2}]:
    # the first whose max_params >= the model's count applies; an omitted field keeps the rule's
    # value. max_params may also be written 1.5B / 70M / 2T.
    classes: list[Any] = field(default_factory=list)
    # Per model spec or fnmatch glob, e.g. {"facebook/opt-66b": {gpus: 2}, "bigscience/*": {...}};
    # wins over the classes. An exact spec wins over globs; among globs, the first listed.
    models: dict[str, Any] = field(default_factory=dict)
    device: str = "cuda"  # cuda | cpu: "cpu" asks for no GPU, the model lives in host memory
    # GPU type as Slurm names it (sinfo -o "%G": gpu:a100:4 -> a100): each job then asks for
    # --gpus-per-node=a100:N; null asks for N GPUs of any type (hydra.launcher.constraint can
    # still pick nodes by feature)
    gpu_type: str | None = None


@dataclass(frozen=True)
class Resources:
    """What one job asks the scheduler for."""

    gpus: int
    mem_gb: int
    cpus: int
    timeout_min: int
    gpu_type: str | None = None  # ResourceConf.gpu_type: --gpus-per-node=TYPE:N

    def launcher_params(self) -> dict[str, Any]:
        """hydra-submitit-launcher ``SlurmQueueConf`` fields; 0 GPUs -> ``gpus_per_node: None``.

        None, not 0: submitit then writes no ``--gpus-per-node`` line, and harness.sweep.plan's
        ``launch_target`` reads the job as a CPU job. With a ``gpu_type`` the count is
        Slurm's typed form, ``a100:2``.
        """
        gpus: int | str | None = self.gpus or None
        if gpus and self.gpu_type:
            gpus = f"{self.gpu_type}:{self.gpus}"
        return {
            "gpus_per_node": gpus,
            "mem_gb": self.mem_gb,
            "cpus_per_task": self.cpus,
            "timeout_min": self.timeout_min,
        }

    def label(self) -> str:
        """One short line for plans and logs, e.g. ``2 GPU, 120 GB, 16 CPU, 4h00``."""
        hours, minutes = divmod(self.timeout_min, 60)
        return f"{self.gpus} GPU, {self.mem_gb} GB, {self.cpus} CPU, {hours}h{minutes:02d}"


# ----------------------------------------------------------------------------- param counts
# json of config.json (sorted keys) -> parameter count. A sweep plans ~20,000 cells over a
# few dozen models; building even a meta model per cell would add up.
_COUNT_CACHE: dict[str, int] = {}


def _count_meta(build: Any) -> int:
    """Parameters of the model ``build()`` makes on the meta device, each shared tensor once.

    ``torch.device("meta")``, not ``accelerate.init_empty_weights``: with transformers 5 the
    latter re-creates the tied output head as a new meta tensor, so a tied model would count
    its embedding twice (bloom: +3.6B).
    """
    import torch

    from harness.models.loading import count_params

    with torch.device("meta"):
        model = build()
    return count_params(model)[0]


def _known_causal_lm(model_type: str, trust_remote_code: bool) -> None:
    """Refuse a model_type transformers has no code for: its code ships with the model."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type in CONFIG_MAPPING_NAMES:
        return
    if trust_remote_code:
        hint = (
            "counting it runs the model's own code, which needs its folder: "
            "model_param_count(<folder or hub id>, trust_remote_code=True)"
        )
    else:
        hint = "a model whose code ships with it needs trust_remote_code=true (runs that code)"
    err = unknown_name(
        "config.json model_type", model_type, CONFIG_MAPPING_NAMES, "known to transformers"
    )
    raise ValueError(f"{err}; {hint}")


def config_param_count(config: dict, trust_remote_code: bool = False) -> int:
    """Exact parameter count of the causal LM a config.json describes, without any weights.

    Builds transformers' own class for ``model_type`` on the meta device (no memory; bloom-176B
    takes ~0.05 s, plus a one-time ~2-4 s per process to import transformers' modeling code)
    and counts unique parameters, tied weights once: the count the loaded model would report.
    Never runs code
    shipped with a model: ``auto_map`` is ignored, an unknown ``model_type`` is refused
    (``trust_remote_code`` only changes what the error suggests). Cached per config content.
    """
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise ValueError(
            "config.json has no model_type; allowed: a config.json written by save_pretrained"
        )
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _COUNT_CACHE:
        _COUNT_CACHE[key] = _count_config(config, trust_remote_code)
    return _COUNT_CACHE[key]


def _count_config(config: dict, trust_remote_code: bool) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config["model_type"]
    _known_causal_lm(model_type, trust_remote_code)
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "auto_map")}
    started = time.perf_counter()
    hf_config = AutoConfig.for_model(model_type, **kwargs)
    try:
        n = _count_meta(lambda: AutoModelForCausalLM.from_config(hf_config))
    except ValueError as exc:  # e.g. an encoder-only or seq2seq model_type
        first = str(exc).strip().splitlines()[0][:200]
        raise ValueError(
            f"config.json model_type={model_type!r} has no causal-LM class in transformers "
            f"({first}); allowed: a decoder-only language model"
        ) from None
    log.debug(
        "%s: %d parameters from config.json in %.2fs", model_type, n, time.perf_counter() - started
    )
    return n


def _remote_code_count(source: str, config: dict) -> int:
    """Count a model whose code ships with it, by running that code (the user trusted it).

    Cached per (folder or hub id, config.json content), like :func:`config_param_count`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    key = json.dumps([source, config], sort_keys=True, default=str)
    if key not in _COUNT_CACHE:
        hf_config = AutoConfig.from_pretrained(source, trust_remote_code=True)
        build = lambda: AutoModelForCausalLM.from_config(hf_config, trust_remote_code=True)  # noqa: E731
        _COUNT_CACHE[key] = _count_meta(build)
    return _COUNT_CACHE[key]


def model_param_count(
    spec: str, zoo_dir: str | Path | None = None, trust_remote_code: bool = False
) -> int:
    """Parameters of a model spec (folder, hub id or ``zoo:``), without loading weights.

    The safetensors headers' element count when :func:`harness.models.files.inspect_model`
    read them (local folders), else the count of the architecture config.json describes.
    Refuses what inspect_model refuses (code-shipping models without ``trust_remote_code``,
    broken folders, an uncached hub id offline) with its one-line error.
    """
    from harness.models.files import inspect_model, read_model_config, resolve_model_path

    info = inspect_model(spec, zoo_dir, trust_remote_code)
    if info.n_params:
        return info.n_params
    config = read_model_config(spec, zoo_dir)
    if info.needs_remote_code:  # only reached with trust_remote_code: inspect_model refuses
        path = resolve_model_path(spec, zoo_dir)
        return _remote_code_count(str(path) if path is not None else spec, config)
    return config_param_count(config, trust_remote_code)


# ----------------------------------------------------------------------------- the rule
def dtype_bytes(compute_dtype: str) -> int:
    """Bytes per parameter of a resolved compute dtype (``auto`` must be resolved first)."""
    from harness.numerics import TORCH_DTYPES

    if compute_dtype not in TORCH_DTYPES:
        err = unknown_name("compute_dtype", compute_dtype, TORCH_DTYPES)
        raise ValueError(f"{err} (resolve auto with harness.numerics.resolve_numerics first)")
    return TORCH_DTYPES[compute_dtype].itemsize


def _ceil(x: float) -> int:
    """ceil that does not turn 2.0000000001 (float noise) into 3."""
    return math.ceil(x - 1e-9)


def _rule(n_params: int, weights_gb: float, conf: Any, job_minutes: float | None) -> dict:
    """The four values before classes and overrides (see the module docstring)."""
    on_gpu = conf.device != "cpu"
    gpus = max(1, _ceil(weights_gb * conf.headroom / conf.gpu_memory_gb)) if on_gpu else 0
    host_factor = conf.host_memory_factor + (0.0 if on_gpu else conf.headroom)
    mem_gb = max(int(conf.min_mem_gb), _ceil(weights_gb * host_factor))
    if job_minutes is None:
        timeout = int(conf.max_timeout_min)
    else:
        load = conf.startup_min + weights_gb / conf.load_gb_per_min
        wanted = _ceil(job_minutes * conf.timeout_factor + load)
        if wanted > conf.max_timeout_min:
            log.warning(
                "a job of %d parameters needs ~%d min, more than max_timeout_min=%d: it will be "
                "requeued at its limit; smaller jobs (hydra.sweeper.jobs.minutes_per_job) avoid it",
                n_params, wanted, conf.max_timeout_min,
            )  # fmt: skip
        timeout = min(max(wanted, int(conf.min_timeout_min)), int(conf.max_timeout_min))
    return {"gpus": gpus, "mem_gb": mem_gb, "timeout_min": timeout}


def parse_params(value: Any, name: str = "max_params") -> float:
    """A parameter count from a number or a string such as ``1.5e9``, ``1.5B``, ``70M``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        text = str(value).strip().upper()
        scale = _SUFFIXES.get(text[-1:], 1.0)
        try:
            number = float(text[:-1] if text[-1:] in _SUFFIXES else text) * scale
        except ValueError:
            number = -1.0
    if not number > 0 or math.isinf(number):
        raise ValueError(
            f"{CONF_PATH}.{name}={value!r}: allowed: a parameter count > 0 (1.5e9, 1.5B, 70M)"
        )
    return number


def _set_fields(entry: Any) -> dict:
    """The override fields an entry sets (a null or omitted field keeps the rule's value)."""
    return {k: v for k, v in dict(entry or {}).items() if k in OVERRIDE_KEYS and v is not None}


def _class_for(n_params: int, classes: Any) -> dict:
    """The fields of the first size class whose max_params >= ``n_params`` ({} if none)."""
    for entry in classes or []:
        if parse_params(entry["max_params"]) >= n_params:
            return _set_fields(entry)
    return {}


def _model_override(model: str, models: Any) -> dict:
    """The override of ``model``: its exact key, else the first fnmatch glob that matches."""
    models = models or {}
    if model in models:
        return _set_fields(models[model])
    for pattern, entry in models.items():
        if fnmatch.fnmatchcase(model, str(pattern)):
            return _set_fields(entry)
    return {}


def resources_for(
    model: str,
    n_params: int,
    compute_dtype: str,
    conf: ResourceConf | Any,
    job_minutes: float | None = None,
) -> Resources:
    """What the job running ``model`` asks for: the rule, then its class, then its override.

    ``compute_dtype`` is the resolved one (float16 | bfloat16 | float32) the weights are
    loaded in; ``job_minutes`` the expected minutes of the job's cells without the model load
    (harness.cluster.packing.PackedJob.minutes), None when unknown. Raises ValueError when the
    rule needs more GPUs than ``gpus_per_node`` and no override sets ``gpus``.
    """
    weights_gb = n_params * dtype_bytes(compute_dtype) / GIB
    rule = _rule(n_params, weights_gb, conf, job_minutes)
    overrides = {**_class_for(n_params, conf.classes), **_model_override(model, conf.models)}
    chosen = {**rule, **overrides}
    gpus = int(chosen["gpus"])
    _check_gpus(
        model, n_params, compute_dtype, weights_gb, rule["gpus"], gpus, "gpus" in overrides, conf
    )
    cpus = chosen.get("cpus", conf.cpus_per_gpu * max(gpus, 1))  # follows an overridden gpus
    gpu_type = getattr(conf, "gpu_type", None)
    return Resources(gpus, int(chosen["mem_gb"]), int(cpus), int(chosen["timeout_min"]), gpu_type)


def _check_gpus(
    model: str,
    n_params: int,
    dtype: str,
    weights_gb: float,
    needed: int,
    gpus: int,
    overridden: bool,
    conf: Any,
) -> None:
    """A job gets at most one node's GPUs; a set ``gpus`` below the rule's need is logged."""
    limit = int(conf.gpus_per_node)
    size = f"model={model!r} ({n_params:,} parameters in {dtype}, {weights_gb:.1f} GB of weights)"
    if gpus > limit:
        set_by = "is set to" if overridden else "needs"
        raise ValueError(
            f"{size} {set_by} {gpus} GPUs of {conf.gpu_memory_gb:g} GB (weights x headroom "
            f"{conf.headroom:g} = {weights_gb * conf.headroom:.1f} GB), more than "
            f"{CONF_PATH}.gpus_per_node={limit}; allowed: at most {limit} GPUs: a 16-bit "
            f"compute_dtype, a larger gpu_memory_gb, or {CONF_PATH}.models[{model!r}].gpus"
        )
    if gpus < needed:
        log.warning(
            "%s: the rule needs %d GPUs, an override sets %d (it may run out of memory)",
            size, needed, gpus,
        )  # fmt: skip


# ----------------------------------------------------------------------------- validation
def _as_dict(conf: Any) -> dict:
    """A ResourceConf, DictConfig or mapping as a plain dict (interpolations resolved)."""
    if is_dataclass(conf) and not isinstance(conf, type):
        return asdict(conf)
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(conf, DictConfig):
            return OmegaConf.to_container(conf, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    if conf is None:
        return {}
    if not isinstance(conf, Mapping):
        raise ValueError(f"{CONF_PATH}={conf!r}: allowed: a mapping of settings")
    return dict(conf)


def _number(name: str, value: Any, *, integer: bool, low: float, strict: bool) -> None:
    """One-line error unless ``value`` is a number (an int if ``integer``) above ``low``."""
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    ok = ok_type and not isinstance(value, bool) and (value > low if strict else value >= low)
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name}={value!r}: allowed: {kind} {'>' if strict else '>='} {low:g}")


_TOP = {  # field -> (integer, lower bound, strict)
    "gpu_memory_gb": (False, 0, True), "gpus_per_node": (True, 1, False),
    "headroom": (False, 1, False), "host_memory_factor": (False, 0, True),
    "min_mem_gb": (True, 1, False), "cpus_per_gpu": (True, 1, False),
    "min_timeout_min": (True, 1, False), "max_timeout_min": (True, 1, False),
    "timeout_factor": (False, 1, False), "startup_min": (False, 0, False),
    "load_gb_per_min": (False, 0, True),
}  # fmt: skip


def _check_override(name: str, entry: Any, allowed: tuple[str, ...], gpus_per_node: int) -> None:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{name}={entry!r}: allowed: a mapping of {list(allowed)}")
    for key, value in entry.items():
        if key not in allowed:
            raise unknown_name(f"{name} key", key, allowed)
        if key == "max_params" or value is None:
            continue
        _number(f"{name}.{key}", value, integer=True, low=0 if key == "gpus" else 1, strict=False)
    if (entry.get("gpus") or 0) > gpus_per_node:
        raise ValueError(
            f"{name}.gpus={entry['gpus']!r}: more than gpus_per_node={gpus_per_node}; "
            f"allowed: 0..{gpus_per_node}"
        )


def _check_classes(classes: Any, gpus_per_node: int) -> None:
    if not isinstance(classes, list | tuple):
        raise ValueError(f"{CONF_PATH}.classes={classes!r}: allowed: a list of size classes")
    bounds: list[float] = []
    for i, entry in enumerate(classes):
        name = f"{CONF_PATH}.classes[{i}]"
        _check_override(name, entry, CLASS_KEYS, gpus_per_node)
        if "max_params" not in entry:
            raise ValueError(f"{name}={entry!r}: no max_params; allowed: {list(CLASS_KEYS)}")
        bound = parse_params(entry["max_params"], f"classes[{i}].max_params")
        if bounds and bound <= max(bounds):
            raise ValueError(
                f"{name}.max_params={entry['max_params']!r} is never used: an earlier class "
                f"covers it (max_params {max(bounds):g}); allowed: classes in increasing max_params"
            )
        bounds.append(bound)


def check_resource_conf(conf: Any) -> None:
    """Refuse a bad ``hydra.sweeper.resources`` with one line: the field, the value, what is allowed.

    Why before planning: a typo in a per-model override (``gpu: 2``) would otherwise be ignored
    silently and the job would run out of memory hours later.
    """
    raw = _as_dict(conf)
    known = [f.name for f in fields(ResourceConf)]
    for key in raw:
        if key not in known:
            raise unknown_name(f"{CONF_PATH} setting", key, known)
    merged = {**asdict(ResourceConf()), **raw}
    for key, (integer, low, strict) in _TOP.items():
        _number(f"{CONF_PATH}.{key}", merged[key], integer=integer, low=low, strict=strict)
    if merged["max_timeout_min"] < merged["min_timeout_min"]:
        raise ValueError(
            f"{CONF_PATH}.max_timeout_min={merged['max_timeout_min']!r}: below min_timeout_min="
            f"{merged['min_timeout_min']!r}; allowed: >= min_timeout_min"
        )
    if merged["device"] not in DEVICES:
        raise unknown_name(f"{CONF_PATH}.device", merged["device"], DEVICES)
    gpu_type = merged.get("gpu_type")
    if gpu_type is not None and not (
        isinstance(gpu_type, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", gpu_type)
    ):
        raise ValueError(
            f"{CONF_PATH}.gpu_type={gpu_type!r}: allowed: null or a GPU type as Slurm names it "
            "(letters, digits, _ . -; e.g. a100, h100)"
        )
    _check_classes(merged["classes"], merged["gpus_per_node"])
    models = merged["models"]
    if not isinstance(models, Mapping):
        raise ValueError(f"{CONF_PATH}.models={models!r}: allowed: a mapping of model spec or glob")
    for spec, entry in models.items():
        name = f"{CONF_PATH}.models[{str(spec)!r}]"
        _check_override(name, entry, OVERRIDE_KEYS, merged["gpus_per_node"])
