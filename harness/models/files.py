"""What a model is, and whether it can run, read cheaply before any weight is loaded.

A sweep validates thousands of cells before the first one starts; a broken or code-shipping
model must be refused then, with one line naming the file, not minutes later inside a cell.
:func:`inspect_model` reads only config.json, the safetensors headers and the tokenizer
files (docs/loading.md, "Pre-load inspection"): it refuses a folder that ships Python
(``auto_map``) unless ``trust_remote_code`` is set, truncated or missing weight files, shard
paths outside the folder, a pickle checkpoint that torch's ``weights_only`` loader refuses, a
missing tokenizer, and weights that do not match config.json: the checkpoint's tensor names and
shapes (from the safetensors headers, or a pickle's metadata read on the meta device) are
compared with the state dict of the model transformers builds from config.json on the meta
device (:func:`weights_problem`). Why: transformers fills a missing tensor with a fresh random
init and only logs it, so a cell would be recorded ``ok`` with a wrong number. Results are
cached per folder until a file in it changes. :func:`resolve_model_path` turns a model spec
(folder, hub id or ``zoo:``) into a folder; a folder spec goes through
:func:`harness.files.user_path` (``$VAR`` and ``~`` expanded), and the returned folder is the
one both checked and loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from harness.files import user_path
from harness.names import unknown_name
from harness.numerics import TORCH_DTYPES

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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


def resolve_model_path(spec: str, zoo_dir: str | Path | None = None) -> Path | None:
    """Local folder of a model spec, or None for a hub id. Raises a clear error otherwise."""
    if spec.startswith("zoo:"):
        from harness.zoo import resolve_model

        return Path(resolve_model(spec[4:], zoo_dir))
    path = user_path(spec, "model")
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
    return name if name in TORCH_DTYPES else None


# A checkpoint's tensors as read without their data: name -> (dtype, shape, file it is in).
Tensors = dict[str, tuple[str, tuple[int, ...], Path]]


def _safetensors_header(file: Path) -> tuple[int, dict[str, int], Tensors]:
    """(elements stored, elements per dtype, tensors) from a safetensors header; no tensor
    data is read.

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
    end, per_dtype, tensors = 0, Counter(), {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
            per_dtype[str(entry["dtype"])] += math.prod(shape)
            end = max(end, int(stop), int(begin))
        except (TypeError, KeyError, ValueError):
            raise _Refused(
                f"{file}: tensor {name!r} lacks dtype/shape/data_offsets in the safetensors header"
            ) from None
        tensors[name] = (str(entry["dtype"]), shape, file)
    expected = 8 + n + end
    if size != expected:
        problem = "truncated" if size < expected else "longer than its header says"
        raise _Refused(
            f"{file}: {problem}: the header's data offsets need {expected} bytes, the file has "
            f"{size}; allowed: a complete copy of the checkpoint"
        )
    return sum(per_dtype.values()), dict(per_dtype), tensors


def escapes_folder(name: str) -> bool:
    """Whether a path written relative to a folder leaves it (absolute, a drive, ``..``).

    For names a model folder gives or is given (an index's shard names, a ``model:``
    perplexity path). Lexical on purpose: a Hugging Face cache snapshot's files are symlinks
    into ``../blobs``, which is fine; a *name* that climbs out of the folder is not.
    """
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    return (posix.is_absolute() or bool(windows.drive) or windows.root != ""
            or ".." in posix.parts or ".." in windows.parts)  # fmt: skip


def _index_shards(index: Path) -> tuple[list[Path], list[str]]:
    """(present shard files, missing shard names) that a sharded checkpoint's index names.

    A shard name outside the index's folder (``../x``, an absolute path) is refused: loading
    must read only the model folder.
    """
    weight_map = _read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise _Refused(f"{index} has no weight_map; expected the index save_pretrained writes")
    names = sorted(set(map(str, weight_map.values())))
    outside = [n for n in names if escapes_folder(n)]
    if outside:
        raise _Refused(
            f"{index}: weight_map names shard {outside[0]!r} outside the model folder "
            f"{str(index.parent)!r}; allowed: shard file names inside that folder"
        )
    shards = [index.parent / name for name in names]
    return [s for s in shards if s.is_file()], [str(s.relative_to(index.parent))
                                                for s in shards if not s.is_file()]  # fmt: skip


def _refuse_missing_shards(index: Path, missing: list[str]) -> None:
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise _Refused(
            f"{index} names shard files that are missing: {missing[:5]}{more}; "
            "allowed: every shard the index names, next to it"
        )


def _pickle_tensors(file: Path) -> Tensors:
    """The tensors of a pickle checkpoint, read by torch's ``weights_only`` unpickler onto the
    meta device: only the pickle's metadata is read, and nothing in it is executed.

    Why before loading: a pickle that calls ``os.system`` (or any other callable) is refused
    here, at validation, instead of after the runner has started a cell.
    """
    import torch

    def load(mmap: bool) -> Any:
        return torch.load(file, weights_only=True, mmap=mmap, map_location="meta")

    try:
        try:
            data = load(mmap=True)
        except RuntimeError as exc:  # the pre-1.6 (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            data = load(mmap=False)
    except pickle.UnpicklingError:
        raise _Refused(
            f"{file}: holds objects that torch's weights_only loader refuses (unpickling them "
            f"could run code); refused before loading; allowed: a {SAFE_WEIGHTS} copy of the "
            f"weights, or plain tensors in {file.name}"
        ) from None
    except Exception as exc:  # torch raises many types for a corrupt archive
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise _Refused(
            f"{file}: does not load as a torch checkpoint ({type(exc).__name__}: {first}); "
            f"allowed: a complete {SAFE_WEIGHTS}, or a {PT_WEIGHTS} written by torch.save"
        ) from None
    if not isinstance(data, dict):
        raise _Refused(
            f"{file}: holds a {type(data).__name__}, not a state dict (name -> tensor); "
            "allowed: the file save_pretrained or torch.save(model.state_dict()) writes"
        )
    return {str(k): (str(v.dtype).removeprefix("torch."), tuple(v.shape), file)
            for k, v in data.items() if isinstance(v, torch.Tensor)}  # fmt: skip


@dataclass(frozen=True)
class _Weights:
    """What :func:`_check_weights` found: format, elements, dominant dtype, tensors."""

    format: str | None  # safetensors | pytorch | None
    n_params: int | None = None
    dtype: str | None = None
    tensors: Tensors | None = None  # None when not every file is here (a hub snapshot)
    files: tuple[Path, ...] = ()


def _check_weights(folder: Path, *, require: bool) -> _Weights:
    """The weights transformers would load: format, elements stored, dominant float dtype and
    the tensors' names and shapes (read without their data).

    Same preference as transformers: model.safetensors, its sharded index, then the pickle
    formats (read here and at load time only by torch's weights_only loader, see
    :func:`harness.models.loading.load_model`). With ``require`` False (a hub snapshot that downloads
    weights at load time) absent files pass.
    """
    if (folder / SAFE_WEIGHTS).is_file():
        shards, missing = [folder / SAFE_WEIGHTS], []
    elif (folder / SAFE_INDEX).is_file():
        shards, missing = _index_shards(folder / SAFE_INDEX)
        if require:
            _refuse_missing_shards(folder / SAFE_INDEX, missing)
    elif (folder / PT_INDEX).is_file() or (folder / PT_WEIGHTS).is_file():
        if (folder / PT_INDEX).is_file():
            shards, missing = _index_shards(folder / PT_INDEX)
            if require:
                _refuse_missing_shards(folder / PT_INDEX, missing)
        else:
            shards, missing = [folder / PT_WEIGHTS], []
        tensors: Tensors = {}
        for shard in shards:
            tensors.update(_pickle_tensors(shard))
        return _Weights("pytorch", None, None, None if missing else tensors, tuple(shards))
    elif require:
        raise _Refused(
            f"{folder} has no weight files; allowed: {SAFE_WEIGHTS}, {SAFE_INDEX} with its "
            f"shards, or {PT_WEIGHTS} (read with torch's weights_only loader)"
        )
    else:
        return _Weights(None)
    total, counts, tensors = 0, Counter(), {}
    for shard in shards:
        n, per_dtype, found = _safetensors_header(shard)
        total += n
        counts.update(per_dtype)
        tensors.update(found)
    floats = [(n, _HEADER_DTYPES[d]) for d, n in counts.items() if d in _HEADER_DTYPES]
    dominant = max(floats)[1] if floats else None
    return _Weights("safetensors", None if missing else total, dominant,
                    None if missing else tensors, tuple(shards))  # fmt: skip


# ------------------------------------------------------------ weights against config.json
# Checkpoint keys transformers drops without a word when the model has such buffers (see
# PreTrainedModel._adjust_missing_and_unexpected_keys): old rotary and position-id buffers.
_ALWAYS_UNEXPECTED = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "float16", "bfloat16",
                 "float32", "float64", "float8_e4m3fn", "float8_e5m2"}  # fmt: skip


