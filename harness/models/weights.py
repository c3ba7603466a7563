"""Whether a checkpoint's tensors are the ones config.json's model needs, decided before loading.

transformers fills a tensor missing from the checkpoint with a fresh random init and only logs
it, so a cell would be recorded ``ok`` with a wrong number. :func:`weights_problem` compares the
tensors :mod:`harness.models.checkpoint` read (names and shapes, no data) with the state dict of
the model transformers builds from config.json on the meta device, following transformers' own
loading rules.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.models.checkpoint import Tensors, Weights

log = logging.getLogger(__name__)

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


def config_weights_problem(folder: Path, config: dict, weights: Weights) -> str:
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
