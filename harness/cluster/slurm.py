"""Bring a real single-node Slurm (munge, MariaDB, slurmdbd, slurmctld, slurmd) up and down.

Why: sweeps must run on the scheduler users have, so the Slurm test submits real jobs to a
real ``slurmctld``; ``slurmdbd`` + MariaDB make ``sacct`` report real job states (without
accounting, submitit sees every job as UNKNOWN). Run as root on a Debian-like machine::

    python -m harness.cluster.slurm up       # idempotent: already up -> no-op
    python -m harness.cluster.slurm up --max-array-size 50   # also (re)sets MaxArraySize
    python -m harness.cluster.slurm status   # exit 0 when jobs can be submitted
    python -m harness.cluster.slurm down     # stop the daemons (by the pids in their pid files)

Missing packages are installed with apt-get. A slurm.conf not written by this module (a real
cluster's) is never touched.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness.cluster import limits
from harness.cluster import slurm_conf as sc

log = logging.getLogger(__name__)

APT_PACKAGES = ["slurm-wlm", "slurmdbd", "mariadb-server", "munge"]
REQUIRED_BINARIES = ["slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sinfo", "sacct"]
STOP_ORDER = ["slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"]
MYSQL_SOCKET = "/run/mysqld/mysqld.sock"
SLURM_CONF = Path(sc.CONF_DIR) / "slurm.conf"


class SlurmSetupError(RuntimeError):
    """The local cluster could not be brought up; the message says what to do."""


def _run(
    cmd: list[str], check: bool = True, timeout: float = 120, **kw
) -> subprocess.CompletedProcess:
    log.debug("$ %s", " ".join(cmd))
    return subprocess.run(cmd, check=check, timeout=timeout, text=True, capture_output=True, **kw)


def _ok(cmd: list[str], timeout: float = 10) -> bool:
    """True when ``cmd`` exits 0 (missing binary or timeout count as failure)."""
    try:
        return _run(cmd, check=False, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _pid_alive(name: str) -> int | None:
    """The pid of daemon ``name`` from its pid file if that process is alive, else None."""
    try:
        pid = int(Path(sc.PID_FILES[name]).read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def _wait(what: str, predicate: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise SlurmSetupError(f"timed out after {timeout:.0f}s waiting for {what}; see {sc.LOG_DIR}/")


def node_state() -> str | None:
    """State of the local node as sinfo reports it (idle, mixed, allocated, down, ...), or None."""
    try:
        res = _run(["sinfo", "-h", "-N", "-o", "%T"], check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = res.stdout.split()
    return states[0].rstrip("*~#") if res.returncode == 0 and states else None


def accounting_ok() -> bool:
    """True when slurmdbd answers and knows this cluster (so sacct gives real states)."""
    try:
        res = _run(
            ["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"], check=False, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and sc.CLUSTER_NAME in res.stdout.split()


def is_up() -> bool:
    """Jobs can be submitted and their states are recorded."""
    return node_state() in {"idle", "mixed", "allocated", "completing"} and accounting_ok()


def effective_max_array_size(timeout: float = 10) -> int | None:
    """The MaxArraySize the running slurmctld uses (``scontrol show config``), None if unknown.

    Why not the file: slurm.conf may have been edited without slurmctld reading it again.
    """
    config = limits.read_scontrol_config(timeout) or {}
    try:
        return int(config["MaxArraySize"])
    except (KeyError, ValueError):
        return None


def status() -> dict[str, object]:
    """Daemon pids, node state, accounting and MaxArraySize, for ``status`` and error messages."""
    info: dict[str, object] = {name: _pid_alive(name) for name in STOP_ORDER}
    info["node"] = node_state()
    info["accounting"] = accounting_ok()
    info["max_array_size"] = effective_max_array_size()
    return info


def _ensure_packages() -> None:
    missing = [b for b in REQUIRED_BINARIES if not _which(b)]
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise SlurmSetupError(
            f"Slurm binaries {missing} are missing and apt-get is not available; install "
            f"{' '.join(APT_PACKAGES)} with this system's package manager"
        )
    log.info("installing %s with apt-get (missing: %s)", " ".join(APT_PACKAGES), missing)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], timeout=600, env=env)
    _run(["apt-get", "install", "-y", "-q", *APT_PACKAGES], timeout=900, env=env)
    still = [b for b in REQUIRED_BINARIES if not _which(b)]
    if still:
        raise SlurmSetupError(f"after apt-get install, binaries still missing: {still}")


def _which(binary: str) -> str | None:
    """shutil.which, also looking in sbin folders (not on PATH for every root shell)."""
    return shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _check_not_foreign() -> None:
    conf = SLURM_CONF
    if conf.exists() and sc.MARKER not in conf.read_text():
        raise SlurmSetupError(
            f"{conf} exists and was not written by kbit: this machine has its own Slurm "
            "configuration, which this script never touches. Use that cluster directly "
            "(hydra/launcher=submitit_slurm hydra.launcher.partition=...)."
        )


def _start_munge() -> None:
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        _run([_which("mungekey") or "mungekey", "--create", "--keyfile", str(key)])
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    for folder in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    if _pid_alive("munged") is None:
        _run(["runuser", "-u", "munge", "--", _which("munged") or "munged"])
    _wait("munged", lambda: _ok(["sh", "-c", "munge -n | unmunge"]), timeout=30)


def _start_mariadb() -> None:
    Path("/run/mysqld").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/mysqld", "mysql", "mysql")
    if not Path("/var/lib/mysql/mysql").is_dir():
        _run([_which("mariadb-install-db") or "mariadb-install-db", "--user=mysql"], timeout=300)
    if _pid_alive("mariadbd") is None:
        logfile = open(Path(sc.LOG_DIR) / "mariadbd.log", "ab")  # noqa: SIM115 (the daemon keeps it)
        subprocess.Popen(
            [_which("mariadbd") or "mariadbd", "--user=mysql", f"--pid-file={sc.PID_FILES['mariadbd']}",
             f"--socket={MYSQL_SOCKET}", "--bind-address=127.0.0.1"],
            stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    client = _which("mariadb") or _which("mysql") or "mariadb"
    _wait(
        "MariaDB", lambda: _ok([client, f"--socket={MYSQL_SOCKET}", "-e", "SELECT 1"]), timeout=90
    )
    _run([client, f"--socket={MYSQL_SOCKET}", "-e", sc.db_setup_sql()])


def _written_max_array_size() -> int | None:
    """MaxArraySize of the slurm.conf kbit wrote before (None: none written, or no line)."""
    if not SLURM_CONF.exists() or sc.MARKER not in SLURM_CONF.read_text():
        return None
    return sc.max_array_size_of(SLURM_CONF.read_text())


def _write_configs(max_array_size: int | None) -> None:
    for folder in (sc.CONF_DIR, sc.STATE_DIR, sc.SPOOL_DIR, sc.LOG_DIR):
        Path(folder).mkdir(parents=True, exist_ok=True)
    hardware = _run([_which("slurmd") or "slurmd", "-C"]).stdout
    cpus = int(dict(kv.split("=", 1) for kv in hardware.split() if "=" in kv).get("CPUs", "1"))
    node = sc.node_line(hardware)
    memory = int(node.split("RealMemory=")[1].split()[0])
    def_mem = max(memory // (2 * cpus), 500)
    SLURM_CONF.write_text(sc.slurm_conf(node, def_mem, max_array_size=max_array_size))
    dbd = Path(sc.CONF_DIR) / "slurmdbd.conf"
    dbd.write_text(sc.slurmdbd_conf())
    dbd.chmod(0o600)  # slurmdbd refuses a readable file: it holds the database password


def _start_slurm() -> None:
    if _pid_alive("slurmdbd") is None:
        _run([_which("slurmdbd") or "slurmdbd"])
    _wait("slurmdbd", lambda: _ok(["sacctmgr", "-n", "list", "cluster"]), timeout=90)
    if not accounting_ok():
        _run(["sacctmgr", "-i", "add", "cluster", sc.CLUSTER_NAME], check=False)
    if _pid_alive("slurmctld") is None:
        _run([_which("slurmctld") or "slurmctld"])
    _wait("slurmctld", lambda: _ok(["scontrol", "ping"]), timeout=60)
    if _pid_alive("slurmd") is None:
        _run([_which("slurmd") or "slurmd"])
    _wait("the node to register", lambda: node_state() is not None, timeout=60)
    if node_state() in {"down", "drained", "draining", "unknown"}:
        _run(["scontrol", "update", "nodename=localhost", "state=resume"], check=False)
    _wait("the node to become idle and accounting to answer", is_up, timeout=60)


def set_max_array_size(max_array_size: int) -> None:
    """Write ``MaxArraySize`` into kbit's slurm.conf and make the running slurmctld enforce it.

    Only a slurm.conf carrying :data:`~harness.cluster.slurm_conf.MARKER` is rewritten. Why a
    probe and a restart: on Slurm 22.05 ``scontrol reconfigure`` makes ``scontrol show config``
    print the new value, but slurmctld went on refusing arrays by the limit it started with
    (seen here: 20 shown, ``--array=0-25`` accepted, ``0-50`` refused). So the limit is
    checked by submitting held probe arrays (cancelled at once), and slurmctld is restarted
    when it does not enforce it (running jobs survive a slurmctld restart).
    """
    _check_not_foreign()
    if not SLURM_CONF.exists():
        raise SlurmSetupError(
            f"{SLURM_CONF} does not exist: this Slurm was not set up by kbit, which therefore "
            "does not change its MaxArraySize"
        )
    text = SLURM_CONF.read_text()
    if sc.max_array_size_of(text) != max_array_size:
        log.info("writing MaxArraySize=%d into %s", max_array_size, SLURM_CONF)
        SLURM_CONF.write_text(sc.with_max_array_size(text, max_array_size))
    if effective_max_array_size() == max_array_size and enforces_max_array_size(max_array_size):
        return
    log.info("restarting slurmctld to enforce MaxArraySize=%d", max_array_size)
    _restart_slurmctld()
    if not enforces_max_array_size(max_array_size):
        raise SlurmSetupError(
            f"slurmctld does not enforce MaxArraySize={max_array_size} after a restart; see "
            f"{sc.LOG_DIR}/slurmctld.log"
        )
    log.info("slurmctld now enforces MaxArraySize=%d", max_array_size)


def _array_accepted(last_index: int) -> bool | None:
    """Whether slurmctld accepts a held array ``0-last_index`` (cancelled at once); None when
    sbatch failed for another reason."""
    cmd = ["sbatch", "--parsable", "--hold", f"--array=0-{last_index}", "--output=/dev/null",
           "--job-name=kbit-array-probe", "--wrap", "true"]  # fmt: skip
    try:
        res = _run(cmd, check=False, timeout=30, cwd="/tmp")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode == 0:
        _run(["scancel", res.stdout.strip().split(";")[0]], check=False, timeout=30)
        return True
    return False if "Invalid job array specification" in res.stderr else None


def enforces_max_array_size(max_array_size: int) -> bool:
    """Whether slurmctld accepts an array of ``max_array_size`` tasks and refuses one more."""
    return _array_accepted(max_array_size - 1) is True and _array_accepted(max_array_size) is False


def _restart_slurmctld() -> None:
    """Stop slurmctld (by its pid file) and start it again on the current slurm.conf."""
    pid = _pid_alive("slurmctld")
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        _wait("slurmctld to stop", lambda: _pid_alive("slurmctld") != pid, timeout=60)
    _run([_which("slurmctld") or "slurmctld"])
    _wait("slurmctld", lambda: _ok(["scontrol", "ping"]), timeout=60)
    _wait("the node to become idle and accounting to answer", is_up, timeout=90)


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise SlurmSetupError(
            f"{what} needs root (apt-get, munge, slurmctld, /etc/slurm): "
            "run `sudo python -m harness.cluster.slurm up`"
        )


def up(max_array_size: int | None = None) -> None:
    """Install (if needed) and start a single-node Slurm with accounting. Idempotent.

    ``max_array_size``: the MaxArraySize the cluster must run with; an up cluster with another
    value is reconfigured. None keeps whatever kbit's slurm.conf says (Slurm's default if
    nothing), so a plain ``up`` never undoes a limit set earlier.
    """
    if is_up():
        if max_array_size is None or (
            effective_max_array_size() == max_array_size
            and _written_max_array_size() == max_array_size
            and enforces_max_array_size(max_array_size)
        ):
            log.info("Slurm is already up (node %s, accounting ok): nothing to do", node_state())
            return
        _require_root("changing MaxArraySize")
        set_max_array_size(max_array_size)
        return
    _require_root("Slurm is not up, and bringing it up")
    _check_not_foreign()
    _ensure_packages()
    Path(sc.LOG_DIR).mkdir(parents=True, exist_ok=True)
    _start_munge()
    _start_mariadb()
    keep = _written_max_array_size()
    _write_configs(max_array_size if max_array_size is not None else keep)
    _start_slurm()
    if max_array_size is not None and not enforces_max_array_size(max_array_size):
        set_max_array_size(max_array_size)  # slurmctld was already running with the old file
    log.info(
        "Slurm is up: partition %r on localhost, accounting via slurmdbd, MaxArraySize %s",
        sc.PARTITION,
        effective_max_array_size(),
    )


def down() -> None:
    """Stop the daemons this module started, by the pids in their pid files."""
    _check_not_foreign()
    for name in STOP_ORDER:
        pid = _pid_alive(name)
        if pid is None:
            continue
        log.info("stopping %s (pid %d)", name, pid)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _pid_alive(name) == pid and time.monotonic() < deadline:
            time.sleep(0.2)
        if _pid_alive(name) == pid:
            os.kill(pid, signal.SIGKILL)


def _array_size(text: str) -> int:
    """argparse type for --max-array-size: 1..4000001 (slurm.conf(5); 0 would disable arrays)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 1 <= value <= limits.MAX_ARRAY_SIZE_CEILING:
        raise argparse.ArgumentTypeError(
            f"must be between 1 and {limits.MAX_ARRAY_SIZE_CEILING} (Slurm's ceiling), got {value}"
        )
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.cluster.slurm up [--max-array-size N]|down|status``."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.cluster.slurm", description=__doc__.split("\n")[0]
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument(
        "--max-array-size",
        type=_array_size,
        default=None,
        metavar="N",
        help="up only: MaxArraySize in slurm.conf (array indices 0..N-1); an up cluster with "
        "another value is reconfigured. Default: keep what is configured (Slurm's 1001 if unset)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.max_array_size is not None and args.action != "up":
        parser.error("--max-array-size only goes with `up`")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        if args.action == "up":
            up(max_array_size=args.max_array_size)
        elif args.action == "down":
            down()
        else:
            info = status()
            for key, value in info.items():
                log.info("%-10s %s", key, value)
            return 0 if is_up() else 1
    except (SlurmSetupError, subprocess.CalledProcessError) as err:
        detail = f"\n{err.stderr}" if isinstance(err, subprocess.CalledProcessError) else ""
        log.error("slurm %s failed: %s%s", args.action, err, detail)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