# Loggers of optional packages transformers' model code imports (torchao, when installed, logs
# its missing CUDA kernels and torch's pytree deprecation notes at import): a refusal must stay
# ONE line on stderr, so validation keeps them at ERROR while it builds the meta model.
_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet_imports() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _IMPORT_NOISE]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _meta_model(folder: Path) -> Any:
    """The model transformers builds from ``folder``'s config.json, on the meta device (no
    memory, no weights; ~ms for small models, ~0.05 s for a 70B config, after a one-time
    import of transformers' model code)."""
    import torch

    with _quiet_imports():
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def _transforms(model: Any) -> tuple[list, list, Any]:
    """(renamings, converters, rename function) transformers applies to checkpoint keys when
    loading this model (transformers 5's conversion mapping); empty on older versions."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:
        return [], [], None
    mapping = get_model_conversion_mapping(model)
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    return [m for m in mapping if not isinstance(m, WeightConverter)], converters, rename_source_key


def _sort_key(name: str) -> Any:
    """transformers' checkpoint-key order (some of its renamings depend on it)."""
    try:
        from transformers.core_model_loading import dot_natural_key
    except ImportError:
        return name
    return dot_natural_key(name)


def _rename(key: str, expected: dict, prefix: str, transforms: tuple) -> tuple[str, Any]:
    """(the model key a checkpoint key loads into, the converter that produces it or None);
    the same steps as transformers' convert_and_load_state_dict_in_model."""
    renamings, converters, rename = transforms
    if rename is not None:
        renamed, source = rename(key, renamings, converters, prefix, expected)
        if renamed not in expected and key in expected:
            renamed, source = rename(key, [], [], prefix, expected)
        if source is None:
            return renamed, None
        converter = next(c for c in converters if source in c.source_patterns)
        return renamed, converter
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in expected:
        return key[len(prefix) + 1 :], None
    if prefix and f"{prefix}.{key}" in expected:
        return f"{prefix}.{key}", None
    return key, None


