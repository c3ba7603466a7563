"""Perplexity with the GPTQ protocol.

Tokenize the whole text once; cut it into non-overlapping windows of ``seqlen`` tokens,
dropping the tail that does not fill a window; every window is evaluated independently (no
context carried over), and ``ppl = exp(mean NLL over every predicted token)`` (``seqlen - 1``
predictions per window). Because all windows have the same length this equals GPTQ's
``exp(sum(window_mean_nll * seqlen) / (n_windows * seqlen))``.

``eval.limit`` (smoke tests only) keeps the first windows (:func:`limit_windows`); the records'
``n_samples`` is the number of tokens actually scored, so a limited cell says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.evaluate.datasets import load_text, resolve_text_path, text_files, token_ids
from harness.evaluate.timing import ForwardTimer
from harness.models.placement import input_device

DEFAULT_MAX_SEQLEN = 2048
log = logging.getLogger(__name__)


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


_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def default_seqlen(model: nn.Module) -> int:
    """min(model max positions, 2048): the paper's and GPTQ's window."""
    return seqlen_of_config({a: getattr(model.config, a, None) for a in _POSITION_FIELDS})


def seqlen_of_config(config: dict) -> int:
    """:func:`default_seqlen` from a config.json read as a dict (no model needed)."""
    for attr in _POSITION_FIELDS:
        value = config.get(attr)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, DEFAULT_MAX_SEQLEN)
    return DEFAULT_MAX_SEQLEN


_CHARS_PER_TOKEN = 64  # far above any tokenizer's average: a prefix this long is conclusive


def count_tokens(tokenizer: object, text: str, need: int) -> int:
    """The number of tokens of ``text`` as :func:`harness.evaluate.datasets.token_ids` counts
    them, or, for a long text, a count of at least ``need`` + 64 from a prefix cut at a space.

    Why a prefix: validation only needs to know whether one window fits, and tokenizing a
    whole corpus per model would cost seconds per sweep plan. A prefix cut at whitespace
    tokenizes like the start of the full text, up to a token or two at the cut.
    """
    limit = _CHARS_PER_TOKEN * (need + 64)
    if len(text) > limit:
        cut = text[:limit]
        space = max(cut.rfind(" "), cut.rfind("\n"))
        n = len(tokenizer(cut[: space if space > 0 else limit], verbose=False).input_ids)
        if n >= need + 64:
            return n
    return len(tokenizer(text, verbose=False).input_ids)


def window_problem(name: str, where: str, n_tokens: int, seqlen: int,
                   max_tokens: int | None) -> str:  # fmt: skip
    """Why a text gives no perplexity window ("" when it gives one): the rule of
    :func:`windows`, worded for a refusal naming the set, its token count and the window."""
    if max_tokens is not None and max_tokens < seqlen:
        return (f"perplexity dataset {name!r}: max_tokens={max_tokens} is less than one window "
                f"(seqlen={seqlen} tokens); allowed: max_tokens >= seqlen, or null")  # fmt: skip
    if n_tokens < seqlen:
        return (f"perplexity dataset {name!r}: {where} has {n_tokens} tokens, fewer than one "
                f"window of seqlen={seqlen} tokens; allowed: a text of at least {seqlen} "
                f"tokens, or seqlen <= {n_tokens}")  # fmt: skip
    return ""


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


def limit_windows(wins: torch.Tensor, limit: int | float | None) -> torch.Tensor:
    """The first windows that ``eval.limit`` keeps: a count N keeps the first N (all when
    there are fewer), a fraction 0 < f < 1 the first ``ceil(f * n_windows)`` (lm-eval's rule
    for a fraction of a task's examples); None keeps all.

    Why the first ones and not a sample: a limit is for smoke tests, and the first windows
    are the same in every cell on the same text, so limited cells still pair window by window.
    """
    if limit is None:
        return wins
    if isinstance(limit, float) and limit < 1:
        keep = max(1, math.ceil(limit * wins.shape[0]))
    else:
        keep = int(limit)
    if keep < 1:
        raise ValueError(f"limit={limit!r}: allowed: a count >= 1 or a fraction 0 < f < 1")
    return wins[:keep]


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
    limit: int | float | None = None,
    label: str = "perplexity",
) -> PerplexityResult:
    """GPTQ-protocol perplexity of ``text`` (see module docstring), with counts and timing.

    Never raises on NaN/inf: ``nonfinite`` counts the windows whose NLL is not finite and the
    caller decides (the runner records the cell as failed). ``limit`` (``eval.limit``, for
    smoke tests): only the first windows, see :func:`limit_windows`. ``progress``: one quiet
    line on stderr named ``label`` (``harness.progress.StepProgress``).
    """
    from harness.progress import StepProgress

    seqlen = seqlen or default_seqlen(model)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    device = input_device(model)  # the input embedding's device (sharded: the first GPU)
    wins = limit_windows(windows(token_ids(tokenizer, text), seqlen, max_tokens), limit)
    sums = []
    starts = range(0, wins.shape[0], batch_size)
    line = StepProgress(label, wins.shape[0], "windows") if progress else None
    with ForwardTimer(model) as timer, line or contextlib.nullcontext():
        for start in starts:
            batch = wins[start : start + batch_size].to(device, non_blocking=True)
            sums.append(window_nll_sums(model, batch))
            if line is not None:
                line.advance(batch.shape[0])
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


# ------------------------------------------------------------------ validation: one window
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
                    "vocab.json", "merges.txt", "vocab.txt", "special_tokens_map.json")  # fmt: skip
_TOKENIZERS: dict[tuple, object] = {}  # (folder, its tokenizer files' stamps) -> tokenizer
_COUNTS: dict[tuple, int] = {}  # (tokenizer key, text files' stamps, need) -> tokens


def _stamp(files: list[Path]) -> tuple:
    out = []
    for f in files:
        with contextlib.suppress(OSError):
            st = f.stat()
            out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _folder_tokenizer(folder: Path) -> tuple[tuple, object]:
    """(cache key, tokenizer) of a local model folder, loaded once per process per version of
    its tokenizer files; no code from the folder is run (``trust_remote_code=False``)."""
    from transformers import AutoTokenizer

    key = (str(folder), _stamp([folder / n for n in _TOKENIZER_FILES]))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
    return key, _TOKENIZERS[key]


def check_windows(
    entries: Iterable[Any],
    data_root: str | os.PathLike | None,
    model_dir: str | os.PathLike | None,
) -> None:
    """Raise one line when a perplexity set gives no window of ``seqlen`` tokens.

    Why at validation: :func:`windows` raises only after the model has loaded and been
    quantized; the tokenizer is cheap to load (memoised per model folder), and a long text is
    counted on a prefix (:func:`count_tokens`). ``entries``: the ``eval.perplexity`` list
    (``name``, ``path``, ``seqlen``, ``max_tokens``). Checked where the text and the tokenizer
    are both on this machine: a hub text (no ``data_root``) or a hub model id is left to the
    run. ``seqlen: null`` is config.json's max positions capped at 2048 (:func:`default_seqlen`).
    """
    if model_dir is None:
        return
    folder = Path(model_dir)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tok_key: tuple | None = None
    for entry in entries:
        name, max_tokens = str(entry.name), entry.get("max_tokens")
        seqlen = int(entry.get("seqlen") or seqlen_of_config(config))
        early = window_problem(name, "", seqlen, seqlen, max_tokens)
        if early:
            raise ValueError(early)
        resolved = resolve_text_path(name, entry.get("path"), data_root, folder)
        if resolved is None:
            continue
        files = text_files(name, resolved)
        if tok_key is None:
            try:
                tok_key, tokenizer = _folder_tokenizer(folder)
            except Exception as exc:  # any tokenizer failure: leave it to the run
                log.warning("tokenizer of %s not loaded for the window check (%s: %s)",
                            folder, type(exc).__name__, exc)  # fmt: skip
                return
        key = (tok_key, _stamp(files), seqlen)
        if key not in _COUNTS:
            text = load_text(name, entry.get("path"), data_root, folder)
            _COUNTS[key] = count_tokens(tokenizer, text, seqlen)
        where = str(resolved) if len(files) == 1 else f"{resolved} ({len(files)} files)"
        problem = window_problem(name, where, _COUNTS[key], seqlen, None)
        if problem:
            raise ValueError(problem)
