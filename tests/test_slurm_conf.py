"""The single-node Slurm configuration written by harness.cluster.slurm (no cluster needed)."""

from __future__ import annotations

from harness.cluster import slurm_conf as sc

# `slurmd -C` on a 2-core, 24 GiB machine (Slurm 22.05), verbatim.
SLURMD_C = (
    "NodeName=8f1c2d CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 "
    "RealMemory=24104\nUpTime=0-01:02:03\n"
)


def test_node_line_pins_localhost_and_keeps_a_memory_margin():
    line = sc.node_line(SLURMD_C)
    fields = dict(kv.split("=") for kv in line.split())
    assert fields["NodeName"] == "localhost" and fields["NodeAddr"] == "127.0.0.1"
    assert fields["CPUs"] == "2" and fields["CoresPerSocket"] == "2"
    assert int(fields["RealMemory"]) == int(24104 * 0.9)
    assert "UpTime" not in fields


def test_confs_carry_the_marker_and_real_accounting():
    conf = sc.slurm_conf(sc.node_line(SLURMD_C), def_mem_per_cpu=5000)
    assert conf.startswith(sc.MARKER)
    keys = dict(
        line.split("=", 1) for line in conf.splitlines() if "=" in line and not line.startswith("#")
    )
    # NOTES: without DefMemPerCPU one job claims the whole node; without slurmdbd sacct says UNKNOWN
    assert keys["DefMemPerCPU"] == "5000"
    assert keys["AccountingStorageType"] == "accounting_storage/slurmdbd"
    assert keys["TaskPlugin"] == "task/affinity"
    assert f"PartitionName={sc.PARTITION} Nodes=localhost Default=YES" in conf
    dbd = sc.slurmdbd_conf()
    assert dbd.startswith(sc.MARKER) and f"StoragePass={sc.DB_PASS}" in dbd
    assert sc.DB_NAME in sc.db_setup_sql()
