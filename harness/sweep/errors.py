"""The sweep's one error type: a refused sweep (exit 2, one line) or one that did not finish ok.

Why its own module: every stage of a sweep (expand, compose, plan, the sweeper, the outcome)
and ``kbit-download`` raise it, and none of them should import another stage for it.
"""

from __future__ import annotations

from hydra.errors import CompactHydraException


class SweepError(CompactHydraException):
    """A sweep that cannot run as declared (``refused``: nothing was queued or written, exit 2),
    or whose launched cells did not all finish ok (exit 1)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        if refused:  # a refusal is one line on stderr (README "What a cell guarantees")
            message = one_line(message)
        super().__init__(message)
        self.refused = refused


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined with "; " (e.g. a scheduler's multi-line error)."""
    parts = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(p.rstrip(";") for p in parts) if parts else str(text).strip()


# The prefix of every refusal: nothing was queued or written (kbit-download strips it).
NOT_LAUNCHED = "Sweep not launched (nothing was queued or written): "
