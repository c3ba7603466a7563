"""What a model is, and whether it can run, read cheaply before any weight is loaded.

A sweep validates thousands of cells before the first one starts; a broken or code-shipping
model must be refused then, with one line naming the file, not minutes later inside a cell.
:func:`inspect_model` reads only config.json, the safetensors headers and the tokenizer
files (docs/loading.md, "Pre-load inspection"): it refuses a folder that ships Python
(``auto_map``) unless ``trust_remote_code`` is set, truncated or missing weight files, shard
paths outside the folder, a pickle checkpoint that torch's ``weights_only`` loader refuses, a
missing tokenizer, and weights that do not match config.json: the checkpoint's tensor names and
shapes (read by :mod:`harness.models.checkpoint` from the safetensors headers, or a pickle's
metadata on the meta device) are compared with the state dict of the model transformers builds
from config.json on the meta device (:func:`harness.models.weights.weights_problem`). Why:
transformers fills a missing tensor with a fresh random init and only logs it, so a cell would
be recorded ``ok`` with a wrong number. Results are
cached per folder until a file in it changes. :func:`resolve_model_path` turns a model spec
(folder, hub id or ``zoo:``) into a folder; a folder spec goes through
:func:`harness.files.user_path` (``$VAR`` and ``~`` expanded), and the returned folder is the
one both checked and loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from harness.files import user_path
from harness.models import weights as weights_check
from harness.models.checkpoint import (
    PT_WEIGHTS,
    SAFE_WEIGHTS,
    ModelFileRefused,
    check_weights,
    escapes_folder,
    read_json_object,
)
from harness.names import unknown_name
from harness.numerics import TORCH_DTYPES

# The names callers import from here (the checkpoint readers' among them, from before the split).
__all__ = [
    "PT_WEIGHTS",
    "SAFE_WEIGHTS",
    "ModelInfo",
    "check_hub_reachable",
    "escapes_folder",
    "inspect_model",
    "read_model_config",
    "resolve_model_path",
]

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


# A tokenizer is one of these file sets (fast JSON, sentencepiece, GPT-2 BPE, WordPiece).
_TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",), ("spiece.model",),
                   ("vocab.json", "merges.txt"), ("vocab.txt",))  # fmt: skip


def _read_config(file: Path) -> dict:
    """config.json as a dict with a string ``model_type`` (which names the architecture)."""
    config = read_json_object(file)
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise ModelFileRefused(
            f"{file} has no model_type; allowed: a config.json written by save_pretrained, "
            "whose model_type names the architecture (e.g. 'gpt_neox')"
        )
    return config


def _config_dtype(config: dict) -> str | None:
    """float16 | bfloat16 | float32 from ``dtype`` (transformers 5) or ``torch_dtype`` (4.x)."""
    value = config.get("dtype", config.get("torch_dtype"))
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    return name if name in TORCH_DTYPES else None


def _check_tokenizer(folder: Path) -> None:
    """The folder must hold a tokenizer: every cell evaluates text."""
    if (folder / "tokenizer.json").is_file():
        read_json_object(folder / "tokenizer.json")
        return
    if any(all((folder / f).is_file() for f in files) for files in _TOKENIZER_SETS):
        return
    raise ModelFileRefused(
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
    if tok_file.is_file() and read_json_object(tok_file).get("auto_map"):
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
        weights = check_weights(folder, require=not hub)
        if not hub:
            _check_tokenizer(folder)
        # The folder's own Python would build the model: nothing to compare with here
        # without running it (the load-time check in harness.models.loading still applies).
        problem = "" if reason else weights_check.config_weights_problem(folder, config, weights)
        if problem:
            raise ModelFileRefused(problem)
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
    except ModelFileRefused as exc:
        raise ValueError(f"model={spec!r}: {exc}") from None
