"""Packed Slurm jobs vs in-process (and, optionally, one cell per job) on the local cluster.

    python benchmarks/slurm_bench.py                    # the demo sweep (build: kbit-zoo zoo=demo)
    python benchmarks/slurm_bench.py --models 2         # quick: the sweep's first 2 models only
    python benchmarks/slurm_bench.py --one-per-job      # also every cell as its own job (slow)
    python benchmarks/slurm_bench.py --sweep micro --set eval.limit=50 --models 1

Runs the same grid into fresh results folders, one variant after the other:

==============  =======================================================================
in-process      Hydra's basic launcher: every cell in this process, each model loaded once
packed          ``hydra/launcher=slurm``: one job per model chunk (``hydra.sweeper.jobs``)
one per job     ``... hydra.sweeper.jobs.cells_per_job=1``: every cell a job (``--one-per-job``)
==============  =======================================================================

and prints, side by side, wall time, model loads (cells with ``model_reused`` false in the
store), scheduler jobs (distinct ``job_id``) and the ratio packed / in-process (target <= 1.2),
then where the packed run's time went, from the scheduler's and the store's timestamps
(``sacct`` start/end of each job, each cell's ``created_at`` and ``wall_s``): planning and
submitting, each job's queue wait, its start-up (Python, imports, Hydra, before its first
cell began), its cells, and the wait after the last job ended. The machine's load average
is printed before and after each variant: the numbers mean something only on an idle machine.

CPUs: the in-process run uses every core of the node (``--cpus``, default all of them). The
packed jobs share the same cores: ``--job-cpus`` per job (default: the node's cores divided
by the jobs that can run at once, at least 1), and each job runs torch on that many threads
(``harness.cluster.launcher``), so concurrent jobs do not oversubscribe the cores.
``--job-cpus`` equal to ``--cpus`` makes the jobs run one after the other, each with every
core. Needs the local cluster: ``sudo python -m harness.cluster.slurm up``.
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
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"


def kbit_run(args: list[str], log: Path, env: dict[str, str]) -> tuple[int, float, float]:
    """``kbit-run --multirun ARGS``; (exit status, wall seconds, start as a UNIX time)."""
    exe = shutil.which("kbit-run") or str(Path(sys.executable).parent / "kbit-run")
    started = time.time()
    tic = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run([exe, "--multirun", *args], env=env, stdout=out, stderr=out).returncode
    return rc, time.perf_counter() - tic, started


def store_cells(results: Path) -> dict[str, dict]:
    """cell id -> its first row, for the one sweep folder under ``results``."""
    from harness.records import read_store

    sweeps = [p.name for p in results.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not sweeps:
        return {}
    return {r["cell_id"]: r for r in read_store(results, sweeps[0]).to_pylist()}


def counts(cells: dict[str, dict]) -> dict[str, int]:
    return {
        "cells": len(cells),
        "ok": sum(r["status"] == "ok" for r in cells.values()),
        "loads": sum(not r["model_reused"] for r in cells.values()),
        "jobs": len({r["job_id"] for r in cells.values() if r["job_id"]}),
    }


def _unix(stamp: str) -> float | None:
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except (TypeError, ValueError):
        return None


def sacct_times(job_ids: set[str]) -> dict[str, tuple[float, float, float]]:
    """``<array>_<task>`` -> (submit, start, end) as UNIX times, from ``sacct``."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    if not arrays:
        return {}
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", ",".join(arrays), "-o", "JobID,Submit,Start,End"],
        capture_output=True, text=True,
    )  # fmt: skip
    times = {}
    for line in out.stdout.splitlines():
        parts = line.split("|")
        if len(parts) != 4:
            continue
        stamps = [_unix(p) for p in parts[1:]]
        if all(s is not None for s in stamps):
            times[parts[0]] = tuple(stamps)  # type: ignore[assignment]
    return times


def breakdown(cells: dict[str, dict], started: float, wall: float) -> list[str]:
    """Where a packed run's wall time went, from sacct and the records' timestamps."""
    by_job: dict[str, list[dict]] = {}
    for row in cells.values():
        by_job.setdefault(str(row["job_id"]), []).append(row)
    times = sacct_times(set(by_job))
    if not times:
        return ["  (no sacct times: accounting off?)"]
    submits = [times[j][0] for j in by_job if j in times]
    starts = {j: times[j][1] for j in by_job if j in times}
    ends = {j: times[j][2] for j in by_job if j in times}
    lines = [f"  planning + submitting (command start -> first sbatch): "
             f"{min(submits) - started:6.1f} s"]  # fmt: skip
    startup, work, tail, queue = [], [], [], []
    for job, rows in by_job.items():
        if job not in times:
            continue
        first = min(_unix(r["created_at"]) - float(r["wall_s"]) for r in rows)
        last = max(_unix(r["created_at"]) for r in rows)
        queue.append(starts[job] - times[job][0])
        startup.append(first - starts[job])
        work.append(sum(float(r["wall_s"]) for r in rows))
        tail.append(ends[job] - last)
    n = len(startup)

    def stat(values: list[float]) -> str:
        return f"total {sum(values):6.1f} s, mean {sum(values) / len(values):5.1f} s"

    lines += [
        f"  jobs: {n}; first started {min(starts.values()) - started:5.1f} s, last ended "
        f"{max(ends.values()) - started:5.1f} s after the command started",
        f"  queue wait (submit -> start):            {stat(queue)}",
        f"  job start-up (start -> first cell began): {stat(startup)}",
        f"  cells (sum of wall_s, model loads in):   {stat(work)}",
        f"  after the last cell (-> job end):        {stat(tail)}",
        f"  last job end -> command exit:            {started + wall - max(ends.values()):6.1f} s",
    ]
    return lines


