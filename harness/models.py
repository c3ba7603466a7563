"""Loading Hugging Face causal LMs, and which of their weights are quantizable.

One generic rule selects the quantizable weights of every architecture: each ``nn.Linear``
and GPT-2 style ``Conv1D`` under the decoder-layer list (the ``nn.ModuleList`` holding
``num_hidden_layers`` blocks). That covers GPT-NeoX/Pythia, GPT-2, OPT, BLOOM (fused QKV) and
Llama without a copy of the rule per family; tests check the selected set against a
hand-written list per family. Embeddings and the LM head stay in 16 bit unless asked for.
If no weight is found the model is refused: a cell must never silently quantize nothing.

Per family we only need one piece of extra knowledge: the layer pairs of proxy quantization
(see :data:`PROXY_PAIRS`).

Loading is safe by default (docs/loading.md): :func:`inspect_model` checks a model from its
config.json and safetensors headers before any weight is read, and refuses a folder that ships
Python (``auto_map``) unless ``trust_remote_code`` is set; transformers never prompts; weights
come from safetensors, or from pickles only through torch's ``weights_only`` loader. Device and
dtype are resolved by :func:`resolve_numerics` without a GPU, so a login node computes the
same cell identity as the node that runs it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from harness.names import unknown_name

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


@dataclass(frozen=True)
class ModelInfo:
    """What a model is, read cheaply (config.json and safetensors headers, never weights).

    The runner's validation uses it to refuse a bad model before any cell loads weights.
    """

    path: Path | None  # the local folder (None for a hub id)
    architecture: str  # config.json model_type
    checkpoint_dtype: str | None  # float16 | bfloat16 | float32, from config.json (else headers)
    n_params: int | None  # elements stored in the safetensors files; None without headers
    needs_remote_code: bool  # auto_map or a model_type unknown to transformers
    weights: str | None = None  # safetensors | pytorch | None (hub id, not downloaded yet)


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

    def __post_init__(self) -> None:
        if not self.device_class:
            self.device_class = self.device.type


# ----------------------------------------------------------------------------- numerics
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPUTE_DTYPES = ("auto", *_DTYPES)
_HALF = ("float16", "bfloat16")


def device_class(device: str, *, cuda_available: bool | None = None) -> str:
    """``cpu`` | ``cuda`` | ``mps`` for a device string; ``auto`` picks cuda when there is one.

    ``cuda_available`` lets a login node without a GPU compute what a GPU node would do.
    """
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise unknown_name("device", device, DEVICES)
    if device == "auto":
        available = torch.cuda.is_available() if cuda_available is None else cuda_available
        return "cuda" if available else "cpu"
    return device.split(":")[0]


def resolve_numerics(
    device: str,
    compute_dtype: str,
    checkpoint_dtype: str | None,
    *,
    cuda_available: bool | None = None,
    bf16_supported: bool | None = None,
) -> tuple[str, str]:
    """(device class, compute dtype name) a model will be loaded in, without loading it.

    Both enter the cell identity, so they must be computable without a GPU: pass
    ``cuda_available`` / ``bf16_supported`` to answer for the machine the cell will run on.
    ``auto`` compute dtype: float32 off CUDA (half matmuls are slow or missing there); on CUDA
    the checkpoint's own 16-bit dtype (casting fp16 weights to bf16 loses 3 mantissa bits),
    else bfloat16 where supported, else float16.
    """
    dev = device_class(device, cuda_available=cuda_available)
    if compute_dtype not in COMPUTE_DTYPES:
        raise unknown_name("compute_dtype", compute_dtype, COMPUTE_DTYPES)
    if compute_dtype != "auto":
        return dev, compute_dtype
    if dev != "cuda":
        return dev, "float32"
    if checkpoint_dtype in _HALF:
        return dev, checkpoint_dtype
    if bf16_supported is None:  # ask the real GPU only when there is one; else assume a modern one
        bf16_supported = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True
    return dev, "bfloat16" if bf16_supported else "float16"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> the first GPU if there is one, else the CPU; ``cuda:N`` keeps its index."""
    dev = device_class(device)
    return torch.device(dev if device == "auto" else device)


def resolve_compute_dtype(compute_dtype: str, device: torch.device) -> torch.dtype:
    """:func:`resolve_numerics` for a torch device and a checkpoint of unknown dtype."""
    return _DTYPES[resolve_numerics(device.type, compute_dtype, None)[1]]


