"""``kbit-status`` on a 20,000-cell store, with and without the sweep index (target <= 3 s).

Builds a store quickly: one ok and one failed cell are written through
:func:`harness.records.write_cell`, then their bytes are copied under ``--cells`` ids
(one in ``--failed-every`` failed), and each copy gets its index entry through the public
:func:`harness.store_index.append` from its own ``stat`` (what ``write_cell`` does after each
write). A ``sweep_manifest.json`` lists every cell plus ``--pending`` planned ones.

Then ``kbit-status RESULTS_DIR --errors`` runs as a subprocess (the user's wall time: Python
start, imports, listing, index, output), best of ``--repeat`` runs, in three states:

1. *with index*: every file has a matching entry: no cell file is opened;
2. *without index*: the index deleted (a store written by an older kbit): every file is
   opened; this run writes the entries it derived (healing the index);
3. *healed*: the run after 2, again without opening any file.

The outputs of all runs are compared (identical content), and the machine's load average is
printed with the times, since the machine is shared. Usage::

    python benchmarks/status_bench.py [--cells 20000] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import store_index
from harness.records import STATUS_FAILED, cell_path, empty_record, write_cell
from harness.sweep.status import main as _unused  # noqa: F401  (fail early if the CLI is broken)

SWEEP = "bench"
ERROR = "RuntimeError: CUDA out of memory\nTraceback ..."


def build_store(root: Path, cells: int, failed_every: int, pending: int) -> list[str]:
    """Write the store under ``root``; returns the cell ids."""
    ok_rows = [
        empty_record(sweep=SWEEP, cell_id="ok", task=f"t{i}", metric="acc", value=0.5 + i / 100,
                     per_sample=[1.0, 0.0] * 50)
        for i in range(5)
    ]  # fmt: skip
    bad_rows = [empty_record(sweep=SWEEP, cell_id="bad", status=STATUS_FAILED, error=ERROR)]
    templates = {
        "ok": write_cell(ok_rows, cell_path(root, SWEEP, "_tmpl_ok")).read_bytes(),
        "bad": write_cell(bad_rows, cell_path(root, SWEEP, "_tmpl_bad")).read_bytes(),
    }
    folder = root / SWEEP
    for name in ("_tmpl_ok", "_tmpl_bad"):
        (folder / f"{name}.parquet").unlink()
    store_index.index_path(folder).unlink(missing_ok=True)
    ids = [f"c{i:06d}" for i in range(cells)]
    for i, cid in enumerate(ids):
        failed = failed_every and i % failed_every == 0
        path = folder / f"{cid}.parquet"
        path.write_bytes(templates["bad" if failed else "ok"])
        st = path.stat()
        state, error = ("failed", ERROR.splitlines()[0]) if failed else ("ok", "")
        store_index.append(folder, cid, state, error, st.st_size, st.st_mtime_ns)
    planned = ids + [f"p{i:06d}" for i in range(pending)]
    (folder / "sweep_manifest.json").write_text(
        json.dumps({"sweep": SWEEP, "cells": {c: f"cell={c}" for c in planned}})
    )
    return ids


def run_status(root: Path) -> tuple[float, str, int]:
    """(wall seconds, stdout, exit status) of one ``kbit-status ROOT --errors``."""
    cmd = [sys.executable, "-m", "harness.sweep.status", str(root), "--errors"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"kbit-status failed ({proc.returncode}): {proc.stderr.strip()}")
    return wall, proc.stdout, proc.returncode


def best_of(root: Path, repeat: int, before=None) -> tuple[float, str]:
    """Best wall time of ``repeat`` runs (``before`` called ahead of each, untimed)."""
    times, outs = [], set()
    for _ in range(repeat):
        if before:
            before()
        wall, out, _rc = run_status(root)
        times.append(wall)
        outs.add(out)
    if len(outs) != 1:
        raise SystemExit("kbit-status printed different outputs across runs")
    return min(times), outs.pop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--failed-every", type=int, default=50, help="one failed cell in N")
    p.add_argument("--pending", type=int, default=100, help="planned cells without a file")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--keep", help="build the store here and keep it (default: a temp folder)")
    args = p.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kbit-status-bench-"))
    try:
        start = time.perf_counter()
        build_store(work, args.cells, args.failed_every, args.pending)
        print(
            f"store: {args.cells} cells under {work} built in {time.perf_counter() - start:.1f} s"
        )
        folder = work / SWEEP
        index = store_index.index_path(folder)
        saved = index.read_bytes()

        def drop_index() -> None:
            index.unlink(missing_ok=True)

        def restore_index() -> None:
            index.write_bytes(saved)

        with_index, out1 = best_of(work, args.repeat, restore_index)
        without, out2 = best_of(work, args.repeat, drop_index)
        healed, out3 = best_of(work, args.repeat)
        if not out1 == out2 == out3:
            raise SystemExit("kbit-status output differs with and without the index")
        load = os.getloadavg()
        print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} "
              f"{load[2]:.2f} (1/5/15 min)")  # fmt: skip
        print(f"kbit-status, {args.cells} cells, best of {args.repeat} (subprocess wall time):")
        print(f"  with index     {with_index:7.2f} s   (no cell file opened)")
        print(f"  without index  {without:7.2f} s   (every cell file opened; index rewritten)")
        print(f"  healed index   {healed:7.2f} s   (the run after one without)")
        print(f"  ratio without/with: {without / with_index:.1f}x; target with index <= 3 s: "
              f"{'met' if with_index <= 3.0 else 'NOT met'}")  # fmt: skip
        print("  outputs identical: yes; first lines:")
        for line in out1.splitlines()[:3]:
            print(f"    {line}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
