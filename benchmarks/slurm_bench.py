"""Packed Slurm jobs vs one cell per job vs in-process, side by side on the local cluster.

    python benchmarks/slurm_bench.py                       # the demo sweep (build: kbit-zoo zoo=demo)
    python benchmarks/slurm_bench.py --sweep micro --set eval.limit=50 --set 'hydra.sweeper.params.model=zoo:micro/l2d64'

Runs the same grid three times into fresh results folders, one after the other on an otherwise
idle machine:

==============  =======================================================================
in-process      Hydra's basic launcher: every cell in this process, each model loaded once
packed          ``hydra/launcher=slurm``: one job per model chunk (``hydra.sweeper.jobs``)
one per job     ``hydra/launcher=slurm hydra.sweeper.jobs.cells_per_job=1``: every cell a job
==============  =======================================================================

and prints wall time, model loads (cells with ``model_reused`` false in the store), scheduler
jobs (distinct ``job_id``) and the ratios packed / in-process (target <= 1.2) and one-per-job /
packed (what packing saves). Every Slurm job asks for all CPUs of the node (``--cpus``), the
threads the in-process run has, so the three runs have the same machine. Needs the local
cluster: ``sudo python -m harness.cluster.slurm up``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def kbit_run(args: list[str], log: Path) -> tuple[int, float]:
    """``kbit-run --multirun ARGS``; (exit status, wall seconds)."""
    exe = shutil.which("kbit-run") or str(Path(sys.executable).parent / "kbit-run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    tic = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run([exe, "--multirun", *args], env=env, stdout=out, stderr=out).returncode
    return rc, time.perf_counter() - tic


def store_counts(results: Path, sweep: str) -> dict[str, int]:
    """Cells, ok cells, model loads and scheduler jobs, read from the store only."""
    from harness.records import read_store

    rows = read_store(results, sweep).to_pylist()
    cells = {r["cell_id"]: r for r in rows}
    return {
        "cells": len(cells),
        "ok": sum(r["status"] == "ok" for r in cells.values()),
        "loads": sum(not r["model_reused"] for r in cells.values()),
        "jobs": len({r["job_id"] for r in cells.values() if r["job_id"]}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="demo", help="a sweeps/<name>.yaml overlay")
    parser.add_argument("--set", action="append", default=[], help="extra override (repeatable)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs per job")
    parser.add_argument("--cells-per-job", type=int, default=None, help="packed chunk cap")
    parser.add_argument("--partition", default="debug")
    parser.add_argument("--keep", action="store_true", help="keep the results folders")
    args = parser.parse_args()

    from harness.cluster import slurm

    if not slurm.is_up():
        print("the local Slurm is not up: sudo python -m harness.cluster.slurm up", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="kbit-slurm-bench-"))
    name = f"kbit-bench-{uuid.uuid4().hex[:6]}"
    common = [f"+sweeps@_global_={args.sweep}", *args.set]
    slurm_args = [
        "hydra/launcher=slurm", f"hydra.launcher.partition={args.partition}",
        f"hydra.launcher.name={name}", f"hydra.launcher.cpus_per_task={args.cpus}",
        "hydra.launcher.mem_gb=4", "hydra.launcher.wait=true", "hydra.launcher.poll_s=2",
    ]  # fmt: skip
    packed = [*slurm_args]
    if args.cells_per_job:
        packed.append(f"hydra.sweeper.jobs.cells_per_job={args.cells_per_job}")
    variants = {
        "in-process": [],
        "packed": packed,
        "one per job": [*slurm_args, "hydra.sweeper.jobs.cells_per_job=1"],
    }
    results: dict[str, dict] = {}
    for label, extra in variants.items():
        folder = work / label.replace(" ", "_")
        rc, wall = kbit_run([*common, f"results_dir={folder}", *extra], work / f"{folder.name}.log")
        sweeps = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        counts = (
            store_counts(folder, sweeps[0])
            if sweeps
            else {"cells": 0, "ok": 0, "loads": 0, "jobs": 0}
        )
        results[label] = {"rc": rc, "wall_s": wall, **counts}
        print(f"{label:12s} rc={rc} wall {wall:8.1f} s  cells {counts['cells']:4d} "
              f"(ok {counts['ok']:4d})  model loads {counts['loads']:4d}  jobs {counts['jobs']:4d}",
              flush=True)  # fmt: skip
    base, pack, single = (results[k] for k in variants)
    print()
    print(
        f"packed / in-process wall time:    {pack['wall_s'] / base['wall_s']:.2f}x (target <= 1.2)"
    )
    print(f"one-per-job / packed wall time:   {single['wall_s'] / pack['wall_s']:.2f}x")
    print(f"model loads: in-process {base['loads']}, packed {pack['loads']}, "
          f"one per job {single['loads']}")  # fmt: skip
    same = all(r["cells"] == base["cells"] and r["ok"] == r["cells"] for r in results.values())
    print(f"every run stored all {base['cells']} cells ok: {same}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"results and logs kept in {work}")
    return 0 if same and all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
