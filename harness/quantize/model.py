"""Model-level quantization: fake-quantize every selected weight of a causal LM in place.

The first call keeps a pristine copy of every selected weight (on the CPU, so GPU memory is
not doubled); every later call quantizes *from that copy*, never from already-quantized
weights, and :func:`restore_model` copies it back bit for bit. One loaded model therefore
serves every quantization config of a sweep.

Layout: weights are quantized in ``nn.Linear`` layout (out, in), so blocks of ``block_size``
run along the input dimension for every family; GPT-2's ``Conv1D`` (stored (in, out)) is
transposed before and after.

Proxy quantization (Dettmers & Zettlemoyer 2022, "outlier-dependent quantization through
proxy quantization"): outlier features of the hidden states are found without data from the
weights alone. The hidden units of layer i whose weight rows have the largest standard
deviation (top ``outlier_fraction``) are taken as outlier dimensions; the matching input
columns of layer i + 1 are kept in 16 bit. The other columns are quantized as usual, with the
kept columns zeroed first so the outliers do not inflate the block scales. The layer pairing
per family is :data:`harness.models.PROXY_PAIRS`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from harness.models import is_conv1d, linear_weight, proxy_pairs, quantizable_modules
from harness.quantize.blockwise import fake_quantize

log = logging.getLogger(__name__)

_PRISTINE = "_kbit_pristine"
METHODS = ("blockwise", "proxy")


@dataclass
class TensorEntry:
    """One quantized weight, as bit accounting needs it."""

    name: str  # module name; the weight is <name>.weight
    numel: int  # all elements of the weight
    shape: tuple[int, ...]  # in Linear layout (out, in)
    outlier_columns: int = 0  # proxy: input columns kept in 16 bit
    outlier_numel: int = 0  # elements of those columns (kept in 16 bit, not in k bits)


@dataclass
class QuantizeReport:
    """What ``quantize_model`` did; everything a record and the bit count need."""

    method: str
    dtype: str
    bits: int
    block_size: int | None
    scale_format: str
    centering: bool
    outlier_fraction: float
    tensors: list[TensorEntry] = field(default_factory=list)
    quantize_s: float = 0.0

    @property
    def modules(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def n_quantized_params(self) -> int:
        """Elements stored in k bits (outlier columns excluded)."""
        return sum(t.numel - t.outlier_numel for t in self.tensors)


def _pristine(model: nn.Module, names: list[str], modules: dict[str, nn.Module]) -> dict:
    """The kept original weights (Linear layout), created on first use, extended as needed."""
    store = model.__dict__.setdefault(_PRISTINE, {})
    for name in names:
        if name not in store:
            store[name] = modules[name].weight.detach().to("cpu", copy=True)
    return store


def restore_model(model: nn.Module) -> int:
    """Copy every kept pristine weight back; returns how many tensors were restored."""
    store = model.__dict__.get(_PRISTINE, {})
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in store.items():
            modules[name].weight.copy_(weight)
    return len(store)


def _outlier_columns(sources: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Indices of the top ``fraction`` hidden units by weight-row std (product over sources)."""
    score = torch.ones(sources[0].shape[0], dtype=torch.float64)
    for w in sources:
        score *= w.to(torch.float64).std(dim=1)
    k = min(score.numel(), max(1, round(fraction * score.numel())))
    return torch.topk(score, k).indices.sort().values


def _proxy_plan(
    model: nn.Module, store: dict, modules: dict[str, nn.Module], fraction: float
) -> dict[str, torch.Tensor]:
    """Target module name -> input columns to keep in 16 bit."""
    plan = {}
    for sources, target in proxy_pairs(model):
        if target not in modules:
            continue
        weights = [_linear_layout(store[s], modules[s]) for s in sources]
        plan[target] = _outlier_columns(weights, fraction)
    return plan


