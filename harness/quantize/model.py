"""Model-level quantization: fake-quantize every selected weight of a causal LM in place.

The first call keeps a pristine copy of every selected weight (on the CPU, so GPU memory is
not doubled); every later call quantizes *from that copy*, never from already-quantized
weights, and :func:`restore_model` copies it back bit for bit. One loaded model therefore
serves every quantization config of a sweep.

Device-agnostic: each weight is quantized on its own module's device and restored there, so
a model sharded over several GPUs (``harness.models.placement``) is handled module by module, each
on the GPU that holds it. The host memory this costs is the selected weights in the compute
dtype (about the whole model; docs/loading.md, "Models larger than one GPU"). The copies are
ordinary (pageable) CPU tensors: pinning hundreds of GB of host memory can fail or starve the
node, and restoring is a small share of a cell's time.

*How* the weights become k-bit values is a method (``harness.quantize.methods``: blockwise,
proxy, gptq, hqq, or one you register); this module is what every method shares: the request a
method is given (:class:`QuantRequest`), the pristine copies, the per-module round-to-nearest
loop (:func:`quantize_each`), the report a record is built from, and the bit count. It never
imports the method registry: the registry (and ``quantize_model``, which looks a method up)
imports this module, and each method module imports both.

Layout: weights are quantized in ``nn.Linear`` layout (out, in), so blocks of ``block_size``
run along the input dimension for every family; GPT-2's ``Conv1D`` (stored (in, out)) is
transposed before and after.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from harness.models.loading import is_conv1d, linear_weight, quantizable_modules
from harness.models.placement import on_device
from harness.quantize.blockwise import fake_quantize

log = logging.getLogger(__name__)

_PRISTINE = "_kbit_pristine"


@dataclass
class QuantRequest:
    """Everything a method needs besides the model: the data type, the layout, its settings.

    Build it by keyword (``QuantRequest(dtype=..., bits=..., block_size=..., ...)``): its
    builders, :func:`harness.quantize.methods.quantize_model` (from its arguments) and
    :func:`harness.config.rules.quant_request` (from a cell config), name every field, so a
    new field cannot shift the others.
    """

    dtype: str
    bits: int
    block_size: int | None
    scale_format: str = "fp16"
    centering: bool = False
    dtype_overrides: dict[str, Any] = field(default_factory=dict)
    quantize_embeddings: bool = False
    quantize_head: bool = False
    settings: Any = None  # the method's settings dataclass instance
    calibration: torch.Tensor | None = None  # (n_samples, seqlen) token ids, when needed
    progress: bool = True


def settings_dict(settings: Any) -> dict[str, Any]:
    """A settings instance as plain data without its name (for records and labels)."""
    if settings is None:
        return {}
    data = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    data.pop("name", None)
    return {k: (v.value if hasattr(v, "value") else v) for k, v in data.items()}


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
    """What ``quantize_model`` did; everything a record and the bit count need.

    Method-agnostic: a method's own settings travel as plain data in ``settings`` (the
    record's ``method_settings``); a record column named like a setting (``outlier_fraction``
    for proxy) is filled from there by the record assembly, never from a field per method.
    """

    method: str
    dtype: str
    bits: int
    block_size: int | None
    scale_format: str
    centering: bool
    tensors: list[TensorEntry] = field(default_factory=list)
    quantize_s: float = 0.0
    settings: dict = field(default_factory=dict)  # the method's own settings, as plain data
    # per-block offsets stored beside the scales (zero points), counted like centering means
    block_offsets: bool = False

    @property
    def outlier_fraction(self) -> float:
        """Proxy's setting as the old report field read it (0.0 for other methods); kept for
        callers of that field: new code reads ``settings``."""
        return float(self.settings.get("outlier_fraction", 0.0) or 0.0)

    @property
    def modules(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def n_quantized_params(self) -> int:
        """Elements stored in k bits (outlier columns excluded)."""
        return sum(t.numel - t.outlier_numel for t in self.tensors)


def pristine_weights(
    model: nn.Module, names: list[str], modules: dict[str, nn.Module] | None = None
) -> dict[str, torch.Tensor]:
    """The kept original weights (as stored by the module), created on first use.

    Copied to host memory from whatever device holds each weight; a weight on the meta device
    (offloaded by accelerate) is refused: quantizing it in place would change nothing.
    """
    modules = modules if modules is not None else dict(model.named_modules())
    store = model.__dict__.setdefault(_PRISTINE, {})
    for name in names:
        if name not in store:
            weight = modules[name].weight
            if weight.device.type == "meta":
                raise ValueError(
                    f"{name}.weight is on the meta device (offloaded); allowed: a model whose "
                    "weights are all on GPUs or the CPU (kbit never offloads)"
                )
            store[name] = weight.detach().to("cpu", copy=True)
    return store


def restore_model(model: nn.Module) -> int:
    """Copy every kept pristine weight back, onto the device each weight lives on (a sharded
    model's weight on ``cuda:1`` is restored on ``cuda:1``); returns how many were restored."""
    store = model.__dict__.get(_PRISTINE, {})
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in store.items():
            modules[name].weight.copy_(weight)
    return len(store)


def linear_layout(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A weight in ``nn.Linear`` layout (out, in): GPT-2's Conv1D stores it transposed."""
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


def fake_quantize_kwargs(request: QuantRequest) -> dict[str, Any]:
    """``fake_quantize`` keywords of a :class:`QuantRequest`."""
    return dict(
        dtype=request.dtype, bits=request.bits, block_size=request.block_size,
        scale_format=request.scale_format, centering=request.centering,
        **(request.dtype_overrides or {}),
    )  # fmt: skip


def selected_modules(model: nn.Module, request: QuantRequest) -> dict[str, nn.Module]:
    """The modules whose weights the request quantizes (see ``harness.models.loading``)."""
    return quantizable_modules(
        model, embeddings=request.quantize_embeddings, head=request.quantize_head
    )


def quantize_each(
    model: nn.Module,
    request: QuantRequest,
    report: QuantizeReport,
    keep: dict[str, torch.Tensor] | None = None,
    names: list[str] | None = None,
) -> QuantizeReport:
    """Round-to-nearest every selected weight (or ``names``) from its pristine copy, in place.

    ``keep``: module name -> input columns left as they are (proxy's outlier columns).
    The shared loop of every method that rounds weights independently.
    """
    modules = selected_modules(model, request)
    names = list(modules) if names is None else names
    store = pristine_weights(model, names)
    kw = fake_quantize_kwargs(request)
    desc = f"quantize {request.dtype}{request.bits}"
    with torch.no_grad():
        for name in tqdm(names, desc=desc, disable=not request.progress, leave=False):
            module = modules[name]
            original = linear_layout(store[name], module).to(module.weight.device)
            cols = (keep or {}).get(name)
            target = linear_weight(module)
            with on_device(original.device):  # a sharded model: this weight's own GPU
                if cols is None and target.is_contiguous() and target.dtype == original.dtype:
                    fake_quantize(original, out=target, **kw)  # no intermediate full-size copy
                else:
                    target.copy_(
                        _quantize_one(
                            original, cols.to(original.device) if cols is not None else None, kw
                        )
                    )
            report.tensors.append(tensor_entry(name, original, cols))
    return report


def tensor_entry(
    name: str, original: torch.Tensor, keep: torch.Tensor | None = None
) -> TensorEntry:
    """The bit-accounting entry of one quantized weight (Linear layout)."""
    n_keep = 0 if keep is None else keep.numel()
    return TensorEntry(
        name, original.numel(), tuple(original.shape), n_keep, n_keep * original.shape[0]
    )


def check_finite(model: nn.Module, names: list[str]) -> None:
    """FloatingPointError naming the quantized weights that contain NaN or inf."""
    modules = dict(model.named_modules())
    bad = [n for n in names if not bool(torch.isfinite(modules[n].weight).all())]
    if bad:
        raise FloatingPointError(f"quantized weights of {bad[:5]} contain NaN/inf")


def new_report(request: QuantRequest, method: str) -> QuantizeReport:
    """An empty report for ``request`` (methods fill in the tensors)."""
    return QuantizeReport(
        method=method, dtype=request.dtype, bits=request.bits, block_size=request.block_size,
        scale_format=request.scale_format, centering=request.centering,
        settings=settings_dict(request.settings),
    )  # fmt: skip


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
        centering=report.centering or report.block_offsets,
        outlier_params=outliers,
    )
