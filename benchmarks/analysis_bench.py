"""Load and plot ~10,000 synthetic records (about 1,000 cell files); target <= 5 s.

    python benchmarks/analysis_bench.py [--keep DIR]

Prints each phase (read the store, build frames, per-example lists for the selection-corrected
curves, five figures as PNG+PDF rendered in-process
and by the default worker processes, tables) and the
total of load + figures + tables, with the reference loader (``harness.records.read_store``,
one ``pq.read_table`` per file, all columns) timed side by side for the ratio.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from analysis.cli import default_jobs, make_figures, make_tables
from analysis.load import load_results
from analysis.synthetic import write_synthetic_store
from harness.records import read_store

TARGET_S = 5.0


def _grid() -> dict:
    # 2 families x 6 sizes x (5 k x 3 variants x 2 dtypes x 3 block sizes + 16-bit)
    # = 1,092 cells x 10 rows = 10,920 records.
    return dict(
        families=("pythia", "opt"),
        sizes=(125e6, 350e6, 1.3e9, 2.7e9, 6.7e9, 13e9),
        ks=(3, 4, 5, 6, 8, 16),
        dtypes=("int", "quantile"),
        block_sizes=(64, 256, None),
        variants=(("blockwise", False, 0.0), ("blockwise", True, 0.0), ("proxy", False, 0.02)),
        n_examples=500,
    )


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the figure workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed(label: str, fn, timings: dict, cpu: dict):
    """Wall and CPU seconds: on a shared machine the CPU time is the stabler number."""
    t0, c0 = time.perf_counter(), _cpu()
    out = fn()
    timings[label], cpu[label] = time.perf_counter() - t0, _cpu() - c0
    print(f"  {label:<32s} wall {timings[label]:7.3f} s   cpu {cpu[label]:7.3f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", help="store and outputs here (reused if present), not a temp dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(args.keep or tempfile.mkdtemp(prefix="kbit-analysis-bench-"))
    store, out = root / "store", root / "out"
    if not any(store.glob("*/*.parquet")):
        write_synthetic_store(store, **_grid())
    t, cpu = {}, {}
    print(f"store: {store}")
    ref = _timed("reference read_store (all cols)", lambda: read_store(store), t, cpu)
    results = _timed("load_results (dataset, proj.)", lambda: load_results(store), t, cpu)
    print(f"  records: {ref.num_rows}, cells: {len(results.cells)}")
    # The selection-corrected main curves and best-config table need the per-example lists.
    per_sample = _timed("per_sample (selection split)", results.per_sample, t, cpu)
    _timed(
        "5 figures, in-process (jobs=1)",
        lambda: make_figures(results.cells, out, 4, "wikitext2:ppl", 100.0, 1, per_sample),
        t,
        cpu,
    )
    _timed(
        f"5 figures (PNG + PDF), jobs={default_jobs()}",
        lambda: make_figures(results.cells, out, 4, "wikitext2:ppl", 100.0, None, per_sample),
        t,
        cpu,
    )
    _timed(
        "tables + stats",
        lambda: make_tables(results, out, "wikitext2:ppl", 100.0, per_sample),
        t,
        cpu,
    )
    phases = [
        "load_results (dataset, proj.)",
        "per_sample (selection split)",
        f"5 figures (PNG + PDF), jobs={default_jobs()}",
        "tables + stats",
    ]
    total, total_cpu = sum(t[p] for p in phases), sum(cpu[p] for p in phases)
    ratio = t["reference read_store (all cols)"] / t["load_results (dataset, proj.)"]
    print(f"load speed-up vs reference reader: {ratio:.2f}x")
    print(
        f"load + figures + tables: wall {total:.3f} s, cpu {total_cpu:.3f} s "
        f"(target <= {TARGET_S:.0f} s): "
        f"{'OK' if total <= TARGET_S else 'OVER'}"
    )
    print(f"outputs: {out}")


if __name__ == "__main__":
    main()
