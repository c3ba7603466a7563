"""Harness overhead of a sweep: its wall time against the time spent in model forward passes.

Runs a sweep (default: the demo sweep) in-process, from a fresh results folder, exactly as a
user would (``kbit-run --multirun +sweeps@_global_=demo``), then reads the store and prints

    overhead ratio = sweep wall time / sum over cells of forward_s

where ``forward_s`` is the time each cell spent inside model forward passes (recorded by
``harness.run.execute``). A ratio of 1 would mean the harness costs nothing beyond the forward passes;
the breakdown (process start + grid validation, loading, quantizing, evaluation bookkeeping)
shows where the rest goes. It also runs the same command a second time on the full store to
time a resume that finds every cell done (validation + store lookup only).

Usage::

    python benchmarks/sweep_bench.py                       # demo sweep, needs the demo zoo family
    python benchmarks/sweep_bench.py --sweep micro -- eval.limit=50   # extra overrides after --
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc

from harness.records import read_store


def run_sweep(sweep: str, results: Path, extra: list[str]) -> float:
    """Seconds of wall time for ``kbit-run --multirun +sweeps@_global_=SWEEP`` into ``results``."""
    kbit_run = str(Path(sys.executable).parent / "kbit-run")
    cmd = [kbit_run, "--multirun", f"+sweeps@_global_={sweep}", f"results_dir={results}", *extra]
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    tic = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if proc.returncode != 0:
        sys.exit(f"sweep failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return wall


def per_cell_sums(results: Path, sweep: str) -> dict[str, float]:
    """Sums over cells of the per-cell timing fields (each cell's rows repeat them)."""
    table = read_store(results, sweep)
    first = {}
    for row in table.select(
        ["cell_id", "load_s", "quantize_s", "eval_s", "forward_s", "wall_s"]
    ).to_pylist():
        first.setdefault(row["cell_id"], row)
    sums = {
        k: sum(r[k] for r in first.values())
        for k in ("load_s", "quantize_s", "eval_s", "forward_s", "wall_s")
    }
    sums["cells"] = len(first)
    sums["rows"] = table.num_rows
    sums["failed"] = pc.sum(pc.equal(table.column("status"), "failed")).as_py() or 0
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="demo")
    parser.add_argument("extra", nargs="*", help="extra overrides for kbit-run (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kbit-sweep-bench-") as tmp:
        results = Path(tmp)
        wall = run_sweep(args.sweep, results, args.extra)
        s = per_cell_sums(results, args.sweep)
        resume_wall = run_sweep(args.sweep, results, args.extra)
    other = wall - s["wall_s"]
    print(f"\nsweep {args.sweep}: {s['cells']} cells, {s['rows']} rows, {s['failed']} failed rows")
    print(f"sweep wall time                       {wall:9.1f} s")
    print(f"sum of cells' forward-pass time       {s['forward_s']:9.1f} s")
    print(f"harness overhead ratio (wall/forward) {wall / max(s['forward_s'], 1e-9):9.2f}")
    print("breakdown of the wall time:")
    print(f"  loading models (sum load_s)         {s['load_s']:9.1f} s")
    print(f"  quantizing (sum quantize_s)         {s['quantize_s']:9.1f} s")
    print(f"  evaluating outside forward passes   {s['eval_s'] - s['forward_s']:9.1f} s")
    print(
        f"  rest of the cells (records, ...)    {s['wall_s'] - s['load_s'] - s['quantize_s'] - s['eval_s']:9.1f} s"
    )
    print(f"  outside cells (start, validation)   {other:9.1f} s")
    print(f"resume with every cell done (no-op)   {resume_wall:9.1f} s")


if __name__ == "__main__":
    main()
