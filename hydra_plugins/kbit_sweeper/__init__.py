"""Hydra discovers sweepers only under the ``hydra_plugins`` namespace; the code lives in harness.sweep.sweeper."""

from harness.sweep.sweeper import KbitSweeper as _Planner


class KbitSweeper(_Planner):
    """``hydra/sweeper=kbit``: see :class:`harness.sweep.sweeper.KbitSweeper`."""


__all__ = ["KbitSweeper"]
