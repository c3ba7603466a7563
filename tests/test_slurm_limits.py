"""Slurm's submission limits: reading them, splitting jobs into arrays the cluster accepts,
refusing a sweep that cannot fit, and ``slurm up --max-array-size`` (which CI sets to 20).

Most tests need no cluster. The ``slurm`` ones use the real single-node cluster and bring it up
like tests/test_slurm.py does (skipping only when Slurm cannot be installed here).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from harness.cluster import limits, slurm
from harness.cluster import slurm_conf as sc
from harness.cluster.limits import ClusterLimits, array_slices, submission_problem

# `scontrol show config` of Slurm 22.05 (excerpt, format verbatim: aligned `Key = Value`, a dated
# header, "(null)" and empty values, keys with brackets, values holding `=`, a plugin section and
# the controller status line at the end).
SCONTROL_22_05 = """\
Configuration data as of 2026-11-30T08:30:28
AccountingStorageBackupHost = (null)
AccountingStorageEnforce = associations,limits,qos
AccountingStorageHost   = localhost
AccountingStorageTRES   = cpu,mem,energy,node,billing,fs/disk,vmem,pages
AccountingStorageType   = accounting_storage/slurmdbd
AcctGatherNodeFreq      = 0 sec
BOOT_TIME               = 2026-11-30T08:30:00
ClusterName             = kbit
DefMemPerCPU            = 5423
MaxArraySize            = 1001
MaxDBDMsgs              = 20004
MaxJobCount             = 10000
MaxJobId                = 67043328
MaxMemPerNode           = UNLIMITED
MinJobAge               = 300 sec
PowerPlugin             = \n\
SchedulerParameters     = bf_interval=30,max_array_tasks=400
SlurmctldHost[0]        = vm(localhost)
SLURM_VERSION           = 22.05.8
TaskPluginParam         = (null type)

Cgroup Support Configuration:
CgroupMountpoint        = /sys/fs/cgroup
ConstrainCores          = no

