"""Loading Hugging Face causal LMs, and which of their weights are quantizable.

One generic rule selects the quantizable weights of every architecture: each ``nn.Linear``
and GPT-2 style ``Conv1D`` under the decoder-layer list (the ``nn.ModuleList`` holding
``num_hidden_layers`` blocks). That covers GPT-NeoX/Pythia, GPT-2, OPT, BLOOM (fused QKV) and
Llama without a copy of the rule per family; tests check the selected set against a
hand-written list per family. Embeddings and the LM head stay in 16 bit unless asked for.
If no weight is found the model is refused: a cell must never silently quantize nothing.

Per family the one extra piece of knowledge a method needs, proxy quantization's layer pairs,
lives with that method (``harness.quantize.methods.proxy.PROXY_PAIRS``).

Loading is safe by default (docs/loading.md): :func:`load_model` first runs
:func:`harness.models.files.inspect_model`, which checks a model from its config.json and
safetensors headers before any weight is read and refuses a folder that ships Python
(``auto_map``) unless ``trust_remote_code`` is set; transformers never prompts; weights come
from safetensors, or from pickles only through torch's ``weights_only`` loader. Device and
dtype come from :func:`harness.numerics.resolve_numerics`, which needs no GPU, so a login node
computes the same cell identity as the node that runs it. The pre-load and numerics names are
re-exported here, so ``from harness.models.loading import inspect_model`` keeps working.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from harness.models.files import (
    PT_WEIGHTS,
    SAFE_WEIGHTS,
    ModelInfo,
    inspect_model,
    resolve_model_path,
)
from harness.models.placement import (
    DEFAULT_HEADROOM,
    Placement,
    gpu_free_memory,
    input_device,
    map_device_class,
    plan_placement,
)
from harness.numerics import (
    TORCH_DTYPES,
    resolve_compute_dtype,
    resolve_device,
    resolve_numerics,
)

__all__ = [
    "CheckpointMismatch",
    "LoadedModel",
    "ModelInfo",
    "check_loading_info",
    "count_params",
    "decoder_layers",
    "embedding_modules",
    "guess_family",
    "inspect_model",
    "is_conv1d",
    "linear_weight",
    "load_model",
    "quantizable_modules",
    "resolve_compute_dtype",
    "resolve_device",
    "resolve_model_path",
    "resolve_numerics",
]

log = logging.getLogger(__name__)

# Families guessed from a hub id or folder name (first match wins), for plot panels.
_FAMILY_PATTERNS = [
    ("pythia", "pythia"),
    ("gpt-neox", "gpt_neox"),
    ("opt", "opt"),
    ("bloom", "bloom"),
    ("gpt2", "gpt2"),
    ("llama", "llama"),
    ("mistral", "mistral"),
    ("qwen", "qwen"),
]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in ``nn.Linear`` layout (out, in); a transposed view for ``Conv1D``."""
    return module.weight.t() if is_conv1d(module) else module.weight


@dataclass
class LoadedModel:
    """A causal LM ready to quantize and evaluate, and what we know about it."""

    model: nn.Module
    tokenizer: object
    spec: str  # what the user passed
    path: Path | None  # the local folder (None for a hub id)
    architecture: str  # config.model_type
    device: torch.device
    compute_dtype: torch.dtype  # what the weights were loaded in (see resolve_numerics)
    load_s: float = 0.0
    extra: dict = field(default_factory=dict)
    device_class: str = ""  # cpu | cuda | mps; defaults to device.type
    info: ModelInfo | None = None  # the pre-load inspection the load was checked against
    # module name -> device when loaded with a device map (sharded over GPUs, or an explicit
    # map); None for a plain single-device load. ``device`` is then the input embedding's.
    device_map: dict | None = None
    placement: Placement | None = None  # the plan a sharded load followed

    def __post_init__(self) -> None:
        if not self.device_class:
            self.device_class = self.device.type


def guess_family(spec: str, architecture: str = "") -> str:
    """Family name for plot panels: the zoo family, else a pattern of the id/folder name."""
    if spec.startswith("zoo:"):
        return spec[4:].split("/")[0]
    name = Path(spec.rstrip("/")).name.lower() if "/" in spec else spec.lower()
    full = spec.lower()
    for pattern, family in _FAMILY_PATTERNS:
        if pattern in name or pattern in full:
            return family
    return architecture or "unknown"