def sweep_models(sweep: str) -> list[str]:
    from omegaconf import OmegaConf

    conf = OmegaConf.load(ROOT / "sweeps" / f"{sweep}.yaml")
    text = str(OmegaConf.select(conf, "hydra.sweeper.params.model") or "")
    return [m.strip() for m in text.split(",") if m.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="demo", help="a sweeps/<name>.yaml overlay")
    parser.add_argument("--set", action="append", default=[], help="extra override (repeatable)")
    parser.add_argument("--models", type=int, default=None,
                        help="only the sweep's first N models (a quicker run)")  # fmt: skip
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                        help="the node's cores: threads of the in-process run")  # fmt: skip
    parser.add_argument("--job-cpus", type=int, default=None,
                        help="CPUs per packed job (default: --cpus / jobs that run at once)")  # fmt: skip
    parser.add_argument("--cells-per-job", type=int, default=None, help="packed chunk cap")
    parser.add_argument("--one-per-job", action="store_true", help="also one cell per job")
    parser.add_argument("--partition", default="debug")
    parser.add_argument("--keep", action="store_true", help="keep the results folders")
    args = parser.parse_args()

    from harness.cluster import slurm

    if not slurm.is_up():
        print("the local Slurm is not up: sudo python -m harness.cluster.slurm up", file=sys.stderr)
        return 2
    common = [f"+sweeps@_global_={args.sweep}", *args.set]
    models = sweep_models(args.sweep)
    if args.models:
        models = models[: args.models]
        common.append(f"hydra.sweeper.params.model='{','.join(models)}'")  # one quoted value
    n_jobs_guess = max(len(models), 1)
    job_cpus = args.job_cpus or max(1, args.cpus // min(n_jobs_guess, args.cpus))
    work = Path(tempfile.mkdtemp(prefix="kbit-slurm-bench-"))
    name = f"kbit-bench-{uuid.uuid4().hex[:6]}"
    slurm_args = [
        "hydra/launcher=slurm", f"hydra.launcher.partition={args.partition}",
        f"hydra.launcher.name={name}", f"hydra.launcher.cpus_per_task={job_cpus}",
        "hydra.launcher.mem_gb=4", "hydra.launcher.wait=true", "hydra.launcher.poll_s=1",
    ]  # fmt: skip
    packed = [*slurm_args]
    if args.cells_per_job:
        packed.append(f"hydra.sweeper.jobs.cells_per_job={args.cells_per_job}")
    variants = {"in-process": [], "packed": packed}
    if args.one_per_job:
        variants["one per job"] = [*slurm_args, "hydra.sweeper.jobs.cells_per_job=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # threads: --cpus in-process, --job-cpus per job
    print(f"sweep {args.sweep}, models {', '.join(models) or '?'}; in-process on {args.cpus} "
          f"threads, packed jobs of {job_cpus} CPU(s)", flush=True)  # fmt: skip
    results: dict[str, dict] = {}
    for label, extra in variants.items():
        folder = work / label.replace(" ", "_")
        run_env = {**env, "OMP_NUM_THREADS": str(args.cpus)} if label == "in-process" else env
        before = load_average()
        rc, wall, started = kbit_run(
            [*common, f"results_dir={folder}", *extra], work / f"{folder.name}.log", run_env
        )
        cells = store_cells(folder) if folder.is_dir() else {}
        results[label] = {"rc": rc, "wall_s": wall, "started": started, "rows": cells,
                          **counts(cells)}  # fmt: skip
        print(f"{label:12s} rc={rc} wall {wall:8.1f} s  cells {len(cells):4d} "
              f"(ok {results[label]['ok']:4d})  model loads {results[label]['loads']:4d}  "
              f"jobs {results[label]['jobs']:4d}   [{before} -> {load_average()}]",
              flush=True)  # fmt: skip
    base, pack = results["in-process"], results["packed"]
    print()
    print(f"in-process {base['wall_s']:.1f} s | packed {pack['wall_s']:.1f} s | packed / "
          f"in-process {pack['wall_s'] / base['wall_s']:.2f}x (target <= 1.2)")  # fmt: skip
    if "one per job" in results:
        single = results["one per job"]
        print(f"one-per-job / packed wall time: {single['wall_s'] / pack['wall_s']:.2f}x; model "
              f"loads: in-process {base['loads']}, packed {pack['loads']}, one per job "
              f"{single['loads']}")  # fmt: skip
    in_cells = sum(float(r["wall_s"]) for r in base["rows"].values())
    print(f"in-process: cells {in_cells:.1f} s of {base['wall_s']:.1f} s (start-up, planning "
          f"and the rest: {base['wall_s'] - in_cells:.1f} s)")  # fmt: skip
    print("packed run, where the time went:")
    for line in breakdown(pack["rows"], pack["started"], pack["wall_s"]):
        print(line)
    same = base["cells"] > 0 and all(
        r["cells"] == base["cells"] and r["ok"] == r["cells"] for r in results.values()
    )
    print(f"every run stored all {base['cells']} cells ok: {same}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"results and logs kept in {work}")
    return 0 if same and all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
