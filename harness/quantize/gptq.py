"""GPTQ (Frantar et al. 2022) whose rounding step is kbit's block-wise nearest-code quantizer.

GPTQ quantizes a linear layer's weight one input column at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian
H = 2/n X^T X of the layer's calibration inputs, so that ||W X - Q X|| (not ||W - Q||) is
small. Here "rounding" is exactly kbit's: the same block layout (blocks of ``block_size``
consecutive elements of the flattened (out, in) weight, ``None`` = one block per tensor),
the same stored scale (absmax rounded to ``scale_format``) and mean (``centering``), the same
clamp to [-1, 1] and the same nearest-code rule (decision thresholds from
:func:`harness.kernels.torch_ops.thresholds`, ties to the lower code). With an identity Hessian
no error is propagated and :func:`gptq_quantize_weight` equals :func:`fake_quantize` bit for
bit (``tests/test_gptq.py`` checks this for every family).

When are block scales fixed? As in GPTQ's grouped variant: a block's scale (and mean) is
computed from the *current*, error-updated weights of that block when the algorithm reaches
the block's first column. A block that wraps around a row end (``block_size`` not dividing
the input dimension) or spans whole rows (``None``, or ``block_size`` >= in) touches column 0,
so its scale comes from the weight before any update, which is the current weight then.
Data-dependent codebooks (quantile) are fitted once, to the block-normalised values of the
weight before any update (after dead-column zeroing; as :func:`fake_quantize` fits them), and
then kept fixed.

Why one module: the Hessian collection, the column loop with its lazy batches and the per-layer
driver share the block-scale state (when a block's scale is fixed) and the dead-column rule;
they are one algorithm, read top to bottom next to the paper.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.dtypes import codebook, is_data_dependent
from harness.kernels.scale_formats import SCALE_FORMATS
from harness.kernels.torch_ops import ELEMENT_FORMATS, thresholds
from harness.models.loading import decoder_layers, linear_weight
from harness.models.placement import input_device, module_device, on_device
from harness.quantize.blockwise import fake_quantize, fit_population, quantize_blockwise

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- rounding
@dataclass
class BlockStats:
    """Per-element scale and mean of the block each weight element belongs to.

    Element-wise maps (shape of the weight) rather than per-block vectors: a column step
    then reads its scales with one slice, whatever the block layout (wrapping blocks, tail).
    """

    scale: torch.Tensor  # float32 (out, in): the stored (format-rounded) block scale
    mean: torch.Tensor | None  # float32 (out, in) when centering, else None


@dataclass(frozen=True)
class Rounder:
    """kbit's nearest-code step for one codebook and block layout."""

    code: torch.Tensor  # float32 sorted codebook
    thresholds: torch.Tensor  # float32 finite decision thresholds (ties go down)
    block_size: int | None
    scale_format: str
    centering: bool

    def round(self, w: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor | None):
        """Fake-quantize ``w`` with fixed ``scale``/``mean`` exactly as kbit's kernels do.

        (w - mean) / scale (a zero scale divides by 1), clamped to [-1, 1]; the code is
        #{thresholds < y}; the value is code * scale (+ mean), each step one float32 op.
        """
        centred = w if mean is None else w - mean
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        y = (centred / safe).clamp(-1.0, 1.0)
        idx = torch.searchsorted(self.thresholds, y.contiguous(), side="left")
        out = self.code[idx] * scale
        return out if mean is None else out + mean

    def stats(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scales, means or None) of the blocks that are the rows of ``values`` (n, L).

        Through kbit's own quantizer, so scale-format rounding and the float64 mean are
        kbit's by construction.
        """
        q = quantize_blockwise(
            values.contiguous().reshape(-1),
            self.code,
            values.shape[1],
            scale_format=self.scale_format,
            centering=self.centering,
        )
        return q.scales, q.means


def make_rounder(
    weight: torch.Tensor,
    dtype: str,
    bits: int,
    block_size: int | None,
    *,
    scale_format: str = "fp16",
    centering: bool = False,
    dtype_overrides: dict[str, Any] | None = None,
) -> Rounder:
    """The codebook (fitted to ``weight`` when data dependent, as fake_quantize does) and its
    thresholds."""
    fitted = None
    if is_data_dependent(dtype):
        fitted = fit_population(weight, block_size, scale_format=scale_format, centering=centering)
    code = codebook(dtype, bits, fitted, **(dtype_overrides or {})).to(torch.float32)
    code = code.to(weight.device)
    return Rounder(code, thresholds(code)[:-1].contiguous(), block_size, scale_format, centering)


def initial_stats(weight: torch.Tensor, rounder: Rounder) -> BlockStats:
    """Scales and means of every block of ``weight`` (kbit's flattened layout), per element."""
    q = quantize_blockwise(
        weight.contiguous(),
        rounder.code,
        rounder.block_size,
        scale_format=rounder.scale_format,
        centering=rounder.centering,
    )
    size = weight.numel() if rounder.block_size is None else rounder.block_size

    def per_element(v: torch.Tensor) -> torch.Tensor:
        return v.repeat_interleave(size)[: weight.numel()].view(weight.shape).clone()

    return BlockStats(per_element(q.scales), None if q.means is None else per_element(q.means))


def block_triggers(
    shape: torch.Size, block_size: int | None
) -> dict[int, list[tuple[torch.Tensor, int]]]:
    """Column -> [(rows, length)] of the blocks whose scale is fixed when that column comes.

    Only blocks that start at a column c > 0 of a row and end within the row: every other
    block touches column 0 and keeps the scale of the initial weight. Rows are grouped by
    block length (at most two: full blocks and the tail block).
    """
    rows_n, cols_n = shape
    if block_size is None or block_size >= cols_n:
        return {}
    numel = rows_n * cols_n
    starts = torch.arange(0, numel, block_size, dtype=torch.int64)
    lengths = (numel - starts).clamp(max=block_size)
    col, row = starts % cols_n, starts // cols_n
    keep = (col > 0) & (col + lengths <= cols_n)
    col, row, lengths = col[keep], row[keep], lengths[keep]
    out: dict[int, list[tuple[torch.Tensor, int]]] = {}
    for c in torch.unique(col).tolist():
        at = col == c
        for length in torch.unique(lengths[at]).tolist():
            out[c] = [*out.get(c, []), (row[at & (lengths == length)], int(length))]
    return out


# ----------------------------------------------------------------------------- GPTQ core
def prepare_hessian(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight with dead columns zeroed, damped Hessian): GPTQ's preprocessing.

    A dead input (H_ii = 0: never non-zero in the calibration data) cannot be fitted, so
    its weights are set to zero and H_ii to 1 (keeps H invertible); then ``damp`` times the
    mean diagonal is added for numerical stability.
    """
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    return w, h


def inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U): GPTQ's row-wise OBS update vectors.

    float32 as GPTQ; if the factorisation fails there (ill-conditioned H), it is redone in
    float64 rather than failing a whole model.
    """
    for dt in (torch.float32, torch.float64):
        hd = h.to(dt)
        low, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            inv = torch.cholesky_inverse(low)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper.to(torch.float32)
        log.info("Cholesky failed in %s; retrying in float64", dt)
    raise ValueError(
        "hessian: not positive definite even after damping; allowed: a PSD matrix "
        "(2/n X^T X) with a larger damp"
    )


def gptq_columns(
    w: torch.Tensor,
    upper: torch.Tensor,
    rounder: Rounder,
    stats: BlockStats,
    triggers: dict[int, list[tuple[torch.Tensor, int]]],
    lazy_cols: int,
) -> torch.Tensor:
    """GPTQ's column loop with lazy batch updates over ``w`` (out, in) in processing order.

    Within a batch of ``lazy_cols`` columns each error is applied at once to the batch's
    later columns; the columns after the batch get the batch's errors in one matmul at the
    end (same result up to summation order, far fewer memory passes). A block whose scale is
    fixed mid-batch sees its current values: batch columns as updated, later columns plus
    the errors of the batch so far. Works on transposed (in, out) copies so that a column
    is a contiguous row: on CPU the per-column steps then stream instead of striding.
    """
    wt = w.t().contiguous()
    scale_t = stats.scale.t().contiguous()
    mean_t = None if stats.mean is None else stats.mean.t().contiguous()
    qt = torch.zeros_like(wt)
    for i1 in range(0, wt.shape[0], lazy_cols):
        i2 = min(i1 + lazy_cols, wt.shape[0])
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            for rows, length in triggers.get(col, ()):
                cur = _current(wt, w1, err1, upper, i1, i, col + length).t()[rows]
                scale, mean = rounder.stats(cur)
                scale_t[col : col + length, rows] = scale.view(1, -1)
                if mean_t is not None:
                    mean_t[col : col + length, rows] = mean.view(1, -1)
            x = w1[i]
            qc = rounder.round(x, scale_t[col], None if mean_t is None else mean_t[col])
            qt[col] = qc
            e = (x - qc) / u1[i, i]
            w1[i:] -= u1[i, i:].unsqueeze(1) * e.unsqueeze(0)
            err1[i] = e
        wt[i2:].addmm_(upper[i1:i2, i2:].t(), err1, alpha=-1)
    return qt.t()


def _current(
    wt: torch.Tensor, w1: torch.Tensor, err1: torch.Tensor, upper: torch.Tensor,
    i1: int, i: int, stop: int,
) -> torch.Tensor:  # fmt: skip
    """Current values (transposed: one row per column) of columns [i1 + i, stop): the
    batch's own, then later ones updated with the errors of the batch's first ``i`` columns."""
    i2 = i1 + w1.shape[0]
    inside = w1[i : min(stop, i2) - i1]
    if stop <= i2:
        return inside
    later = wt[i2:stop] - upper[i1 : i1 + i, i2:stop].t() @ err1[:i]
    return torch.cat([inside, later], dim=0)


def _check_weight(weight: torch.Tensor, hessian: torch.Tensor, lazy_cols: int, damp: float):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight: expected a 2-D float tensor (out, in), got {getattr(weight, 'shape', type(weight))}"
        )
    n_in = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (n_in, n_in):
        raise ValueError(
            f"hessian: expected shape ({n_in}, {n_in}), got {getattr(hessian, 'shape', type(hessian))}"
        )
    if not isinstance(lazy_cols, int) or lazy_cols < 1:
        raise ValueError(f"lazy_cols={lazy_cols!r}: must be a positive int")
    if not damp >= 0:
        raise ValueError(f"damp={damp!r}: must be >= 0")