# ----------------------------------------------------------------------------- locating
def resolve_model_path(spec: str, zoo_dir: str | Path | None = None) -> Path | None:
    """Local folder of a model spec, or None for a hub id. Raises a clear error otherwise."""
    if spec.startswith("zoo:"):
        from harness.zoo import resolve_model

        return Path(resolve_model(spec[4:], zoo_dir))
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"model={spec!r}: {path} is a file, not a folder; expected a saved HF model folder"
            )
        if not any(path.iterdir()):
            raise ValueError(
                f"model={spec!r}: folder {path} is empty (no config.json, weights or tokenizer); "
                "expected a folder written by save_pretrained"
            )
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model={spec!r}: folder {path} has no config.json; expected a saved HF model"
            )
        return path
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if looks_like_path or not _HUB_ID.match(spec):
        raise ValueError(
            f"model={spec!r}: no such folder, and not a hub id; "
            "allowed: a local folder with config.json, a hub id (org/name), or zoo:<family>/<size>"
        )
    return None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "TRUE", "yes")


def check_hub_reachable(spec: str) -> None:
    """Offline, a hub id must already be in the local HF cache (fail now, not after 45 s)."""
    if not _hub_offline():
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


# ----------------------------------------------------------------------------- inspection
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_HEADER_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
# A tokenizer is one of these file sets (fast JSON, sentencepiece, GPT-2 BPE, WordPiece).
_TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",), ("spiece.model",),
                   ("vocab.json", "merges.txt"), ("vocab.txt",))  # fmt: skip


class _Refused(ValueError):
    """A model input that cannot run; the message names the file, the problem and the fix."""


def _read_json_object(file: Path) -> dict:
    """The JSON object in ``file``; anything else is refused with the file named."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Refused(
            f"{file} is not valid JSON ({exc}); expected the file save_pretrained writes"
        ) from None
    if not isinstance(data, dict):
        raise _Refused(
            f"{file} holds a JSON {type(data).__name__}, not an object; expected the file save_pretrained writes"
        )
    return data


def _read_config(file: Path) -> dict:
    """config.json as a dict with a string ``model_type`` (which names the architecture)."""
    config = _read_json_object(file)
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise _Refused(
            f"{file} has no model_type; allowed: a config.json written by save_pretrained, "
            "whose model_type names the architecture (e.g. 'gpt_neox')"
        )
    return config


def _config_dtype(config: dict) -> str | None:
    """float16 | bfloat16 | float32 from ``dtype`` (transformers 5) or ``torch_dtype`` (4.x)."""
    value = config.get("dtype", config.get("torch_dtype"))
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    return name if name in _DTYPES else None


def _safetensors_header(file: Path) -> tuple[int, dict[str, int]]:
    """(elements stored, elements per dtype) from a safetensors header; no tensor data is read.

    Refuses a file whose header does not parse or whose size differs from what the header's
    data offsets say (a truncated copy or download).
    """
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > _MAX_HEADER or 8 + n > size:
            raise _Refused(
                f"{file}: safetensors header does not parse (file is {size} bytes, header length "
                f"field {n}): truncated or not a safetensors file; allowed: a complete copy"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Refused(
            f"{file}: safetensors header is not valid JSON ({exc}); allowed: a complete copy"
        ) from None
    if not isinstance(header, dict):
        raise _Refused(f"{file}: safetensors header is not a JSON object; allowed: a complete copy")
    end, per_dtype = 0, Counter()
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
            numel = math.prod(int(d) for d in entry["shape"])
            per_dtype[str(entry["dtype"])] += numel
            end = max(end, int(stop), int(begin))
        except (TypeError, KeyError, ValueError):
            raise _Refused(
                f"{file}: tensor {name!r} lacks dtype/shape/data_offsets in the safetensors header"
            ) from None
    expected = 8 + n + end
    if size != expected:
        problem = "truncated" if size < expected else "longer than its header says"
        raise _Refused(
            f"{file}: {problem}: the header's data offsets need {expected} bytes, the file has "
            f"{size}; allowed: a complete copy of the checkpoint"
        )
    return sum(per_dtype.values()), dict(per_dtype)


def _index_shards(index: Path) -> tuple[list[Path], list[str]]:
    """(present shard files, missing shard names) that a sharded checkpoint's index names."""
    weight_map = _read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise _Refused(f"{index} has no weight_map; expected the index save_pretrained writes")
    shards = [index.parent / name for name in sorted(set(map(str, weight_map.values())))]
    return [s for s in shards if s.is_file()], [s.name for s in shards if not s.is_file()]


def _refuse_missing_shards(index: Path, missing: list[str]) -> None:
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise _Refused(
            f"{index} names shard files that are missing: {missing[:5]}{more}; "
            "allowed: every shard the index names, next to it"
        )