def _linear_layout(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return weight.t() if is_conv1d(module) else weight


def _quantize_one(
    original: torch.Tensor, keep: torch.Tensor | None, kw: dict[str, Any]
) -> torch.Tensor:
    """Fake-quantize one weight in Linear layout; ``keep`` columns stay as they were."""
    if keep is None:
        return fake_quantize(original, **kw)
    zeroed = original.clone()
    zeroed[:, keep] = 0
    out = fake_quantize(zeroed, **kw)
    out[:, keep] = original[:, keep]
    return out


def quantize_model(
    model: nn.Module,
    dtype: str,
    bits: int,
    block_size: int | None,
    *,
    scale_format: str = "fp16",
    centering: bool = False,
    method: str = "blockwise",
    outlier_fraction: float = 0.02,
    quantize_embeddings: bool = False,
    quantize_head: bool = False,
    dtype_overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> QuantizeReport:
    """Fake-quantize every selected weight in place from the pristine copy; see module doc.

    ``method``: ``blockwise`` (every weight) or ``proxy`` (keep the top ``outlier_fraction``
    input columns of each pair's target in 16 bit). ``dtype_overrides`` go to the data type
    entry (e.g. ``exponent_bits``).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; allowed: {list(METHODS)}")
    if method == "proxy" and not 0.0 <= outlier_fraction < 1.0:
        raise ValueError(f"outlier_fraction={outlier_fraction!r}; allowed: 0 <= fraction < 1")
    start = time.perf_counter()
    modules = quantizable_modules(model, embeddings=quantize_embeddings, head=quantize_head)
    all_modules = dict(model.named_modules())
    names = list(modules)
    plan: dict[str, torch.Tensor] = {}
    if method == "proxy":
        sources = [s for src, _ in proxy_pairs(model) for s in src]
        store = _pristine(model, names + sources, all_modules)
        plan = _proxy_plan(model, store, modules, outlier_fraction)
    store = _pristine(model, names, all_modules)
    kw = dict(
        dtype=dtype,
        bits=bits,
        block_size=block_size,
        scale_format=scale_format,
        centering=centering,
        **(dtype_overrides or {}),
    )
    report = QuantizeReport(
        method, dtype, bits, block_size, scale_format, centering,
        outlier_fraction if method == "proxy" else 0.0,
    )  # fmt: skip
    restore_model(model)  # weights outside this config's selection go back to pristine
    with torch.no_grad():
        for name in tqdm(names, desc=f"quantize {dtype}{bits}", disable=not progress, leave=False):
            module = modules[name]
            dev = module.weight.device
            original = _linear_layout(store[name], module).to(dev)
            keep = plan.get(name)
            target = linear_weight(module)
            if keep is None and target.is_contiguous() and target.dtype == original.dtype:
                fake_quantize(original, out=target, **kw)  # no intermediate full-size copy
            else:
                quantized = _quantize_one(original, keep.to(dev) if keep is not None else None, kw)
                target.copy_(quantized)
            n_keep = 0 if keep is None else keep.numel()
            report.tensors.append(
                TensorEntry(
                    name,
                    original.numel(),
                    tuple(original.shape),
                    n_keep,
                    n_keep * original.shape[0],
                )
            )
    report.quantize_s = time.perf_counter() - start
    _check_finite(model, names, all_modules)
    return report


def _check_finite(model: nn.Module, names: list[str], modules: dict[str, nn.Module]) -> None:
    bad = [n for n in names if not bool(torch.isfinite(modules[n].weight).all())]
    if bad:
        raise FloatingPointError(f"quantized weights of {bad[:5]} contain NaN/inf")


def outlier_share(report: QuantizeReport) -> float:
    """Share of quantized-module elements kept in 16 bit by proxy quantization."""
    total = sum(t.numel for t in report.tensors)
    return sum(t.outlier_numel for t in report.tensors) / total if total else math.nan


def count_bits(model: nn.Module, report: QuantizeReport):
    """Total model bits of the quantized model (``harness.bits.total_model_bits``).

    Every parameter counted once: quantized elements at k bits + block scales (+ means), proxy
    outlier columns and everything not quantized at 16 bit; a data-dependent codebook
    (quantile) is stored per tensor (2^k values).
    """
    from harness.bits import QuantizedTensorInfo, total_model_bits
    from harness.dtypes import is_data_dependent

    n_params = sum(p.numel() for p in model.parameters())
    codebook = 2**report.bits if is_data_dependent(report.dtype) else 0
    entries = [
        QuantizedTensorInfo(t.numel - t.outlier_numel, report.bits, report.block_size, codebook)
        for t in report.tensors
    ]
    outliers = sum(t.outlier_numel for t in report.tensors)
    unquantized = n_params - sum(t.numel for t in report.tensors)
    return total_model_bits(
        entries,
        unquantized,
        scale_format=report.scale_format,
        centering=report.centering,
        outlier_params=outliers,
    )