def _tied_groups(model: Any) -> list[set[str]]:
    """Sets of state-dict keys that are one tensor once loaded: parameters shared by identity
    (a tied LM head) and transformers' tied-weight mapping. One member in the checkpoint is
    enough for all (checkpoints save a tied head once, or not at all)."""
    by_id: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(tensor), set()).add(name)
    groups = [g for g in by_id.values() if len(g) > 1]
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        groups.append({str(target), str(source)})
    return groups


def _patterns(model: Any, attribute: str, extra: tuple[str, ...] = ()) -> re.Pattern | None:
    found = [*(getattr(model, attribute, None) or ()), *extra]
    return re.compile("|".join(f"(?:{p})" for p in found)) if found else None


def _listed(keys: list[str], limit: int = 3) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


def weights_problem(folder: Path, tensors: Tensors, weights_name: str, model: Any = None) -> str:
    """Why the checkpoint's tensors do not fit the model config.json describes ("" when they do).

    Compares names and shapes read without data (safetensors headers, pickle metadata) with
    the state dict of the model transformers builds from config.json on the meta device,
    following transformers' own loading rules: its key renamings and weight converters, the
    base-model prefix added or stripped, tied weights saved once (or not at all),
    non-persistent buffers (not in the state dict), and the model's
    ``_keys_to_ignore_on_load_missing`` / ``_keys_to_ignore_on_load_unexpected``. Refused:
    a tensor the model needs that the checkpoint lacks (transformers would initialise it
    randomly), a shape that differs from config.json's, and a floating-point weight matrix
    (2-D or more) the model has no place for (a config.json with fewer layers than the
    weights); stray scalars and 1-D buffers of old checkpoints (e.g. ``masked_bias``) are left
    to transformers, which drops them. ``model``: the meta model (built from ``folder`` when
    None).
    """
    model = _meta_model(folder) if model is None else model
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    transforms = _transforms(model)
    present: set[str] = set()
    mismatched, unexpected = [], []
    for key in sorted(tensors, key=_sort_key):
        dtype, shape, file = tensors[key]
        renamed, converter = _rename(key, expected, prefix, transforms)
        if renamed in expected and converter is None:
            present.add(renamed)
            if shape != expected[renamed]:
                mismatched.append((renamed, shape, expected[renamed], file))
        elif renamed in expected:  # a converter fills every one of its targets (not checked)
            first = converter.target_patterns[0]
            present.update(renamed.replace(first, t) for t in converter.target_patterns)
        elif dtype in _FLOAT_DTYPES and len(shape) >= 2:  # a weight matrix, not a stray buffer
            unexpected.append(key)
    ignore_missing = _patterns(model, "_keys_to_ignore_on_load_missing")
    ignore_unexpected = _patterns(model, "_keys_to_ignore_on_load_unexpected", _ALWAYS_UNEXPECTED)
    tied = [g for g in _tied_groups(model) if g & present]
    missing = sorted(k for k in expected if k not in present
                     and not any(k in g for g in tied)
                     and not (ignore_missing and ignore_missing.search(k)))  # fmt: skip
    unexpected = [k for k in unexpected if not (ignore_unexpected and ignore_unexpected.search(k))]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} tensor(s) that config.json's model needs are missing from "
            f"{weights_name}: {_listed(missing)} (transformers would fill them with random values)"
        )
    if mismatched:
        renamed, shape, want, file = mismatched[0]
        problems.append(f"{len(mismatched)} tensor(s) differ in shape from config.json's model, "
                        f"e.g. {renamed!r} is {list(shape)} in {file.name} but config.json makes "
                        f"it {list(want)}")  # fmt: skip
    if unexpected:
        problems.append(
            f"{len(unexpected)} weight matrices in {weights_name} that config.json's model has "
            f"no place for: {_listed(sorted(unexpected, key=_sort_key))}"
        )
    if not problems:
        return ""
    return (f"{folder / 'config.json'} and the weights disagree: " + "; ".join(problems)
            + "; refused before loading; allowed: the complete checkpoint saved with this "
            "config.json")  # fmt: skip