Slurmctld(primary) at vm is UP
"""


def test_parse_scontrol_config_reads_every_key_value_line():
    config = limits.parse_scontrol_config(SCONTROL_22_05)
    assert config["MaxArraySize"] == "1001" and config["MaxJobCount"] == "10000"
    assert config["SchedulerParameters"] == "bf_interval=30,max_array_tasks=400"
    assert config["SlurmctldHost[0]"] == "vm(localhost)"
    assert config["PowerPlugin"] == "" and config["MinJobAge"] == "300 sec"
    assert config["CgroupMountpoint"] == "/sys/fs/cgroup"
    assert not any(
        key.startswith(("Configuration", "Cgroup Support", "Slurmctld(")) for key in config
    )
    n_pairs = sum(1 for line in SCONTROL_22_05.splitlines() if " = " in line or line.endswith(" ="))
    assert len(config) == n_pairs


def test_array_size_limit_takes_max_array_tasks_when_smaller():
    config = limits.parse_scontrol_config(SCONTROL_22_05)
    assert limits.array_size_limit(config) == 400  # max_array_tasks=400 < MaxArraySize 1001
    assert limits.array_size_limit({"MaxArraySize": "50", "SchedulerParameters": "(null)"}) == 50
    assert limits.array_size_limit({}) is None
    assert limits.limits_enforced(config)
    assert not limits.limits_enforced({"AccountingStorageEnforce": "none"})
    assert limits.limits_enforced({"AccountingStorageEnforce": "safe"})


@pytest.mark.parametrize("n_jobs", [0, 1, 49, 50, 51, 99, 100, 101, 367])
@pytest.mark.parametrize("max_size", [1, 50, None])
def test_array_slices_cover_every_index_once_in_order_within_the_limit(n_jobs, max_size):
    slices = array_slices(n_jobs, max_size)
    assert [i for part in slices for i in part] == list(range(n_jobs))  # all, once, consecutive
    assert all(len(part) >= 1 and part.step == 1 for part in slices)
    if max_size is not None:
        assert all(len(part) <= max_size for part in slices)
        assert len(slices) == -(-n_jobs // max_size)  # no more arrays than needed
    else:
        assert len(slices) == (1 if n_jobs else 0)


def test_array_slices_edge_cases():
    assert array_slices(0, 50) == [] and array_slices(0, None) == []
    assert array_slices(1, 50) == [range(0, 1)]
    assert array_slices(50, 50) == [range(0, 50)]  # indices 0..49: MaxArraySize 50 allows them
    assert array_slices(51, 50) == [range(0, 50), range(50, 51)]
    assert array_slices(1000, None) == [range(0, 1000)]
    with pytest.raises(ValueError, match="disabled"):
        array_slices(3, 0)
    with pytest.raises(ValueError):
        array_slices(-1, 50)


def test_submission_problem_names_the_limit_and_the_numbers():
    limited = ClusterLimits(
        max_array_size=50, max_job_count=10000, max_submit_jobs=100, jobs_queued=30
    )
    assert submission_problem(70, limited) is None  # 70 + 30 == 100 fits
    message = submission_problem(71, limited)
    assert message is not None
    for part in ("MaxSubmitJobs", "100", "71", "30 already queued", "nothing was queued"):
        assert part in message, message
    assert "cells_per_job" in message and "minutes_per_job" in message
    jobs = ClusterLimits(
        max_array_size=None, max_job_count=500, max_submit_jobs=None, jobs_queued=0
    )
    message = submission_problem(501, jobs)
    assert message and "MaxJobCount" in message and "500" in message and "501" in message


def test_submission_problem_is_none_when_limits_are_unknown():
    unknown = ClusterLimits(None, None, None, None)
    assert submission_problem(10**6, unknown) is None
    no_queue = ClusterLimits(None, None, max_submit_jobs=10, jobs_queued=None)
    message = submission_problem(11, no_queue)
    assert message and "none known queued" in message


def _fake_bin(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_read_limits_never_raises_without_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol, sacctmgr or squeue at all
    assert limits.read_limits(timeout=5) == ClusterLimits(None, None, None, None)


def test_read_limits_from_the_commands(tmp_path, monkeypatch):
    (tmp_path / "config.txt").write_text(SCONTROL_22_05)
    _fake_bin(tmp_path, "scontrol", f"cat {tmp_path / 'config.txt'}")
    _fake_bin(
        tmp_path,
        "sacctmgr",
        'case "$*" in *assoc*) printf "200|\\n|normal\\n";; *qos*) echo 150;; esac',
    )
    _fake_bin(tmp_path, "squeue", 'printf "12_0\\n12_1\\n13\\n"')
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    got = limits.read_limits(timeout=5)
    assert got == ClusterLimits(
        max_array_size=400, max_job_count=10000, max_submit_jobs=150, jobs_queued=3
    )
    (tmp_path / "config.txt").write_text(SCONTROL_22_05.replace("associations,limits,qos", "none"))
    assert limits.read_limits(timeout=5).max_submit_jobs is None  # limits not enforced


def test_slurm_conf_with_and_without_max_array_size():
    node = "NodeName=localhost CPUs=2 RealMemory=21693 State=UNKNOWN"
    plain = sc.slurm_conf(node, def_mem_per_cpu=5000)
    assert "MaxArraySize" not in plain and sc.max_array_size_of(plain) is None
    limited = sc.slurm_conf(node, def_mem_per_cpu=5000, max_array_size=50)
    assert limited.startswith(sc.MARKER)
    assert "MaxArraySize=50\n" in limited and sc.max_array_size_of(limited) == 50
    assert limited.replace("MaxArraySize=50\n", "") == plain  # nothing else changes
    changed = sc.with_max_array_size(limited, 1001)
    assert sc.max_array_size_of(changed) == 1001 and changed.count("MaxArraySize") == 1
    assert sc.with_max_array_size(limited, None) == plain
    assert sc.max_array_size_of("maxarraysize=7  # comment\n") == 7  # slurm.conf keys ignore case
    assert sc.with_max_array_size("MAXARRAYSIZE=7\n", 9) == "MaxArraySize=9\n"


def test_cli_max_array_size_flag(monkeypatch):
    calls = []
    monkeypatch.setattr(slurm, "up", lambda max_array_size=None: calls.append(max_array_size))
    assert slurm.main(["up", "--max-array-size", "50"]) == 0
    assert slurm.main(["up"]) == 0
    assert calls == [50, None]
    for bad in (["status", "--max-array-size", "5"], ["up", "--max-array-size", "0"]):
        with pytest.raises(SystemExit) as exc:
            slurm.main(bad)
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        slurm.main(["up", "--max-array-size", "lots"])


def test_up_changes_max_array_size_only_when_asked(monkeypatch):
    changed = []
    monkeypatch.setattr(slurm, "is_up", lambda: True)
    monkeypatch.setattr(slurm, "node_state", lambda: "idle")
    monkeypatch.setattr(slurm, "effective_max_array_size", lambda timeout=10: 50)
    monkeypatch.setattr(slurm, "_written_max_array_size", lambda: 50)
    monkeypatch.setattr(slurm, "set_max_array_size", changed.append)
    monkeypatch.setattr(slurm, "enforces_max_array_size", lambda n: n == 50)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    slurm.up()  # no flag: keep what is configured
    slurm.up(max_array_size=50)  # already so: no-op
    slurm.up(max_array_size=1001)
    assert changed == [1001]


def test_set_max_array_size_never_touches_a_foreign_slurm_conf(tmp_path, monkeypatch):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=site\nMaxArraySize=5000\n")
    monkeypatch.setattr(slurm, "SLURM_CONF", conf)
    monkeypatch.setattr(slurm, "_run", lambda *a, **k: pytest.fail("must not run scontrol"))
    with pytest.raises(slurm.SlurmSetupError, match="not written by kbit"):
        slurm.set_max_array_size(50)
    assert conf.read_text() == "ClusterName=site\nMaxArraySize=5000\n"


def test_set_max_array_size_rewrites_and_restarts_slurmctld(tmp_path, monkeypatch):
    """scontrol shows a reconfigured MaxArraySize but slurmctld 22.05 enforces the old one
    until restarted: the limit is probed, and slurmctld restarted when it is not enforced."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(sc.slurm_conf("NodeName=localhost CPUs=2", def_mem_per_cpu=500))
    monkeypatch.setattr(slurm, "SLURM_CONF", conf)
    enforced = {"size": 1001}
    restarts = []

    def restart():
        restarts.append(1)
        enforced["size"] = sc.max_array_size_of(conf.read_text())  # a restart reads the file

    monkeypatch.setattr(slurm, "_restart_slurmctld", restart)
    monkeypatch.setattr(slurm, "_array_accepted", lambda last: last < enforced["size"])
    monkeypatch.setattr(slurm, "effective_max_array_size", lambda timeout=10: 50)
    slurm.set_max_array_size(50)
    assert restarts == [1] and enforced["size"] == 50
    assert sc.max_array_size_of(conf.read_text()) == 50 and sc.MARKER in conf.read_text()
    slurm.set_max_array_size(50)  # enforced already: no restart
    assert restarts == [1]


