"""Where a model's weights go: one device, or sharded over several GPUs (docs/loading.md).

:func:`plan_placement` is a pure function of a model's config.json, the compute dtype and the
free memory of each GPU (plain numbers, so a CPU-only machine can plan for any GPU node, and
tests use fake GPU sizes). The rule:

- the weights times ``headroom`` (activations, logits, GPTQ's Hessians and calibration
  activations) fit GPU 0: **one device**, exactly as before (``model.to(device)``);
- they do not, and only one GPU is visible: one device anyway (the load may run out of
  memory, as it always did);
- they do not, and several GPUs are visible: **sharded**. Each GPU ``i`` may hold
  ``free_i / headroom`` bytes of weights (``max_memory``); the device map is
  ``accelerate.infer_auto_device_map`` on a meta-device copy of the model built from its
  config (no weights read), with the model's ``_no_split_modules`` (decoder blocks are never
  cut) and balanced over the GPUs as transformers' ``device_map="auto"`` does
  (``accelerate.utils.get_balanced_memory``). Nothing is ever offloaded to the CPU or disk:
  a model that does not fit all GPUs is refused.

The other helpers keep the rest of kbit device-agnostic: :func:`input_device` (where token
ids go: the input embedding's device), :func:`module_device` and :func:`move_to` (GPTQ moves
each decoder layer's inputs to that layer's device), :func:`on_device` (quantization runs
with the weight's GPU as the current CUDA device).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.numerics import TORCH_DTYPES

__all__ = [
    "DEFAULT_HEADROOM",
    "Placement",
    "gpu_free_memory",
    "input_device",
    "map_device_class",
    "meta_model",
    "module_device",
    "move_to",
    "on_device",
    "plan_placement",
    "weight_bytes_per_device",
]

log = logging.getLogger(__name__)

# Bytes of GPU memory per byte of weights: weights + activations, fp32 logits, GPTQ Hessians.
DEFAULT_HEADROOM = 1.25


@dataclass(frozen=True)
class Placement:
    """What :func:`plan_placement` decided, and the numbers it decided from."""

    sharded: bool
    weight_bytes: int  # parameters x compute-dtype bytes (shared tensors once)
    headroom: float
    gpus: tuple[int, ...]  # free bytes per GPU, as given (index = CUDA ordinal)
    reason: str  # one line, for the log
    # sharded only: weight budget per GPU (free / headroom) and module name -> GPU ordinal
    max_memory: dict[int, int] | None = None
    device_map: dict[str, int] | None = None
    # sharded only: planned weight bytes per GPU (every GPU of max_memory, 0 if unused)
    per_device_bytes: dict[int, int] = field(default_factory=dict)

    @property
    def devices(self) -> list[int]:
        """The GPUs that hold weights (sharded), else [0]."""
        if not self.device_map:
            return [0]
        return sorted(set(self.device_map.values()))


def _size(n: float) -> str:
    """Bytes as GiB, or MiB below 1 GiB (plans for tiny test models stay readable)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"compute_dtype={dtype!r}; allowed: {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[dtype]


def _config(config: Any, trust_remote_code: bool):
    """A transformers config from a config object, a dict (with model_type) or a folder."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, Mapping):
        values = dict(config)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    if isinstance(config, str | Path):
        path = Path(config)
        folder = path.parent if path.name == "config.json" else path
        return AutoConfig.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=bool(trust_remote_code)
        )
    raise ValueError(
        f"config: expected a transformers config, a dict or a model folder, got {type(config)}"
    )


def meta_model(config: Any, *, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``config`` with every tensor on the meta device: shapes, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = _config(config, trust_remote_code)
    with init_empty_weights(include_buffers=True):
        return AutoModelForCausalLM.from_config(cfg, trust_remote_code=bool(trust_remote_code))


def _param_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Parameters x the compute dtype's bytes (each shared tensor once; ints keep theirs)."""
    size = dtype.itemsize
    return sum(
        p.numel() * (size if p.is_floating_point() else p.element_size())
        for p in model.parameters()
    )


def weight_bytes_per_device(
    model: nn.Module, device_map: Mapping[str, Any], dtype: torch.dtype
) -> dict[Any, int]:
    """Parameter bytes per device of ``device_map`` (each parameter goes to the longest entry
    that is a prefix of its name; a shared tensor counts once, where it is first named)."""
    keys = sorted(device_map, key=len, reverse=True)
    out: dict[Any, int] = {d: 0 for d in device_map.values()}
    size = dtype.itemsize
    for name, p in model.named_parameters():
        key = next((k for k in keys if k == "" or name == k or name.startswith(k + ".")), None)
        if key is None:
            raise ValueError(f"device_map: parameter {name!r} is under no entry")
        out[device_map[key]] += p.numel() * (size if p.is_floating_point() else p.element_size())
    return out


