"""Perplexity with the GPTQ protocol.

Tokenize the whole text once; cut it into non-overlapping windows of ``seqlen`` tokens,
dropping the tail that does not fill a window; every window is evaluated independently (no
context carried over), and ``ppl = exp(mean NLL over every predicted token)`` (``seqlen - 1``
predictions per window). Because all windows have the same length this equals GPTQ's
``exp(sum(window_mean_nll * seqlen) / (n_windows * seqlen))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from harness.evaluate.datasets import token_ids
from harness.evaluate.timing import ForwardTimer
from harness.placement import input_device

DEFAULT_MAX_SEQLEN = 2048


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean per-token cross-entropy (nats)
    n_tokens: int  # predicted tokens
    n_windows: int
    seqlen: int
    forward_s: float  # seconds inside model forward
    nonfinite: int = 0  # windows whose NLL sum is NaN or inf: the result is not valid
    # mean NLL of each window (nats/token; every window predicts seqlen - 1 tokens, so their
    # mean is ``nll``): the samples of a paired bootstrap between cells on the same text
    window_nll: list[float] = field(default_factory=list)


def default_seqlen(model: nn.Module) -> int:
    """min(model max positions, 2048): the paper's and GPTQ's window."""
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return min(value, DEFAULT_MAX_SEQLEN)
    return DEFAULT_MAX_SEQLEN


def windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """(n_windows, seqlen) non-overlapping windows; the incomplete tail is dropped."""
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen}: need at least 2 tokens per window")
    n = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    n_windows = n // seqlen
    if n_windows == 0:
        raise ValueError(
            f"perplexity: text has {ids.numel()} tokens (max_tokens={max_tokens}), "
            f"fewer than one window of seqlen={seqlen}"
        )
    return ids[: n_windows * seqlen].view(n_windows, seqlen)


_CE_CHUNK_BYTES = 24 << 20  # float32 logits per cross-entropy call: see window_nll_sum


@torch.no_grad()
def window_nll_sums(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (float64) of each window of a batch, logits upcast to float32.

    One value per window so a NaN/inf window is counted, not just propagated into the total.

    The cross-entropy runs over chunks of positions, each at most 24 MB of float32 logits.
    Why: its log-softmax writes a temporary as large as its input. For a whole window of
    a 50k-vocabulary model that is ~100 MB, freshly mapped (page-faulted) on every call.
    Chunks under glibc's 32 MB mmap threshold are recycled by the allocator instead, which
    made this loop ~2.5x faster on CPU. Values are the same per position.
    """
    logits = model(batch, use_cache=False).logits
    targets = batch.to(logits.device)  # a sharded model may return logits on another GPU
    sums = torch.zeros(batch.shape[0], dtype=torch.float64, device=logits.device)
    rows = max(1, _CE_CHUNK_BYTES // (4 * logits.shape[-1]))
    n_pred = batch.shape[1] - 1
    for row in range(batch.shape[0]):
        for start in range(0, n_pred, rows):
            stop = min(n_pred, start + rows)
            loss = F.cross_entropy(
                logits[row, start:stop].float(), targets[row, start + 1 : stop + 1], reduction="sum"
            )
            sums[row] += loss.double()
    return sums


def window_nll_sum(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (float64) of a batch of windows (see :func:`window_nll_sums`)."""
    return window_nll_sums(model, batch).sum()


def _exp(nll: float) -> float:
    """exp without OverflowError; NaN stays NaN (not inf) so a broken model is not "just bad"."""
    if math.isnan(nll):
        return math.nan
    return math.exp(nll) if nll < 700 else math.inf


def perplexity_details(
    model: nn.Module,
    tokenizer: object,
    text: str,
    seqlen: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    *,
    progress: bool = True,
) -> PerplexityResult:
    """GPTQ-protocol perplexity of ``text`` (see module docstring), with counts and timing.

    Never raises on NaN/inf: ``nonfinite`` counts the windows whose NLL is not finite and the
    caller decides (the runner records the cell as failed).
    """
    seqlen = seqlen or default_seqlen(model)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    device = input_device(model)  # the input embedding's device (sharded: the first GPU)
    wins = windows(token_ids(tokenizer, text), seqlen, max_tokens)
    sums = []
    starts = range(0, wins.shape[0], batch_size)
    with ForwardTimer(model) as timer:
        for start in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
            batch = wins[start : start + batch_size].to(device, non_blocking=True)
            sums.append(window_nll_sums(model, batch))
    per_window = torch.cat(sums)
    total = per_window.sum()
    n_tokens = wins.shape[0] * (seqlen - 1)
    nll = float(total) / n_tokens
    return PerplexityResult(
        ppl=_exp(nll),
        nll=nll,
        n_tokens=n_tokens,
        n_windows=wins.shape[0],
        seqlen=seqlen,
        forward_s=timer.seconds,
        nonfinite=int((~torch.isfinite(per_window)).sum()),
        window_nll=(per_window / (seqlen - 1)).tolist(),
    )


def perplexity(
    model: nn.Module,
    tokenizer: object,
    text: str,
    seqlen: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
) -> float:
    """``exp(mean NLL)`` over non-overlapping ``seqlen`` windows of ``text`` (GPTQ protocol)."""
    return perplexity_details(model, tokenizer, text, seqlen, max_tokens, batch_size).ppl