# --- the real cluster -------------------------------------------------------------------------

CI_MAX_ARRAY_SIZE = 20  # .ci/run brings the cluster up with this; the live test leaves it so


@pytest.fixture(scope="module")
def cluster() -> None:
    """The local cluster, brought up as tests/test_slurm.py does; skips only if it cannot be."""
    if slurm.is_up():
        return
    if os.geteuid() != 0:
        pytest.skip(
            "Slurm is not up and bringing it up needs root: sudo python -m harness.cluster.slurm up"
        )
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    slurm.up()  # raises (the test errors, not skips) if a root machine with apt cannot bring it up


def _scontrol_value(key: str) -> str:
    """``key`` from ``scontrol show config`` by grep/sed: independent of parse_scontrol_config."""
    out = subprocess.run(
        ["sh", "-c", f"scontrol show config | sed -n 's/^{key} *= *//p'"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.slurm
@pytest.mark.slow
def test_read_limits_agrees_with_scontrol(cluster):
    got = limits.read_limits()
    assert "max_array_tasks" not in _scontrol_value("SchedulerParameters")
    assert got.max_array_size == int(_scontrol_value("MaxArraySize"))
    assert got.max_job_count == int(_scontrol_value("MaxJobCount"))
    assert got.jobs_queued is not None and got.jobs_queued >= 0
    text = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, check=True
    ).stdout
    pairs = [line for line in text.splitlines() if " = " in line or line.rstrip().endswith(" =")]
    assert len(limits.parse_scontrol_config(text)) == len(pairs)  # every Key = Value line read


def _sbatch_array(spec: str, cwd: Path) -> subprocess.CompletedProcess:
    """Submit a held array (it never takes the node from other tests) and cancel it at once."""
    res = subprocess.run(
        [
            *("sbatch", "--parsable", "--hold", f"--array={spec}", "--output=/dev/null"),
            *("--job-name=kbit-limits-test", "--wrap", "true"),
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
    )
    if res.returncode == 0:
        subprocess.run(["scancel", res.stdout.strip().split(";")[0]], check=True)
    return res


@pytest.mark.slurm
@pytest.mark.slow
def test_up_sets_max_array_size_and_slurm_enforces_it(cluster, tmp_path):
    if os.geteuid() != 0 and slurm.effective_max_array_size() != CI_MAX_ARRAY_SIZE:
        pytest.skip("changing MaxArraySize needs root")
    slurm.up(max_array_size=CI_MAX_ARRAY_SIZE)  # leaves the cluster as CI wants it
    assert slurm.effective_max_array_size() == CI_MAX_ARRAY_SIZE
    assert limits.read_limits().max_array_size == CI_MAX_ARRAY_SIZE
    refused = _sbatch_array(f"0-{CI_MAX_ARRAY_SIZE}", tmp_path)
    assert refused.returncode != 0 and "Invalid job array specification" in refused.stderr
    accepted = _sbatch_array(f"0-{CI_MAX_ARRAY_SIZE - 1}", tmp_path)
    assert accepted.returncode == 0, accepted.stderr
    slurm.up()  # no flag on an up cluster: the limit stays
    assert slurm.effective_max_array_size() == CI_MAX_ARRAY_SIZE