def _infer_map(
    model: nn.Module, max_memory: dict[int, int], no_split: list[str], dtype: torch.dtype
) -> dict[str, Any]:
    """accelerate's device map, balanced first (as device_map="auto"), else filled in order."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    quiet = logging.getLogger("accelerate.utils.modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "Device i is not available" on a machine planning for another
    try:
        balanced = get_balanced_memory(
            model, max_memory=dict(max_memory), no_split_module_classes=no_split, dtype=dtype
        )
        for budget in (balanced, dict(max_memory)):
            device_map = infer_auto_device_map(
                model, max_memory=dict(budget), no_split_module_classes=no_split, dtype=dtype
            )
            if all(isinstance(d, int) for d in device_map.values()):
                return dict(device_map)
        return dict(device_map)
    finally:
        quiet.setLevel(level)


def plan_placement(
    config: Any,
    compute_dtype: torch.dtype | str,
    gpus: Sequence[int],
    *,
    headroom: float = DEFAULT_HEADROOM,
    n_params: int | None = None,
    trust_remote_code: bool = False,
) -> Placement:
    """One device or sharded over ``gpus`` (free bytes per GPU); see the module docstring.

    ``config``: a transformers config, a dict with ``model_type``, or a model folder.
    ``n_params``: parameter count if known (``ModelInfo.n_params``), so deciding "one device"
    needs no meta model; the sharded plan always builds one. Raises ValueError when the model
    does not fit all GPUs without offloading to the CPU or disk.
    """
    dtype = _torch_dtype(compute_dtype)
    free = tuple(int(g) for g in gpus)
    if not free or any(g < 0 for g in free):
        raise ValueError(f"gpus={list(gpus)!r}: expected the free bytes of at least one GPU")
    if not float(headroom) >= 1.0:
        raise ValueError(f"headroom={headroom!r}; allowed: a number >= 1")
    model = None
    if n_params is None:
        model = meta_model(config, trust_remote_code=trust_remote_code)
        weights = _param_bytes(model, dtype)
    else:
        weights = int(n_params) * dtype.itemsize
    need = weights * headroom
    if need <= free[0]:
        return Placement(False, weights, headroom, free,
                         f"weights {_size(weights)} x headroom {headroom} fit GPU 0 "
                         f"({_size(free[0])} free)")  # fmt: skip
    if len(free) == 1:
        return Placement(False, weights, headroom, free,
                         f"weights {_size(weights)} x headroom {headroom} exceed GPU 0 "
                         f"({_size(free[0])} free), the only GPU: loading on it anyway")  # fmt: skip
    if model is None:
        model = meta_model(config, trust_remote_code=trust_remote_code)
        weights = _param_bytes(model, dtype)
    max_memory = {i: int(g / headroom) for i, g in enumerate(free)}
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = _infer_map(model, max_memory, no_split, dtype)
    offloaded = [name for name, d in device_map.items() if not isinstance(d, int)]
    if offloaded:
        raise ValueError(
            f"model needs {_size(weights)} of {dtype} weights x headroom {headroom}; "
            f"{len(free)} GPUs with {[_size(g) for g in free]} free cannot hold "
            f"them (modules {offloaded[:3]} would go to cpu/disk; kbit never offloads); "
            "allowed: more or larger GPUs, a smaller compute_dtype, or a lower headroom"
        )
    per_device = {i: 0 for i in max_memory}
    per_device.update(weight_bytes_per_device(model, device_map, dtype))
    used = sorted(set(device_map.values()))
    return Placement(
        True, weights, headroom, free,
        f"weights {_size(weights)} x headroom {headroom} exceed GPU 0 "
        f"({_size(free[0])} free): sharded over GPUs {used}",
        max_memory=max_memory, device_map=device_map, per_device_bytes=per_device,
    )  # fmt: skip


def gpu_free_memory() -> list[int]:
    """Free bytes of every visible CUDA GPU (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())]


def map_device_class(device_map: Mapping[str, Any]) -> str:
    """``cuda`` or ``cpu`` (or ``mps``) for an explicit device map; mixed classes are refused
    (a map that puts some modules on the CPU and others on a GPU is CPU offload)."""
    classes = set()
    for d in device_map.values():
        if isinstance(d, int):
            classes.add("cuda")
        else:
            classes.add(torch.device(d).type if d not in ("disk",) else "disk")
    if len(classes) != 1 or classes & {"disk", "meta"}:
        raise ValueError(
            f"device_map devices {sorted({str(d) for d in device_map.values()})}: one device "
            "class is needed; allowed: GPU ordinals / cuda:N only, or cpu only (no offload)"
        )
    return classes.pop()


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the device of the input embeddings (sharded models: the first
    shard), else of the first parameter."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (a decoder block is never split)."""
    return next(module.parameters()).device


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside tuples, lists and dicts on ``device`` (others as is;
    a tensor already there is not copied)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device (a no-op off CUDA), so that anything that uses
    the current device (compiled kernels, cuBLAS handles, new tensors on ``"cuda"``) works on
    the GPU that holds the weight at hand, not on GPU 0."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