def check_scale_format(scale_format: str) -> None:
    """Element-grid formats (mx, nvfp4) round in their own grid (ties to even, two-level
    scales), not by the normalised nearest-code step this GPTQ reproduces: refused rather
    than silently quantized by another rule."""
    if scale_format in ELEMENT_FORMATS:
        raise ValueError(
            f"scale_format={scale_format!r} with GPTQ: element-grid formats "
            f"({', '.join(ELEMENT_FORMATS)}) are not implemented; allowed: "
            f"{', '.join(n for n in SCALE_FORMATS if n not in ELEMENT_FORMATS)}"
        )


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    dtype: str,
    bits: int,
    block_size: int | None,
    scale_format: str = "fp16",
    centering: bool = False,
    dtype_overrides: dict[str, Any] | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    lazy_cols: int = 128,
) -> torch.Tensor:
    """GPTQ-quantize one weight (out, in) given its Hessian (in, in); returns the fake-quantized
    weight (same shape and dtype). See the module docstring for when block scales are fixed.

    ``act_order``: quantize columns in order of decreasing H_ii (the inputs with the most
    energy first, while the most columns are left to absorb their error). Scales are then
    *static*: every block's scale and mean come from the weight before any update (after
    dead-column zeroing), since a block's columns are no longer visited together.
    ``lazy_cols``: columns per lazy batch (speed only; the result is the same up to float
    summation order).
    """
    _check_weight(weight, hessian, lazy_cols, damp)
    check_scale_format(scale_format)
    w, h = prepare_hessian(weight, hessian, damp)
    rounder = make_rounder(
        w, dtype, bits, block_size, scale_format=scale_format, centering=centering,
        dtype_overrides=dtype_overrides,
    )  # fmt: skip
    stats = initial_stats(w, rounder)
    triggers = block_triggers(w.shape, block_size)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h, triggers = w[:, perm], h[perm][:, perm], {}
        stats = BlockStats(
            stats.scale[:, perm], None if stats.mean is None else stats.mean[:, perm]
        )
    q = gptq_columns(w, inverse_cholesky(h), rounder, stats, triggers, lazy_cols)
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    if not bool(torch.isfinite(q).all()):
        raise FloatingPointError("GPTQ produced NaN/inf weights (check the Hessian)")
    return q.to(weight.dtype)


