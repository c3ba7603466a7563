"""Time spent inside model forward passes, for the overhead accounting of a cell.

A pre-hook and a hook on the top module bracket every forward call, whoever makes it (our
perplexity loop or lm-eval). On a GPU both ends synchronise, so the interval covers the
kernels and not just their launch.
"""

from __future__ import annotations

import time
from types import TracebackType

import torch
from torch import nn


class ForwardTimer:
    """Context manager summing wall seconds inside ``model.forward`` into ``.seconds``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.seconds = 0.0
        self.calls = 0
        self._start: float | None = None
        self._handles: list = []
        self._sync = any(p.is_cuda for p in model.parameters())

    def _pre(self, *_: object) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def _post(self, *_: object) -> None:
        if self._sync:
            torch.cuda.synchronize()
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.calls += 1
            self._start = None

    def __enter__(self) -> ForwardTimer:
        self._handles = [
            self.model.register_forward_pre_hook(self._pre),
            self.model.register_forward_hook(self._post),
        ]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
