"""The cross-field rules of a cell's quantization, asked of the registries at planning time.

Why here: ``centering=true scale_format=e8m0``, ``dtype=quantile scale_format=mx`` or
``method=gptq format=nvfp4`` used to pass planning and fail once the model had loaded (on a
paper grid: GPU hours on cells that were knowably invalid). :func:`quantization_problem` asks,
in this order and without reading any file or weight:

1. the data-type family (``harness.dtypes.check``: k in the family's range, the entry's own
   rules, fields that do not belong to the family),
2. the scale-format registry (``harness.kernels.scale_formats``: a known format, ``centering``
   only where a block mean can be stored, no data-dependent codebook in an element grid),
3. the method registry (``harness.quantize.methods.check_request``: the method's declared
   ``validate``, which for the rounding methods is
   ``harness.quantize.blockwise.rounding_problem``, an element grid's codebook included).

Each registry's rule is one function that the code doing the work asserts again when it runs,
so planning and running cannot disagree; ``tests/test_combinations.py`` checks that every
combination passing planning runs through quantization. ``harness.config.schema.check_cell``
calls this for every quantized cell (single runs: the ValidateCell callback; sweeps: every
cell of the plan) and raises its line as a ``ConfigError``. Returns problems as strings and
imports nothing of ``harness.config`` so the schema can import it.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.kernels import scale_formats


def first_line(exc: BaseException) -> str:
    """An exception's message as one line (its first), or its repr when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


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


def quant_request(
    cfg: DictConfig, settings: Any, *, calibration: Any = None, progress: bool = False
) -> Any:
    """The cell's quantization as the method registry takes it (a ``QuantRequest``, by keyword)."""
    from harness.quantize.model import QuantRequest

    return QuantRequest(
        dtype=str(cfg.dtype.name),
        bits=int(cfg.bits),
        block_size=cfg.block_size,
        scale_format=str(cfg.scale_format),
        centering=bool(cfg.centering),
        dtype_overrides=dtype_overrides(cfg),
        quantize_embeddings=bool(cfg.quantize_embeddings),
        quantize_head=bool(cfg.quantize_head),
        settings=settings,
        calibration=calibration,
        progress=progress,
    )


def scale_format_problem(scale_format: str, centering: bool, dtype: str) -> str:
    """The scale-format registry's rules for a cell (``""`` when it has none to raise)."""
    from harness.dtypes import is_data_dependent

    return (
        scale_formats.format_problem(scale_format)
        or scale_formats.centering_problem(scale_format, centering)
        or scale_formats.codebook_problem(scale_format, is_data_dependent(dtype), dtype)
    )


def quantization_problem(cfg: DictConfig, settings: Any) -> str:
    """``""`` if the quantized cell ``cfg`` (method ``settings`` already built) passes every
    registry's rules, else the first refusal as one line naming field, value and allowed.

    Kept per distinct quantization (the dtype entry as given, k, block size, scale format,
    centering, the method's settings) for the life of the process: a sweep's validator asks
    this for every cell, and a grid of 20,000 cells holds a few hundred distinct ones.
    """
    from harness.dtypes import families
    from harness.quantize.methods import methods

    dtype_node = OmegaConf.to_container(cfg.dtype, resolve=True, enum_to_str=True)
    key = (
        tuple(families()),  # a family or method registered later (a plugin) is a new key
        tuple(methods()),
        repr(sorted(dtype_node.items())) if isinstance(dtype_node, dict) else repr(dtype_node),
        repr(cfg.bits),
        repr(cfg.block_size),
        str(cfg.scale_format),
        repr(cfg.centering),
        repr(settings),
    )
    if key not in _VERDICTS:
        if len(_VERDICTS) >= _MAX_VERDICTS:
            _VERDICTS.clear()
        _VERDICTS[key] = _problem(cfg, settings)
    return _VERDICTS[key]


_VERDICTS: dict[tuple, str] = {}
_MAX_VERDICTS = 4096


def _problem(cfg: DictConfig, settings: Any) -> str:
    from harness.dtypes import check
    from harness.quantize.methods import check_request

    try:
        overrides = dtype_overrides(cfg)
        check(str(cfg.dtype.name), int(cfg.bits), **overrides)
        problem = scale_format_problem(
            str(cfg.scale_format), bool(cfg.centering), str(cfg.dtype.name)
        )
        if problem:
            return problem
        check_request(quant_request(cfg, settings))
    except (ValueError, TypeError) as exc:
        return first_line(exc)
    return ""
