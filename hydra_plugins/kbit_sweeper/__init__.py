"""Hydra discovers sweepers only under the ``hydra_plugins`` namespace; the code lives in harness.sweep."""

from harness.sweep import KbitSweeper as _Planner


class KbitSweeper(_Planner):
    """``hydra/sweeper=kbit``: see :class:`harness.sweep.KbitSweeper`."""


__all__ = ["KbitSweeper"]