def _check_weights(folder: Path, *, require: bool) -> tuple[str | None, int | None, str | None]:
    """(format, elements stored, dominant float dtype) of the weights transformers would load.

    Same preference as transformers: model.safetensors, its sharded index, then the pickle
    formats (only ever read by torch's weights_only loader, see :func:`load_model`). With
    ``require`` False (a hub snapshot that downloads weights at load time) absent files pass.
    """
    if (folder / SAFE_WEIGHTS).is_file():
        shards, missing = [folder / SAFE_WEIGHTS], []
    elif (folder / SAFE_INDEX).is_file():
        shards, missing = _index_shards(folder / SAFE_INDEX)
        if require:
            _refuse_missing_shards(folder / SAFE_INDEX, missing)
    elif (folder / PT_INDEX).is_file() or (folder / PT_WEIGHTS).is_file():
        if (folder / PT_INDEX).is_file() and require:
            _refuse_missing_shards(folder / PT_INDEX, _index_shards(folder / PT_INDEX)[1])
        return "pytorch", None, None
    elif require:
        raise _Refused(
            f"{folder} has no weight files; allowed: {SAFE_WEIGHTS}, {SAFE_INDEX} with its "
            f"shards, or {PT_WEIGHTS} (read with torch's weights_only loader)"
        )
    else:
        return None, None, None
    total, counts = 0, Counter()
    for shard in shards:
        n, per_dtype = _safetensors_header(shard)
        total += n
        counts.update(per_dtype)
    floats = [(n, _HEADER_DTYPES[d]) for d, n in counts.items() if d in _HEADER_DTYPES]
    dominant = max(floats)[1] if floats else None
    return "safetensors", None if missing else total, dominant


def _check_tokenizer(folder: Path) -> None:
    """The folder must hold a tokenizer: every cell evaluates text."""
    if (folder / "tokenizer.json").is_file():
        _read_json_object(folder / "tokenizer.json")
        return
    if any(all((folder / f).is_file() for f in files) for files in _TOKENIZER_SETS):
        return
    raise _Refused(
        f"{folder} has no tokenizer files; allowed: tokenizer.json, tokenizer.model, or "
        "vocab.json + merges.txt (save the tokenizer next to the model with save_pretrained)"
    )


def _known_model_types() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return list(CONFIG_MAPPING_NAMES)


def _remote_code_reason(config_file: Path, config: dict, folder: Path) -> str:
    """Why loading would run Python shipped with the model ("" when it would not).

    Any ``auto_map`` counts, even next to a model_type transformers knows: with it, the
    folder's own code and transformers' class can differ (weight names, numerics).
    """
    arch = config["model_type"]
    known = arch in _known_model_types()
    reasons = []
    if config.get("auto_map"):
        reasons.append(
            f"{config_file}: field auto_map names custom code {sorted(config['auto_map'])}"
        )
    tok_file = folder / "tokenizer_config.json"
    if tok_file.is_file() and _read_json_object(tok_file).get("auto_map"):
        reasons.append(f"{tok_file}: field auto_map names custom tokenizer code")
    if not reasons:
        if not known:
            raise unknown_name(
                f"{config_file}: model_type", arch, _known_model_types(), "known to transformers"
            )
        return ""
    if not known:
        reasons.append(f"model_type {arch!r} is unknown to transformers")
    alt = f", or delete auto_map to use transformers' own {arch!r} class" if known else ""
    return (
        "; ".join(reasons)
        + f"; refused before loading; allowed: trust_remote_code=true (runs that Python){alt}"
    )


def _inspect_folder(folder: Path, *, hub: bool) -> tuple[ModelInfo | None, str, str]:
    """(info, remote-code refusal, other refusal) of a model folder or a hub snapshot folder.

    The remote-code refusal is kept apart because ``trust_remote_code`` lifts it, and because
    it must win over any other problem: it is the decision the user has to make. A hub
    snapshot may not hold weights or a tokenizer yet (they download at load time), so only
    what is there is checked.
    """
    config_file = folder / "config.json"
    try:
        config = _read_config(config_file)
        reason = _remote_code_reason(config_file, config, folder)
    except ValueError as exc:
        return None, "", str(exc)
    try:
        weights, n_params, header_dtype = _check_weights(folder, require=not hub)
        if not hub:
            _check_tokenizer(folder)
    except ValueError as exc:
        return None, reason, str(exc)
    info = ModelInfo(
        path=None if hub else folder,
        architecture=config["model_type"],
        checkpoint_dtype=_config_dtype(config) or header_dtype,
        n_params=n_params,
        needs_remote_code=bool(reason),
        weights=weights,
    )
    return info, reason, ""


