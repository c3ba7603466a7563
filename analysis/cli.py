"""``kbit-plot RESULTS_DIR --out DIR`` and ``kbit-advise RESULTS_DIR --budget 4GiB``.

The commands only: the figures are declared in :mod:`analysis.plot_figures` (registered in
:mod:`analysis.figure_registry`), the tables in :mod:`analysis.plot_tables`, the held-out view
in :mod:`analysis.heldout`, the claims in :mod:`analysis.claims`.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.advise import NothingFits, advise, format_advice, parse_budget
from analysis.claims import claims_report, write_findings
from analysis.figure_registry import (
    figure_spec,
    load_figure_plugins,
    registered_figures,
    save_registered,
)
from analysis.figures import DEFAULT_PPL_CAP, FORMATS, save_figure
from analysis.heldout import heldout_figures
from analysis.load import LEGACY_HINT, Results, load_results
from analysis.plot_figures import (
    PlotInputs,
    accuracy_curves,
    build_figure,
    figure_skip_reason,
    main_curves_for,
)
from analysis.plot_tables import (
    correlation_lines,
    make_tables,
    ppl_columns,
    problems_frame,
)
from analysis.tables import SELECTIONS, with_window_stderr
from harness.store_cli import (
    OneLineParser,
    StoreRefusal,
    check_store,
    int_at_least,
    int_between,
    open_unit_float,
    output_dir,
    parse_or_exit,
    positive_float,
    refuse,
)

log = logging.getLogger("analysis")

# The plot path's figure names, declared once (analysis.plot_figures); plugin figures are added
# to the registry at run time (load_figure_plugins), not to this tuple.
FIGURE_NAMES = tuple(spec.name for spec in registered_figures("plot"))
# Names that moved to analysis.plot_figures / analysis.plot_tables, importable from here still.
__all__ = [
    "ADVISE",
    "FIGURE_NAMES",
    "MIN_N_BOOT",
    "PLOT",
    "accuracy_curves",
    "advise_main",
    "auto_ppl_cap",
    "build_figure",
    "checked_store",
    "correlation_lines",
    "default_jobs",
    "figure_skip_reason",
    "main_curves_for",
    "make_figures",
    "make_tables",
    "path_figures",
    "plot_main",
    "ppl_columns",
    "problems_frame",
]


def auto_ppl_cap(cells: pd.DataFrame, ppl_column: str | None) -> float:
    """The paper's cap (100), or 4x the worst 16-bit baseline when that baseline exceeds 100.

    Why: the cap marks quantization that broke the model. Tiny models (the zoo) have baseline
    perplexities above 100, and a fixed cap would mark every cell of them unstable.
    """
    if ppl_column is None or ppl_column not in cells.columns:
        return DEFAULT_PPL_CAP
    baseline = cells.loc[cells["bits"] == 16, ppl_column].dropna()
    worst = float(baseline.max()) if not baseline.empty else 0.0
    if not np.isfinite(worst) or worst <= DEFAULT_PPL_CAP:
        return DEFAULT_PPL_CAP
    return 4.0 * worst


def _render(job: tuple) -> list[Path] | None:
    """Build one figure and save it in one format (a unit of work for the process pool)."""
    spec_name, name, fmt, inputs, out = job
    spec = figure_spec(spec_name)  # by name: a spec's functions need not pickle
    return save_registered(spec, inputs, out, save_figure, name=name, formats=(fmt,))


def default_jobs() -> int:
    """Processes for rendering: the CPUs this process may use, at most 4; 1 without fork."""
    if not sys.platform.startswith("linux") or "fork" not in mp.get_all_start_methods():
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0))))


def path_figures(path: str, inputs: object, out: Path) -> list[Path]:
    """Every figure registered on ``path`` (:mod:`analysis.figure_registry`) drawn from
    ``inputs`` and saved into ``out`` (PNG + PDF); a declined figure is one INFO line."""
    paths: list[Path] = []
    for spec in registered_figures(path):
        reason = spec.skip_reason(inputs) if spec.skip_reason else None
        saved = None if reason else save_registered(spec, inputs, out, save_figure)
        if saved is None:
            log.info("skipped %s: %s", _files_text(spec.name), reason or "nothing to compare")
        paths += saved or []
    return paths


def _files_text(name: str) -> str:
    return ", ".join(f"{name}.{fmt}" for fmt in FORMATS)


def make_figures(
    cells: pd.DataFrame,
    out: Path,
    k: int,
    ppl_column: str | None,
    cap: float,
    jobs: int | None = None,
    per_sample: pd.DataFrame | None = None,
    selection: str = "split",
) -> list[Path]:
    """Build and save the figures that the data support; returns the files written.

    A figure with nothing to compare (:func:`figure_skip_reason`), or one its figure
    function declines (returns None), is not written; one INFO line names its files and why
    (``skipped dtype_k3.png, dtype_k3.pdf: only one data type at k=3``).

    ``per_sample`` (:meth:`Results.per_sample`) lets the scaling figures use the
    selection-corrected main curves (:func:`analysis.tables.main_curves`), every point of a
    panel on the same examples as its baseline (:func:`accuracy_curves`).

    Why processes: matplotlib draws each figure once per format, single-threaded, and drawing
    is nearly all of kbit-plot's time. Each (figure, format) pair is an independent job, so
    ``jobs`` forked workers (default :func:`default_jobs`) cut the wall time by about that
    factor; ``jobs=1`` renders in this process. Output files are identical either way.
    """
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: must be >= 1")
    curves = main_curves_for(cells, ppl_column, per_sample, selection)
    inputs = PlotInputs(cells, k, ppl_column, cap, curves)
    specs = []
    for spec in registered_figures("plot"):
        reason = spec.skip_reason(inputs) if spec.skip_reason else None
        if reason is None:
            specs.append(spec)
        else:
            log.info("skipped %s: %s", _files_text(spec.file_name(k)), reason)
    work = [(s.name, s.file_name(k), fmt, inputs, out) for s in specs for fmt in FORMATS]
    if not work:
        return []
    if jobs == 1:
        results = [_render(job) for job in work]
    else:
        with ProcessPoolExecutor(min(jobs, len(work)), mp_context=mp.get_context("fork")) as pool:
            results = list(pool.map(_render, work))
    paths: list[Path] = []
    for (_, name, fmt, *_), saved in zip(work, results, strict=True):
        if saved is None:
            if fmt == FORMATS[0]:
                log.info(
                    "skipped %s: nothing to compare at k=%d (neither two lines nor a line and "
                    "its 16-bit baseline)",
                    _files_text(name),
                    k,
                )
            continue
        paths += saved
    return paths


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results_dir", metavar="RESULTS_DIR", help="the result store")
    parser.add_argument("--sweep", action="append", help="only this sweep (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )


def checked_store(args: argparse.Namespace) -> Path:
    """RESULTS_DIR and ``--sweep`` checked by the rule every store tool shares
    (:func:`harness.store_cli.check_store`); raises :class:`StoreRefusal`."""
    return check_store(args.results_dir, args.sweep)


def _load(root: Path, args: argparse.Namespace) -> Results:
    # Unreadable files and legacy cells are logged (one warning line each) by the loader;
    # the log goes to stderr, so --json output on stdout stays clean.
    return load_results(root, args.sweep)


PLOT = "kbit-plot"
ADVISE = "kbit-advise"


def plot_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kbit-plot``: figures (PNG+PDF) and tables (.md+.csv) into --out.

    Exit 0 when at least one figure was written; 2 on refused input (one line: RESULTS_DIR,
    --sweep, an empty store, an option value; nothing read or written); 1 when the store holds
    no ok cell (nothing written), or when no figure at all could be drawn (the tables are
    still written; one line on stderr says so, the INFO lines before it say why)."""
    p = OneLineParser(prog=PLOT, description=plot_main.__doc__.splitlines()[0])
    _common_args(p)
    p.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="split",
        help="how the main curves pick one configuration per (family, k): split = chosen on "
        "half A of the examples, accuracy reported on held-out half B (default; unbiased); "
        "fixed = by coverage then label, no accuracy used",
    )
    p.add_argument("--out", default="figures", help="output folder (default: figures)")
    p.add_argument("--k", type=int_between("--k", 1, 15), default=4,
                   help="fixed k for figures 3-5 (default 4)")  # fmt: skip
    p.add_argument("--ppl-task", help="perplexity task (default: wikitext2, else the first)")
    p.add_argument(
        "--ppl-cap",
        type=positive_float("--ppl-cap"),
        default=None,
        help=f"perplexity above this is unstable: clipped and marked (default: {DEFAULT_PPL_CAP:g} "
        "as in the paper; 4x the highest 16-bit baseline perplexity when that is above it, "
        "as for small models)",
    )
    p.add_argument(
        "--jobs",
        type=int_at_least("--jobs", 1),
        default=None,
        help="processes rendering figures (default: the usable CPUs, at most 4; 1 = in-process)",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="also test the paper's four claims: findings.md and findings.json (verdicts with "
        "paired bootstrap intervals; docs/analysis.md, Claims report)",
    )
    args = parse_or_exit(p, argv)
    if isinstance(args, int):
        return args
    try:
        out = output_dir("--out", args.out)
        root = checked_store(args)
    except StoreRefusal as err:
        return refuse(PLOT, err)
    _logging(args)
    try:
        load_figure_plugins()  # a plugin's figures are registered before any is listed
    except ValueError as err:  # harness.plugins.PluginError: one line naming the plugin
        return refuse(PLOT, err)
    results = _load(root, args)
    if results.cells.empty:
        where = f" (sweeps {args.sweep})" if args.sweep else ""
        sys.stderr.write(f"{PLOT}: no ok cells in {str(root)!r}{where}; nothing to plot\n")
        return 1
    cols = ppl_columns(results.cells)
    ppl_column = f"{args.ppl_task}:ppl" if args.ppl_task else (cols[0] if cols else None)
    if ppl_column and ppl_column not in results.cells.columns:
        return refuse(PLOT, f"--ppl-task={args.ppl_task!r}: no such perplexity task in the "
                            f"store; allowed: {[c.split(':')[0] for c in cols]}")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    cap = args.ppl_cap if args.ppl_cap is not None else auto_ppl_cap(results.cells, ppl_column)
    per_sample = results.per_sample() if args.selection == "split" else None
    # per-window NLL gives the perplexity intervals of the figures that take only the cells
    windows = per_sample if per_sample is not None else results.per_sample()
    cells = with_window_stderr(results.cells, windows)
    paths = make_figures(cells, out, args.k, ppl_column, cap, args.jobs, per_sample, args.selection)
    paths += make_tables(results, out, ppl_column, cap, per_sample, args.selection)
    paths += heldout_figures(results, out, task=args.ppl_task)  # [] without per-window NLL
    if args.report:
        report = claims_report(results, nll_task=args.ppl_task)
        paths += write_findings(report, out)
        paths += path_figures("claims", report, out)  # none built in; plugins may add some
    log.info("wrote %d file(s) to %s", len(paths), out)
    if not any(p.suffix.lstrip(".") in FORMATS for p in paths):
        sys.stderr.write(
            f"{PLOT}: no figure could be drawn from {len(results.cells)} ok cell(s) (why: the "
            f"'skipped' lines above); wrote {len(paths)} table/report file(s) to {str(out)!r}\n"
        )
        return 1
    return 0


