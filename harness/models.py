"""Loading Hugging Face causal LMs, and which of their weights are quantizable.

One generic rule selects the quantizable weights of every architecture: each ``nn.Linear``
and GPT-2 style ``Conv1D`` under the decoder-layer list (the ``nn.ModuleList`` holding
``num_hidden_layers`` blocks). That covers GPT-NeoX/Pythia, GPT-2, OPT, BLOOM (fused QKV) and
Llama without a copy of the rule per family; tests check the selected set against a
hand-written list per family. Embeddings and the LM head stay in 16 bit unless asked for.
If no weight is found the model is refused: a cell must never silently quantize nothing.

Per family we only need one piece of extra knowledge: the layer pairs of proxy quantization
(see :data:`PROXY_PAIRS`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Proxy (outlier-dependent) quantization, per model_type: (sources, target) suffixes inside one
# decoder block. The hidden units of layer i are the *outputs* of the source(s); the matching
# *input* dimensions of layer i + 1 (the target) are kept in 16 bit. We pair the MLP's two
# matrices, where the paper's outlier features live and where output unit j of the first matrix
# feeds exactly input dimension j of the second (after an element-wise activation). Attention
# is left unpaired: with fused QKV and per-head layouts the mapping is not one-to-one.
# Llama's hidden unit j is silu(gate_j) * up_j: both sources are ranked together.
PROXY_PAIRS: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "gpt_neox": [(("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h")],
    "gpt2": [(("mlp.c_fc",), "mlp.c_proj")],
    "opt": [(("fc1",), "fc2")],
    "bloom": [(("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h")],
    "llama": [(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")],
    "mistral": [(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")],
    "qwen2": [(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")],
}

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

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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
    compute_dtype: torch.dtype
    load_s: float = 0.0
    extra: dict = field(default_factory=dict)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> the first GPU if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(
            f"device={device!r} is not a device; allowed: auto, cpu, cuda, cuda:N"
        ) from exc


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_compute_dtype(compute_dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (half matmuls are slow/unsupported there), bf16 on GPUs that
    support it, else fp16."""
    if compute_dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if compute_dtype not in _DTYPES:
        raise ValueError(
            f"compute_dtype={compute_dtype!r} is unknown; allowed: auto, {list(_DTYPES)}"
        )
    return _DTYPES[compute_dtype]


def resolve_model_path(spec: str, zoo_dir: str | Path | None = None) -> Path | None:
    """Local folder of a model spec, or None for a hub id. Raises a clear error otherwise."""
    if spec.startswith("zoo:"):
        from harness.zoo import resolve_model

        return Path(resolve_model(spec[4:], zoo_dir))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model={spec!r}: folder has no config.json; expected a saved HF model"
            )
        return path
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if looks_like_path or not _HUB_ID.match(spec):
        raise ValueError(
            f"model={spec!r}: no such folder, and not a hub id; "
            "allowed: a local folder with config.json, a hub id (org/name), or zoo:<family>/<size>"
        )
    return None


def check_hub_reachable(spec: str) -> None:
    """Offline, a hub id must already be in the local HF cache (fail now, not after 45 s)."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "TRUE", "yes"):
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
        raise ValueError(
            f"model={spec!r}: HF_HUB_OFFLINE is set and the hub id is not in the local cache; "
            "allowed: a local folder, zoo:<family>/<size>, or a cached hub id"
        )


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


def load_model(
    spec: str,
    *,
    device: str = "auto",
    compute_dtype: str = "auto",
    zoo_dir: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer; local folders never touch the network."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    path = resolve_model_path(spec, zoo_dir)
    dev = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, dev)
    source = str(path) if path is not None else spec
    kwargs = {"local_files_only": True} if path is not None else {}
    log.info("loading %s on %s in %s", source, dev, dtype)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    model.to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        path=path,
        architecture=model.config.model_type,
        device=dev,
        compute_dtype=dtype,
        load_s=time.perf_counter() - start,
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
    """(all parameters, non-embedding parameters): embeddings and an untied head excluded."""
    total = sum(p.numel() for p in model.parameters())
    embeds = embedding_modules(model)
    excluded = {id(m.weight): m.weight.numel() for m in embeds.values()}
    out = model.get_output_embeddings()
    if out is not None:
        excluded[id(out.weight)] = out.weight.numel()
    return total, total - sum(excluded.values())


def proxy_pairs(model: nn.Module) -> list[tuple[list[str], str]]:
    """(source module names, target module name) per block for proxy quantization."""
    arch = model.config.model_type
    if arch not in PROXY_PAIRS:
        raise ValueError(
            f"method=proxy: architecture={arch!r} has no layer pairing; allowed: {sorted(PROXY_PAIRS)}"
        )
    prefix, layers = decoder_layers(model)
    modules = dict(model.named_modules())
    pairs = []
    for i in range(len(layers)):
        for sources, target in PROXY_PAIRS[arch]:
            names = [f"{prefix}.{i}.{s}" for s in sources]
            tname = f"{prefix}.{i}.{target}"
            missing = [n for n in [*names, tname] if n not in modules]
            if missing:
                raise ValueError(f"method=proxy: modules {missing} not found in {arch!r}")
            pairs.append((names, tname))
    return pairs