def relative_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - Q X||_F / ||W X||_F from H ∝ X^T X: sqrt(tr(D H D^T) / tr(W H W^T)), D = W - Q."""
    w = weight.detach().to(torch.float64)
    d = w - quantized.detach().to(torch.float64)
    h = hessian.detach().to(device=w.device, dtype=torch.float64)
    num = float(((d @ h) * d).sum())
    den = float(((w @ h) * w).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else math.nan


# ----------------------------------------------------------------------------- calibration
def calibration_ids(
    tokenizer_or_ids: Any, text: str | None, n_samples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """(n_samples, seqlen) random token windows of ``text``: GPTQ's calibration protocol.

    ``tokenizer_or_ids``: a tokenizer (``text`` is tokenized whole), or the 1-D token ids
    themselves (``text`` ignored). Window starts are uniform in [0, n - seqlen - 1] from a
    generator seeded with ``seed``, so a calibration set is reproducible from its config.
    """
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids = tokenizer_or_ids.reshape(-1).long()
    else:
        if not isinstance(text, str):
            raise ValueError("text: a string is needed when a tokenizer is given")
        ids = torch.as_tensor(tokenizer_or_ids(text).input_ids, dtype=torch.long).reshape(-1)
    if n_samples < 1 or seqlen < 1:
        raise ValueError(f"n_samples={n_samples}, seqlen={seqlen}: both must be >= 1")
    if ids.numel() < seqlen + 1:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens; need at least seqlen + 1 = "
            f"{seqlen + 1} for one window of seqlen={seqlen} (use more text or a shorter seqlen)"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


# ----------------------------------------------------------------------------- model level
class _Stop(Exception):
    """Raised by the capture hook of the last decoder layer: nothing after it needs to run."""


class HessianAccumulator:
    """Running H = 2/N sum_t x_t x_t^T over every token row fed to a linear layer."""

    def __init__(self, n_in: int, device: torch.device) -> None:
        self.h = torch.zeros(n_in, n_in, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.h.device, dtype=torch.float32)
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2 / self.n)
        self.h += x.T @ x


class _Interner:
    """Keeps one copy of equal tensors among the captured layer inputs.

    Layers of one kind get the very same mask and rotary tensors, and every calibration
    window of the same length (no padding) gets equal ones, so per-layer, per-sample inputs
    cost about one set of each kind in memory, not n_layers x n_samples.
    """

    def __init__(self) -> None:
        self._kept: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            key = (tuple(obj.shape), tuple(obj.stride()), obj.dtype, obj.device, obj.layout)
            kept = self._kept.setdefault(key, [])
            for other in kept:
                if other is obj or torch.equal(other, obj):
                    return other
            kept.append(obj)
            return obj
        if isinstance(obj, tuple):
            return tuple(self(o) for o in obj)
        if isinstance(obj, list):
            return [self(o) for o in obj]
        if isinstance(obj, dict):
            return {k: self(v) for k, v in obj.items()}
        return obj


@dataclass
class LayerInputs:
    """What the decoder layers received in an unquantized forward of every calibration window.

    ``hidden``: layer 0's hidden states, one per window (the later layers' hidden states are
    recomputed layer by layer from the quantized layers, as GPTQ needs). ``others``: per layer,
    per window, that layer's own (args, kwargs) with the hidden state taken out (``None`` in
    its place): attention masks, position embeddings, position ids, cache positions. Layers
    differ here (sliding-window vs global attention, local vs global rotary bases), so each
    layer is replayed with its own.
    """

    hidden: list[torch.Tensor]
    others: list[list[tuple[tuple, dict]]]

    def for_layer(self, index: int, hidden: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
        """(args, kwargs) to call layer ``index`` with, one per window, given its hidden states."""
        return [
            _with_hidden(args, kwargs, h)
            for (args, kwargs), h in zip(self.others[index], hidden, strict=True)
        ]


def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, calibration: torch.Tensor
) -> LayerInputs:
    """Every decoder layer's own inputs, as the model's forward passes them, per window.

    One forward per calibration window with a pre-hook on every layer (the forward stops at
    the last layer; the LM head never runs). Only layer 0's hidden states are kept; equal
    tensors among the rest are kept once (:class:`_Interner`).
    """
    intern = _Interner()
    hidden: list[torch.Tensor] = []
    others: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
    last = len(layers) - 1

    def hook(index: int):
        def capture(_mod, args, kwargs):
            if index == 0:
                hidden.append(_hidden(args, kwargs))
            others[index].append(intern(_with_hidden(args, dict(kwargs), None)))
            if index == last:
                raise _Stop

        return capture

    handles = [
        layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    device = input_device(model)
    try:
        for row in calibration:
            with contextlib.suppress(_Stop):
                model(row.unsqueeze(0).to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(hidden) != len(calibration) or any(len(o) != len(hidden) for o in others):
        raise RuntimeError(
            "gptq: the model's forward did not call every decoder layer once per window "
            f"({len(hidden)} windows, calls per layer {[len(o) for o in others]})"
        )
    return LayerInputs(hidden, others)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor | None) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _moved(obj: Any, device: torch.device, memo: dict[int, torch.Tensor]) -> Any:
    """``obj`` with its tensors on ``device``; a tensor shared by many windows moves once."""
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_moved(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_moved(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _moved(v, device, memo) for k, v in obj.items()}
    return obj


def _run_layer(layer: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    outs = []
    for args, kwargs in inputs:
        out = layer(*args, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _layer_hessians(
    layer: nn.Module, targets: dict[str, nn.Module], inputs: list[tuple[tuple, dict]]
) -> dict[str, torch.Tensor]:
    """H of every target linear of one decoder layer over all calibration inputs."""
    accs = {
        name: HessianAccumulator(linear_weight(m).shape[1], m.weight.device)
        for name, m in targets.items()
    }
    handles = [
        m.register_forward_hook(lambda _m, inp, _out, acc=accs[name]: acc.add(inp[0]))
        for name, m in targets.items()
    ]
    try:
        _run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return {name: acc.h for name, acc in accs.items()}


def _write_weight(module: nn.Module, quantized: torch.Tensor) -> None:
    """Write a Linear-layout result into the module (transposed back for Conv1D)."""
    linear_weight(module).copy_(quantized.to(module.weight.dtype))


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    modules: dict[str, nn.Module],
    calibration: torch.Tensor,
    *,
    dtype: str,
    bits: int,
    block_size: int | None,
    scale_format: str = "fp16",
    centering: bool = False,
    dtype_overrides: dict[str, Any] | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """GPTQ every module of ``modules`` in place, decoder layer by decoder layer; returns
    {module name: relative reconstruction error ||W X - Q X||_F / ||W X||_F}.

    Sequential, as GPTQ: layer i's Hessians are accumulated on the outputs of the
    *already quantized* layers 0..i-1, so later layers compensate earlier errors. Every
    layer's own inputs (args and kwargs: attention masks, position embeddings, position ids,
    cache positions) are captured first, in one unquantized forward per window
    (:func:`capture_layer_inputs`): models whose layers differ (Gemma 2/3 and Qwen2
    sliding-window layers, local and global rotary bases) get each layer replayed with its
    own, never with layer 0's. Then each layer is run twice per sample: once to accumulate H
    of its linears (all from the unquantized layer, GPTQ's default), once after quantization
    to make the next layer's hidden states. ``calibration``: (n_samples, seqlen) token ids (see :func:`calibration_ids`).
    Device-agnostic: token ids go to the input embedding's device, and each layer's inputs
    (hidden states, masks, position embeddings) are moved to the device that layer lives on,
    so a model sharded over several GPUs is quantized layer by layer on each GPU.

    Modules outside the decoder layers (embeddings, LM head) have no layer inputs here and
    fall back to round-to-nearest (:func:`fake_quantize`), before the layers, so layer 0's
    captured inputs already come from quantized embeddings; their entry is the relative
    weight error ||W - Q||_F / ||W||_F (the reconstruction error for X = I).
    """
    kw = dict(
        dtype=dtype, bits=bits, block_size=block_size, scale_format=scale_format,
        centering=centering, dtype_overrides=dtype_overrides,
    )  # fmt: skip
    check_scale_format(scale_format)
    prefix, layers = decoder_layers(model)
    errors: dict[str, float] = {}
    per_layer: list[dict[str, nn.Module]] = [{} for _ in layers]
    for name, module in modules.items():
        index = _layer_index(name, prefix)
        if index is None:
            with on_device(module.weight.device):
                errors[name] = _rtn_module(module, kw)
        else:
            per_layer[index][name] = module
    captured = capture_layer_inputs(model, layers, calibration)
    hidden, captured.hidden = captured.hidden, []
    for index, layer in enumerate(layers):
        start = time.perf_counter()
        device = module_device(layer)  # sharded models: each layer's inputs go to its GPU
        hidden = [h.to(device) for h in hidden]
        inputs = _moved(captured.for_layer(index, hidden), device, {})
        captured.others[index] = []  # this layer's own inputs are not needed again
        with on_device(device):
            if per_layer[index]:
                hessians = _layer_hessians(layer, per_layer[index], inputs)
                for name, module in per_layer[index].items():
                    errors[name] = _gptq_module(module, hessians.pop(name), kw, damp, act_order)
            if index + 1 < len(layers):
                hidden = _run_layer(layer, inputs)
            del inputs
        if progress:
            log.info(
                "gptq layer %d/%d in %.2fs", index + 1, len(layers), time.perf_counter() - start
            )
    return {name: errors[name] for name in modules}


def _layer_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    return int(name[len(prefix) + 1 :].split(".", 1)[0])


def _gptq_module(
    module: nn.Module, hessian: torch.Tensor, kw: dict[str, Any], damp: float, act_order: bool
) -> float:
    weight = linear_weight(module).detach().to(torch.float32).clone()
    quantized = gptq_quantize_weight(weight, hessian, damp=damp, act_order=act_order, **kw)
    _write_weight(module, quantized)
    return relative_error(weight, quantized, hessian)


def _rtn_module(module: nn.Module, kw: dict[str, Any]) -> float:
    weight = linear_weight(module).detach().to(torch.float32).clone()
    overrides = kw.get("dtype_overrides") or {}
    quantized = fake_quantize(
        weight, kw["dtype"], kw["bits"], kw["block_size"], scale_format=kw["scale_format"],
        centering=kw["centering"], **overrides,
    )  # fmt: skip
    _write_weight(module, quantized)
    return float(torch.linalg.norm(weight - quantized) / torch.linalg.norm(weight))
