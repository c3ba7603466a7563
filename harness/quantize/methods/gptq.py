"""``gptq``: GPTQ (Frantar et al. 2022) with kbit's block-wise rounding, for any data type.

The algorithm is :mod:`harness.quantize.gptq` (per-layer Hessians from calibration inputs,
Cholesky of the damped inverse, column-by-column rounding with error feedback, lazy batches);
its "rounding" is kbit's nearest code of the block's scaled codebook for every data type and
block size, with each block's scale fixed when GPTQ reaches the block's first column (GPTQ's
grouped variant). This module registers it as a method; the runner prepares the calibration
token ids from ``calibration`` (``harness.evaluate.calibration``) before calling it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from harness.quantize.gptq import check_scale_format, gptq_quantize_model
from harness.quantize.methods.registry import check_rounding, register_method
from harness.quantize.model import (
    QuantizeReport,
    QuantRequest,
    linear_layout,
    new_report,
    pristine_weights,
    selected_modules,
    tensor_entry,
)


@dataclass
class GPTQSettings:
    """GPTQ's settings; the calibration set and its size are part of the cell's identity."""

    name: str = "gptq"
    damp: float = 0.01  # added to the Hessian's diagonal, times its mean (GPTQ's percdamp)
    act_order: bool = False  # columns by decreasing Hessian diagonal (then static block scales)
    calibration: str = "corpus"  # corpus | a local text file or folder | hub:<dataset>[/<config>]
    n_samples: int = 128  # calibration windows (GPTQ: 128)
    seqlen: int | None = None  # tokens per window; null = min(model max positions, 2048)
    seed: int = 0  # which windows are drawn

    def __post_init__(self) -> None:
        if not 0.0 < float(self.damp) < 1.0:
            raise ValueError(f"method.damp={self.damp!r}; allowed: 0 < damp < 1")
        if isinstance(self.n_samples, bool) or int(self.n_samples) < 1:
            raise ValueError(f"method.n_samples={self.n_samples!r}; allowed: an integer >= 1")
        if self.seqlen is not None and int(self.seqlen) < 2:
            raise ValueError(f"method.seqlen={self.seqlen!r}; allowed: an integer >= 2 or null")
        if int(self.seed) < 0:
            raise ValueError(f"method.seed={self.seed!r}; allowed: an integer >= 0")
        if not str(self.calibration).strip():
            raise ValueError("method.calibration=''; allowed: corpus, a local text file or "
                             "folder, or hub:<dataset>[/<config>]")  # fmt: skip


def check_request(settings: GPTQSettings, request: QuantRequest) -> None:
    """What GPTQ cannot do, refused before any model loads: the element-grid scale formats
    (mx, nvfp4; its rounding step is kbit's normalised nearest code), then everything kbit's
    block-wise rounding refuses (GPTQ rounds with it, and rounds embeddings/head with it)."""
    check_scale_format(request.scale_format)
    check_rounding(settings, request)


@register_method("gptq", GPTQSettings, needs_calibration=True, validate=check_request)
def gptq(model: nn.Module, request: QuantRequest) -> QuantizeReport:
    """GPTQ every selected weight, decoder layer by decoder layer, from the pristine weights."""
    modules = selected_modules(model, request)
    store = pristine_weights(model, list(modules))
    report = new_report(request, "gptq")
    s = request.settings
    gptq_quantize_model(
        model, modules, request.calibration, dtype=request.dtype, bits=request.bits,
        block_size=request.block_size, scale_format=request.scale_format,
        centering=request.centering, dtype_overrides=request.dtype_overrides,
        damp=float(s.damp), act_order=bool(s.act_order), progress=request.progress,
    )  # fmt: skip
    for name, module in modules.items():
        report.tensors.append(tensor_entry(name, linear_layout(store[name], module)))
    return report
