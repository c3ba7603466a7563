"""Hydra discovers sweepers only under the ``hydra_plugins`` namespace; the code lives in harness.sweep.plan."""

from harness.sweep.plan import KbitSweeper as _Planner


class KbitSweeper(_Planner):
    """``hydra/sweeper=kbit``: see :class:`harness.sweep.plan.KbitSweeper`."""


__all__ = ["KbitSweeper"]