def _from_pretrained(
    source: str,
    *,
    local: bool,
    use_safetensors: bool | None,
    dtype: torch.dtype,
    trust_remote_code: bool,
    device_map: dict | None = None,
) -> tuple[nn.Module, object]:
    """(model, tokenizer) through transformers with every safety choice spelled out.

    ``trust_remote_code`` is always a bool, never None: None makes transformers prompt
    "[y/N]" on the terminal, and a "y" runs the folder's Python. ``weights_only=True`` keeps
    pickle checkpoints on torch's restricted unpickler (transformers 5's default, pinned here).
    ``device_map`` (module name -> device) places the weights while loading (accelerate).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    common = {"trust_remote_code": bool(trust_remote_code)}
    if local:
        common["local_files_only"] = True
    config = AutoConfig.from_pretrained(source, **common)
    if device_map is not None:
        common["device_map"] = device_map
    model, loading = AutoModelForCausalLM.from_pretrained(
        source, config=config, dtype=dtype, use_safetensors=use_safetensors, weights_only=True,
        output_loading_info=True, **common,
    )  # fmt: skip
    check_loading_info(source, loading)
    common.pop("device_map", None)
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    return model, tokenizer


class CheckpointMismatch(RuntimeError):
    """transformers loaded a model whose weights do not all come from the checkpoint.

    A RuntimeError, not a refusal: it is known only after loading, so the cell is recorded
    ``failed`` (exit 1), never ``ok``.
    """


def check_loading_info(source: str, loading: dict) -> None:
    """Raise :class:`CheckpointMismatch` when transformers reports weights it did not load.

    Why: transformers fills a tensor missing from the checkpoint with a fresh random init
    and only logs "MISSING ... newly initialized"; a cell on such a model would be recorded
    ``ok`` with a wrong number. The pre-load check (:func:`harness.models.weights.weights_problem`)
    refuses this before loading where it can; this is the second line of defence (a model
    whose own Python builds it, or a check skipped for another reason). ``loading``: what
    ``from_pretrained(..., output_loading_info=True)`` returns beside the model.
    """
    missing = sorted(map(str, loading.get("missing_keys") or ()))
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                        for k in loading.get("mismatched_keys") or ())  # fmt: skip
    errors = [str(e).splitlines()[0] for e in loading.get("error_msgs") or () if str(e).strip()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) missing from the checkpoint were filled with "
                        f"random values: {missing[:3]}")  # fmt: skip
    if mismatched:
        problems.append(f"{len(mismatched)} weight(s) have another shape than the model: "
                        f"{mismatched[:3]}")  # fmt: skip
    if errors:
        problems.append(f"loading errors: {errors[:2]}")
    if problems:
        raise CheckpointMismatch(f"model={source!r}: " + "; ".join(problems)
                                 + "; the weights do not match config.json")  # fmt: skip
    unexpected = sorted(map(str, loading.get("unexpected_keys") or ()))
    if unexpected:
        log.warning("model %s: %d checkpoint tensor(s) not used by the model: %s", source,
                    len(unexpected), unexpected[:3])  # fmt: skip


def load_model(
    spec: str,
    *,
    device: str = "auto",
    compute_dtype: str = "auto",
    zoo_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    device_map: dict | None = None,
    gpu_memory: list[int] | None = None,
    headroom: float = DEFAULT_HEADROOM,
) -> LoadedModel:
    """Load a causal LM and its tokenizer; local folders never touch the network.

    The model is inspected first (:func:`inspect_model`, refusing code-shipping folders unless
    ``trust_remote_code``), and the device and dtype come from :func:`resolve_numerics`, so
    what is recorded is what was loaded. Safetensors when present, else torch's weights_only
    loader (docs/loading.md).

    Placement (docs/loading.md, "Models larger than one GPU"): with ``device`` ``auto`` or
    ``cuda`` and more than one GPU visible, :func:`harness.models.placement.plan_placement` decides
    from config.json and each GPU's free memory (``gpu_memory`` overrides it: bytes per GPU,
    e.g. to force sharding in a check); a model whose weights x ``headroom`` do not fit GPU 0
    is loaded sharded with the plan's device map. Otherwise the whole model goes to one
    device, as always. ``device_map``: an explicit placement (module name -> device, all GPUs
    or all ``cpu``; no offload), bypassing the plan.
    """
    start = time.perf_counter()
    info = inspect_model(spec, zoo_dir, trust_remote_code)
    if device_map is not None:
        map_class = map_device_class(device_map)
        if device != "auto" and resolve_device(device).type != map_class:
            raise ValueError(
                f"device={device!r} with a device_map on {map_class!r}; allowed: device=auto "
                f"or a {map_class} device"
            )
        device = map_class if device == "auto" else device
    dev_class, dtype_name = resolve_numerics(device, compute_dtype, info.checkpoint_dtype)
    dev = torch.device(dev_class if device == "auto" else device)
    dtype = TORCH_DTYPES[dtype_name]
    source = str(info.path) if info.path is not None else spec
    placement = None
    if device_map is None and dev_class == "cuda" and device in ("auto", "cuda"):
        placement = _plan(info, source, dtype, gpu_memory, headroom, trust_remote_code)
        device_map = placement.device_map if placement is not None else None
    use_safetensors = {"safetensors": True, "pytorch": False}.get(info.weights)
    where = f"sharded over GPUs {placement.devices}" if placement is not None else dev
    log.info(
        "loading %s on %s in %s (weights: %s)", source, where, dtype_name, info.weights or "hub"
    )
    try:
        model, tokenizer = _from_pretrained(
            source, local=info.path is not None, use_safetensors=use_safetensors, dtype=dtype,
            trust_remote_code=trust_remote_code, device_map=device_map,
        )  # fmt: skip
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"model={spec!r}: a pickle checkpoint ({PT_WEIGHTS}) holds objects that torch's "
            "weights_only loader refuses (unpickling them could run code); allowed: a "
            f"{SAFE_WEIGHTS} copy of the weights, or plain tensors in {PT_WEIGHTS}"
        ) from exc
    if device_map is None:
        model.to(dev).eval()
    else:
        model.eval()
        _check_no_offload(model, spec)
        dev = input_device(model)
        device_map = dict(getattr(model, "hf_device_map", None) or device_map)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        path=info.path,
        architecture=model.config.model_type,
        device=dev,
        compute_dtype=dtype,
        load_s=time.perf_counter() - start,
        device_class=dev_class,
        info=info,
        device_map=device_map,
        placement=placement,
    )


def _plan(
    info: ModelInfo,
    source: str,
    dtype: torch.dtype,
    gpu_memory: list[int] | None,
    headroom: float,
    trust_remote_code: bool,
) -> Placement | None:
    """The sharded plan when more than one GPU is visible (or given) and the model does not
    fit GPU 0; None for a single-device load."""
    gpus = list(gpu_memory) if gpu_memory is not None else gpu_free_memory()
    if len(gpus) < 2:
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        source, trust_remote_code=bool(trust_remote_code), local_files_only=info.path is not None
    )
    plan = plan_placement(
        config, dtype, gpus, headroom=headroom, n_params=info.n_params,
        trust_remote_code=trust_remote_code,
    )  # fmt: skip
    log.info("placement: %s", plan.reason)
    return plan if plan.sharded else None


def _check_no_offload(model: nn.Module, spec: str) -> None:
    """A device-mapped model must hold every weight on a device: kbit never offloads (an
    offloaded weight is a meta tensor, and quantizing it in place would do nothing)."""
    meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(
            f"model={spec!r}: weights {meta[:3]} were offloaded (meta device); kbit quantizes "
            "weights in place and never offloads; allowed: a device map of GPUs only, or cpu"
        )


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-block list: the ModuleList with ``num_hidden_layers`` entries (largest wins)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and len(mod) > 0
        and (n_layers is None or len(mod) == n_layers)
    ]
    if not candidates:
        raise ValueError(
            f"architecture={model.config.model_type!r}: no list of {n_layers} decoder layers found; "
            "supported: models whose blocks live in one nn.ModuleList (GPT-NeoX, GPT-2, OPT, BLOOM, Llama, ...)"
        )
    return max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))


def _tied_to(module: nn.Module, others: list[nn.Module]) -> bool:
    return any(module.weight is o.weight for o in others)


def quantizable_modules(
    model: nn.Module, *, embeddings: bool = False, head: bool = False
) -> dict[str, nn.Module]:
    """Module name -> module whose ``.weight`` is quantized, in model order.

    Every Linear/Conv1D inside the decoder blocks; plus token and position embeddings and the
    LM head when asked. A head tied to the input embedding is one tensor: it is listed once,
    under the embedding's name, and only when embeddings are quantized (quantizing a tied head
    alone would silently quantize the embedding too).
    """
    prefix, _ = decoder_layers(model)
    selected = {
        name: mod
        for name, mod in model.named_modules()
        if name.startswith(prefix + ".") and (isinstance(mod, nn.Linear) or is_conv1d(mod))
    }
    if not selected:
        raise ValueError(
            f"architecture={model.config.model_type!r}: no Linear/Conv1D weights under {prefix!r}; "
            "refusing to run a cell that would quantize nothing"
        )
    extra: dict[str, nn.Module] = {}
    embeds = embedding_modules(model)
    if embeddings:
        extra.update(embeds)
    out = model.get_output_embeddings()
    if head and out is not None and not _tied_to(out, list(embeds.values())):
        extra[_name_of(model, out)] = out
    elif head and out is not None and not embeddings:
        raise ValueError(
            "quantize_head=true: the LM head is tied to the input embedding; "
            "allowed: set quantize_embeddings=true too (they are one tensor)"
        )
    return {**extra, **selected}


def embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Token and position embeddings (every nn.Embedding outside the decoder blocks)."""
    prefix, _ = decoder_layers(model)
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Embedding) and not name.startswith(prefix + ".")
    }


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, mod in model.named_modules() if mod is module)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-embedding parameters), each shared tensor counted once.

    Non-embedding excludes the token/position embeddings (every nn.Embedding outside the
    decoder blocks) and the whole output head, tied or not, bias included: Kaplan et al.'s
    convention, used by records.Record and the zoo. Works on any module with a config; without
    a decoder-block list every nn.Embedding counts as an embedding.
    """
    sizes = {id(p): p.numel() for p in model.parameters()}
    try:
        embeds = list(embedding_modules(model).values())
    except ValueError:  # no decoder-block list: nothing is "inside a block"
        embeds = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    excluded = {id(m.weight) for m in embeds}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is not None:
        excluded.update(id(p) for p in head.parameters())
    total = sum(sizes.values())
    return total, total - sum(sizes[i] for i in excluded if i in sizes)
