"""The configuration files of a single-node Slurm with real accounting (slurmdbd + MariaDB).

Kept apart from the bring-up logic so the files can be read (and tested) as plain text. Every
file starts with :data:`MARKER`, which is how :mod:`harness.cluster.slurm` tells a file it wrote
(safe to rewrite) from a real cluster's configuration (never touched).
"""

from __future__ import annotations

import re

MARKER = "# Written by kbit: python -m harness.cluster.slurm up (single-node test cluster)."
CLUSTER_NAME = "kbit"
PARTITION = "debug"
DB_NAME = "slurm_acct_db"
DB_USER = "slurm"
DB_PASS = "kbit-local-only"  # a local-only database reachable through its unix socket/localhost

# Where Debian's slurm-wlm 22.05 packages look for files.
CONF_DIR = "/etc/slurm"
STATE_DIR = "/var/lib/slurm/slurmctld"
SPOOL_DIR = "/var/lib/slurm/slurmd"
LOG_DIR = "/var/log/slurm"
PID_FILES = {
    "slurmd": "/run/slurmd.pid",
    "slurmctld": "/run/slurmctld.pid",
    "slurmdbd": "/run/slurmdbd.pid",
    "mariadbd": "/run/mysqld/mysqld.pid",
    "munged": "/run/munge/munged.pid",
}


def node_line(hardware: str, memory_margin: float = 0.9) -> str:
    """The ``NodeName=`` line for this machine from ``slurmd -C`` output.

    Why: a node that claims more CPUs or memory than it has is drained by slurmctld, so we
    take the hardware slurmd itself detects, pin the name to ``localhost`` (hostnames of
    containers change), and keep a margin of memory for the OS.
    """
    fields = dict(re.findall(r"(\w+)=(\S+)", hardware))
    keep = ["CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore"]
    parts = ["NodeName=localhost", "NodeAddr=127.0.0.1"]
    parts += [f"{k}={fields[k]}" for k in keep if k in fields]
    memory = int(int(fields.get("RealMemory", "2000")) * memory_margin)
    parts.append(f"RealMemory={memory}")
    parts.append("State=UNKNOWN")
    return " ".join(parts)


def slurm_conf(node: str, def_mem_per_cpu: int, max_array_size: int | None = None) -> str:
    """slurm.conf: one node, one default partition, accounting through slurmdbd.

    ``max_array_size`` writes ``MaxArraySize`` (None: no line, Slurm's default 1001), so tests
    and CI can meet the limit a paper-scale sweep meets on a real cluster with a few hundred cells.
    """
    return with_max_array_size(_base_conf(node, def_mem_per_cpu), max_array_size)


def _base_conf(node: str, def_mem_per_cpu: int) -> str:
    return f"""{MARKER}
ClusterName={CLUSTER_NAME}
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={def_mem_per_cpu}
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation={STATE_DIR}
SlurmdSpoolDir={SPOOL_DIR}
SlurmctldPidFile={PID_FILES["slurmctld"]}
SlurmdPidFile={PID_FILES["slurmd"]}
SlurmctldLogFile={LOG_DIR}/slurmctld.log
SlurmdLogFile={LOG_DIR}/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{node}
PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def max_array_size_of(conf: str) -> int | None:
    """The ``MaxArraySize`` a slurm.conf text sets (keys are case-insensitive), or None."""
    for line in conf.splitlines():
        key, _, value = line.split("#", 1)[0].partition("=")
        if key.strip().lower() == "maxarraysize":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


def with_max_array_size(conf: str, max_array_size: int | None) -> str:
    """slurm.conf text with its ``MaxArraySize`` line replaced (None: removed, Slurm's default).

    Why a text edit, not a rewrite from scratch: changing the limit of a running cluster must
    keep everything else the file says (node hardware was detected when it was written).
    """
    lines = [
        line
        for line in conf.splitlines()
        if line.split("=", 1)[0].strip().lower() != "maxarraysize"
    ]
    if max_array_size is not None:
        at = next((i for i, line in enumerate(lines) if line.startswith("NodeName=")), len(lines))
        lines.insert(at, f"MaxArraySize={max_array_size}")
    return "\n".join(lines) + "\n"


def slurmdbd_conf() -> str:
    """slurmdbd.conf: job states in MariaDB, so ``sacct`` (and submitit) see real states."""
    return f"""{MARKER}
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile={LOG_DIR}/slurmdbd.log
PidFile={PID_FILES["slurmdbd"]}
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser={DB_USER}
StoragePass={DB_PASS}
StorageLoc={DB_NAME}
"""


def db_setup_sql() -> str:
    """SQL that creates the accounting database user (idempotent)."""
    return (
        f"CREATE DATABASE IF NOT EXISTS {DB_NAME};"
        f"CREATE USER IF NOT EXISTS '{DB_USER}'@'localhost' IDENTIFIED BY '{DB_PASS}';"
        f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'localhost';"
        "FLUSH PRIVILEGES;"
    )
