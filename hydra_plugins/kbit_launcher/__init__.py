"""Hydra discovers launchers only under ``hydra_plugins``; the code is harness.cluster.launcher.

Importing this module (Hydra scans plugins at start-up) registers the schemas that
``conf/hydra/launcher/slurm.yaml`` and ``local.yaml`` build on: hydra-submitit-launcher's,
plus kbit's ``wait``, ``poll_s`` and (Slurm) ``srun_args``.
"""

from hydra.core.config_store import ConfigStore

from harness.cluster.launcher import PackedLocalConf, PackedSlurmConf
from harness.cluster.launcher import PackedLocalLauncher as _Local
from harness.cluster.launcher import PackedSlurmLauncher as _Slurm


class PackedSlurmLauncher(_Slurm):
    """``hydra/launcher=slurm``: see :class:`harness.cluster.launcher.PackedSlurmLauncher`."""


class PackedLocalLauncher(_Local):
    """``hydra/launcher=local``: see :class:`harness.cluster.launcher.PackedLocalLauncher`."""


ConfigStore.instance().store(
    group="hydra/launcher", name="kbit_slurm", node=PackedSlurmConf, provider="kbit"
)
ConfigStore.instance().store(
    group="hydra/launcher", name="kbit_local", node=PackedLocalConf, provider="kbit"
)

__all__ = ["PackedLocalLauncher", "PackedSlurmLauncher"]