def _folder_stamp(folder: Path) -> tuple:
    """(name, size, mtime) of every entry: the cache key part that changes when files do."""
    stamp = []
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                st = entry.stat()  # follows the HF cache's symlinks to the blobs
                stamp.append((entry.name, st.st_size, st.st_mtime_ns))
            except OSError:
                stamp.append((entry.name, -1, -1))
    return tuple(sorted(stamp))


# (folder, hub?, stamp) -> what _inspect_folder found. A sweep validates ~20,000 cells over a
# few dozen models; re-reading headers and tokenizer files per cell would dominate.
_INSPECT_CACHE: dict[tuple, tuple[ModelInfo | None, str, str]] = {}


def _inspect_cached(folder: Path, *, hub: bool) -> tuple[ModelInfo | None, str, str]:
    key = (str(folder.resolve()), hub, _folder_stamp(folder))
    if key not in _INSPECT_CACHE:
        _INSPECT_CACHE[key] = _inspect_folder(folder, hub=hub)
    return _INSPECT_CACHE[key]


def _hub_config_file(spec: str) -> Path:
    """config.json of a hub id: from the HF cache, else (online) fetched alone, a few KB."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json")
    if isinstance(cached, str):
        return Path(cached)
    check_hub_reachable(spec)  # offline: the clear "not in the local cache" error
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(spec, "config.json"))
    except Exception as exc:  # any failure to fetch is a refusal; hub errors span many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(
            f"model={spec!r}: cannot read config.json from the hub ({type(exc).__name__}: {first}); "
            "allowed: an existing hub id, a local folder, or zoo:<family>/<size>"
        ) from None


def inspect_model(
    spec: str, zoo_dir: str | Path | None = None, trust_remote_code: bool = False
) -> ModelInfo:
    """Check a model without loading weights; refuse a bad one with one line naming the file.

    Reads config.json, the safetensors headers and the tokenizer files, so a sweep's
    validation can refuse a broken or code-shipping model before any cell starts. Results are
    cached in-process per (folder, file sizes and mtimes).
    """
    path = resolve_model_path(spec, zoo_dir)
    folder = path if path is not None else _hub_config_file(spec).parent
    info, reason, error = _inspect_cached(folder, hub=path is None)
    if reason and not trust_remote_code:
        raise ValueError(f"model={spec!r}: {reason}")
    if error:
        raise ValueError(f"model={spec!r}: {error}")
    return info


# ----------------------------------------------------------------------------- loading
def _from_pretrained(
    source: str,
    *,
    local: bool,
    use_safetensors: bool | None,
    dtype: torch.dtype,
    trust_remote_code: bool,
) -> tuple[nn.Module, object]:
    """(model, tokenizer) through transformers with every safety choice spelled out.

    ``trust_remote_code`` is always a bool, never None: None makes transformers prompt
    "[y/N]" on the terminal, and a "y" runs the folder's Python. ``weights_only=True`` keeps
    pickle checkpoints on torch's restricted unpickler (transformers 5's default, pinned here).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    common = {"trust_remote_code": bool(trust_remote_code)}
    if local:
        common["local_files_only"] = True
    config = AutoConfig.from_pretrained(source, **common)
    model = AutoModelForCausalLM.from_pretrained(
        source, config=config, dtype=dtype, use_safetensors=use_safetensors, weights_only=True,
        **common,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    return model, tokenizer


def load_model(
    spec: str,
    *,
    device: str = "auto",
    compute_dtype: str = "auto",
    zoo_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer; local folders never touch the network.

    The model is inspected first (:func:`inspect_model`, refusing code-shipping folders unless
    ``trust_remote_code``), and the device and dtype come from :func:`resolve_numerics`, so
    what is recorded is what was loaded. Safetensors when present, else torch's weights_only
    loader (docs/loading.md).
    """
    start = time.perf_counter()
    info = inspect_model(spec, zoo_dir, trust_remote_code)
    dev_class, dtype_name = resolve_numerics(device, compute_dtype, info.checkpoint_dtype)
    dev = torch.device(dev_class if device == "auto" else device)
    dtype = _DTYPES[dtype_name]
    source = str(info.path) if info.path is not None else spec
    use_safetensors = {"safetensors": True, "pytorch": False}.get(info.weights)
    log.info("loading %s on %s in %s (weights: %s)", source, dev, dtype_name, info.weights or "hub")
    try:
        model, tokenizer = _from_pretrained(
            source, local=info.path is not None, use_safetensors=use_safetensors, dtype=dtype,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"model={spec!r}: a pickle checkpoint ({PT_WEIGHTS}) holds objects that torch's "
            "weights_only loader refuses (unpickling them could run code); allowed: a "
            f"{SAFE_WEIGHTS} copy of the weights, or plain tensors in {PT_WEIGHTS}"
        ) from exc
    model.to(dev).eval()
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