def _config_weights_problem(folder: Path, config: dict, weights: _Weights) -> str:
    """:func:`weights_problem` where it can be decided without running code; "" otherwise.

    Skipped (the load-time check in :func:`harness.models.loading.load_model` still applies): a
    hub snapshot whose weights are not all downloaded, a pre-quantized checkpoint
    (``quantization_config``: its tensors are not the model's), and a config.json that
    transformers cannot build on the meta device for a reason other than a bad value.
    """
    if weights.tensors is None or config.get("quantization_config"):
        return ""
    try:
        model = _meta_model(folder)
    except (ValueError, KeyError, TypeError) as exc:  # a config.json value transformers refuses
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return (f"{folder / 'config.json'}: transformers cannot build a causal LM from it "
                f"({type(exc).__name__}: {first}); allowed: a config.json written by "
                "save_pretrained for a causal LM")  # fmt: skip
    except Exception as exc:  # building failed for another reason: leave it to the load
        log.warning("could not build %s on the meta device to check its weights (%s: %s); "
                    "the load-time check still applies", folder, type(exc).__name__, exc)  # fmt: skip
        return ""
    names = [f.name for f in weights.files]
    name = names[0] if len(names) == 1 else f"the {len(names)} shards of the index"
    return weights_problem(folder, weights.tensors, name, model)


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
        weights = _check_weights(folder, require=not hub)
        if not hub:
            _check_tokenizer(folder)
        # The folder's own Python would build the model: nothing to compare with here
        # without running it (the load-time check in harness.models.loading still applies).
        problem = "" if reason else _config_weights_problem(folder, config, weights)
        if problem:
            raise _Refused(problem)
    except ValueError as exc:
        return None, reason, str(exc)
    info = ModelInfo(
        path=None if hub else folder,
        architecture=config["model_type"],
        checkpoint_dtype=_config_dtype(config) or weights.dtype,
        n_params=weights.n_params,
        needs_remote_code=bool(reason),
        weights=weights.format,
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


def read_model_config(spec: str, zoo_dir: str | Path | None = None) -> dict:
    """config.json of a model spec (folder, hub id or ``zoo:``) as a dict; no code, no weights.

    Why: sizing a job (harness.cluster.resources) needs the architecture's dimensions before
    anything is loaded. A hub id is read from the HF cache (online: fetched alone, a few KB);
    offline and not cached, the same clear error as :func:`check_hub_reachable`.
    """
    path = resolve_model_path(spec, zoo_dir)
    file = path / "config.json" if path is not None else _hub_config_file(spec)
    try:
        return _read_config(file)
    except _Refused as exc:
        raise ValueError(f"model={spec!r}: {exc}") from None