def advise_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kbit-advise``: the best measured configuration under a memory budget.

    Exit 0 with advice; 2 on refused input (one line: --budget, RESULTS_DIR, --sweep, an
    empty store, an option value; nothing read); 1 when no measured configuration fits."""
    p = OneLineParser(prog=ADVISE, description=advise_main.__doc__.splitlines()[0])
    _common_args(p)
    p.add_argument("--budget", required=True, help="e.g. 4GiB, 500MB, 3.5GB, 2e9bits")
    p.add_argument("--n-boot", type=int_at_least("--n-boot", MIN_N_BOOT), default=10_000,
                   help=f"bootstrap replicates (>= {MIN_N_BOOT})")  # fmt: skip
    p.add_argument("--level", type=open_unit_float("--level"), default=0.95,
                   help="confidence level, in (0, 1)")  # fmt: skip
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=0, help="bootstrap seed")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parse_or_exit(p, argv)
    if isinstance(args, int):
        return args
    try:
        budget = parse_budget(args.budget)
    except ValueError as err:  # one line, like every refused input of kbit
        return refuse(ADVISE, f"--budget: {err}")
    try:
        root = checked_store(args)
    except StoreRefusal as err:
        return refuse(ADVISE, err)
    _logging(args)
    results = _load(root, args)
    try:
        advice = advise(results, budget, n_boot=args.n_boot, level=args.level, seed=args.seed)
    except NothingFits as err:
        sys.stderr.write(f"{ADVISE}: {err}\n")
        return 1
    if args.json:
        data = advice.to_dict()
        data["skipped_files"] = problems_frame(results).to_dict("records")
        data["legacy_cells_excluded"] = results.n_legacy
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(format_advice(advice) + _left_out_text(results) + "\n")
    return 0


# Percentile intervals need replicates; the same floor as kbit-fit's --n-boot.
MIN_N_BOOT = 20


def _left_out_text(results: Results) -> str:
    """Lines appended to the advice: what the answer could not consider."""
    lines = [f"Skipped unreadable cell file: {p}: {r}" for p, r in results.problems]
    if results.n_legacy:
        lines.append(f"Excluded {results.n_legacy} legacy cell(s); {LEGACY_HINT}")
    return "".join("\n" + line for line in lines)
