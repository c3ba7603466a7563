"""``kbit-plot RESULTS_DIR --out DIR`` and ``kbit-advise RESULTS_DIR --budget 4GiB``."""

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
from matplotlib.figure import Figure

from analysis.advise import NothingFits, advise, format_advice, parse_budget
from analysis.claims import claims_report, write_findings
from analysis.figures import (
    DEFAULT_PPL_CAP,
    FORMATS,
    block_size_figure,
    dtype_figure,
    method_figure,
    perplexity_figure,
    proxy_centering_figure,
    save_figure,
    scaling_figure,
)
from analysis.heldout import heldout_figures
from analysis.load import ACC_COLUMN, LEGACY_HINT, Results, fill_config_defaults, load_results
from analysis.selection import half_scores, same_examples
from analysis.stats import (
    PAPER_PPL_ACC_R,
    correlation_caveat,
    ppl_acc_correlation,
    stable_cells,
)
from analysis.tables import (
    SELECTIONS,
    best_config_table,
    bit_optimal_table,
    cell_table,
    default_budgets,
    main_curves,
    to_markdown,
    with_window_stderr,
)
from harness.records import BASELINE_BITS
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


def ppl_columns(cells: pd.DataFrame) -> list[str]:
    """The ``<task>:ppl`` columns present, wikitext2 first (the paper's perplexity set)."""
    cols = sorted(c for c in cells.columns if c.endswith(":ppl"))
    return sorted(cols, key=lambda c: c != "wikitext2:ppl")


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


def _write_table(frame: pd.DataFrame, out: Path, name: str) -> list[Path]:
    """``name.csv`` and ``name.md``; nothing (one INFO line) for a table without rows."""
    if frame.empty:
        log.info("skipped %s.csv, %s.md: no rows", name, name)
        return []
    csv, md = out / f"{name}.csv", out / f"{name}.md"
    frame.to_csv(csv, index=False)
    md.write_text(to_markdown(frame))
    return [csv, md]


FIGURE_NAMES = ("scaling_acc", "scaling_ppl", "block_size_k{k}", "dtype_k{k}",
                "proxy_centering_k{k}", "method_k{k}", "method_ppl_k{k}")  # fmt: skip


def build_figure(
    name: str,
    cells: pd.DataFrame,
    k: int,
    ppl_column: str | None,
    cap: float,
    curves: dict[str, pd.DataFrame] | None = None,
) -> Figure | None:
    """One of :data:`FIGURE_NAMES` (``{k}`` filled in), or None if the data do not support it.

    ``curves``: ``{"acc": ..., "ppl": ...}`` main curves (:func:`main_curves_for`); computed
    here without per-example results (fixed-rule fallback) if not given.
    """
    curves = curves or {}
    builders = {
        "scaling_acc": lambda: scaling_figure(
            cells, ACC_COLUMN, "mean zero-shot accuracy", curves=curves.get("acc")
        ),
        "scaling_ppl": lambda: (
            perplexity_figure(cells, ppl_column, cap, curves=curves.get("ppl"))
            if ppl_column
            else None
        ),
        f"block_size_k{k}": lambda: block_size_figure(cells, k),
        f"dtype_k{k}": lambda: dtype_figure(cells, k),
        f"proxy_centering_k{k}": lambda: proxy_centering_figure(cells, k),
        f"method_k{k}": lambda: method_figure(cells, k),
        f"method_ppl_k{k}": lambda: method_figure(cells, k, ppl_column) if ppl_column else None,
    }
    return builders[name]()


def accuracy_curves(
    cells: pd.DataFrame,
    per_sample: pd.DataFrame | None,
    selection: str = "split",
    method: str = "blockwise",
) -> pd.DataFrame:
    """The accuracy main curves, every point of a family on the same examples.

    :func:`analysis.tables.main_curves` reports a selected configuration on held-out half B
    and a group with nothing to choose (the 16-bit baseline) on all examples;
    :func:`analysis.selection.same_examples` moves the latter to half B wherever the family
    holds a half-B point, so that a figure or table never sets a point on half of the
    examples beside its baseline on all of them.
    """
    curves = main_curves(cells, ACC_COLUMN, per_sample, selection, method=method)
    scores = half_scores(per_sample) if per_sample is not None else None
    return same_examples(curves, scores, ACC_COLUMN)


def main_curves_for(
    cells: pd.DataFrame,
    ppl_column: str | None,
    per_sample: pd.DataFrame | None,
    selection: str = "split",
) -> dict[str, pd.DataFrame]:
    """The accuracy and perplexity main curves, with one selection for both figures."""
    curves = {"acc": accuracy_curves(cells, per_sample, selection)}
    if ppl_column and ppl_column in cells.columns:
        # NaN perplexity stays on its curve as inf, so the figure can mark it unstable.
        filled = cells.assign(**{ppl_column: cells[ppl_column].fillna(np.inf)})
        curves["ppl"] = main_curves(filled, ppl_column, per_sample, selection)
    return curves


def _render(job: tuple) -> list[Path] | None:
    """Build one figure and save it in one format (a unit of work for the process pool)."""
    name, fmt, cells, out, k, ppl_column, cap, curves = job
    fig = build_figure(name, cells, k, ppl_column, cap, curves)
    return None if fig is None else save_figure(fig, out, name, formats=(fmt,))


def default_jobs() -> int:
    """Processes for rendering: the CPUs this process may use, at most 4; 1 without fork."""
    if not sys.platform.startswith("linux") or "fork" not in mp.get_all_start_methods():
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0))))


def _plain_at_k(cells: pd.DataFrame, k: int, y: str | None) -> pd.DataFrame:
    """Cells at k with a ``y`` value, config defaults filled, ``_dtype`` = name + overrides."""
    if y is None or y not in cells.columns:
        return cells.iloc[0:0]
    sub = fill_config_defaults(cells[(cells["bits"] == k) & cells[y].notna()])
    return sub.assign(_dtype=sub["dtype"].astype(str) + "|" + sub["dtype_overrides"].astype(str))


def figure_skip_reason(
    name: str,
    cells: pd.DataFrame,
    k: int,
    ppl_column: str | None,
    curves: dict[str, pd.DataFrame],
) -> str | None:
    """Why figure ``name`` would have nothing to compare, or None when it has something.

    Why before drawing: a figure with no cell to draw (no perplexity task, nothing at k,
    no family with both a curve and its baseline) is not written, and the command says why
    in one line. These checks are necessary conditions only: what a figure compares (two
    lines, or a line and its 16-bit baseline) is decided by the figure function itself,
    which returns None when its cells compare nothing (:func:`make_figures` then names
    that), so the rule lives in one place (:mod:`analysis.figures`).
    """
    if name in ("scaling_acc", "scaling_ppl"):
        y = ACC_COLUMN if name == "scaling_acc" else ppl_column
        if y is None:
            return "the store has no perplexity task"
        frame = curves.get("acc" if name == "scaling_acc" else "ppl")
        if frame is None or frame.empty:
            return f"no plain block-wise or 16-bit cell has {y}"
        base = frame["bits"] == BASELINE_BITS
        if not set(frame.loc[base, "model_family"]) & set(frame.loc[~base, "model_family"]):
            return f"no family has both a k curve and a 16-bit baseline with {y}"
        return None
    y = ppl_column if name.startswith("method_ppl_k") else ACC_COLUMN
    if y is None:
        return "the store has no perplexity task"
    sub = _plain_at_k(cells, k, y)
    if sub.empty:
        return f"no cell at k={k} has {y}"
    plain = sub[(sub["method"] == "blockwise") & ~sub["centering"].astype(bool)]
    if name.startswith(("block_size_k", "dtype_k")):
        if plain.empty:
            return f"no plain block-wise cell at k={k}"
    elif name.startswith("proxy_centering_k"):
        special = (sub["method"] == "proxy") | sub["centering"].astype(bool)
        if not special.any():
            return f"no proxy or centered cell at k={k}"
        both = sub[sub["method"].isin(["blockwise", "proxy"])]
        kinds = both["method"].astype(str) + both["centering"].astype(bool).map(str)
        kinds = kinds + both["outlier_fraction"].map(str).where(both["method"] == "proxy", "")
        if kinds.nunique() < 2:
            return (
                f"only one kind of cell at k={k} (nothing to set the proxy/centered cells against)"
            )
    elif name.startswith(("method_k", "method_ppl_k")):
        others = sub[~sub["method"].isin(["proxy", "none"]) & ~sub["centering"].astype(bool)]
        if others.empty:
            return f"no cell of a method other than proxy at k={k}"
    return None


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
    names = []
    for name in (n.format(k=k) for n in FIGURE_NAMES):
        reason = figure_skip_reason(name, cells, k, ppl_column, curves)
        if reason is None:
            names.append(name)
        else:
            log.info("skipped %s: %s", _files_text(name), reason)
    work = [(n, fmt, cells, out, k, ppl_column, cap, curves) for n in names for fmt in FORMATS]
    if not work:
        return []
    if jobs == 1:
        results = [_render(job) for job in work]
    else:
        with ProcessPoolExecutor(min(jobs, len(work)), mp_context=mp.get_context("fork")) as pool:
            results = list(pool.map(_render, work))
    paths: list[Path] = []
    for (name, fmt, *_), saved in zip(work, results, strict=True):
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


def problems_frame(results: Results) -> pd.DataFrame:
    """One row per unreadable cell file: its path and why (for ``skipped_files.*``)."""
    return pd.DataFrame(
        [(str(p), reason) for p, reason in results.problems], columns=["file", "reason"]
    )


def _bit_optimal(curves: pd.DataFrame, budgets: np.ndarray, out: Path, name: str) -> list[Path]:
    """One bit-optimal table, or nothing (one INFO line) when it would compare nothing."""
    ks = sorted(int(k) for k in curves["bits"].unique()) if not curves.empty else []
    if len(ks) < 2:
        what = f"only k={ks[0]}" if ks else f"no cell has {ACC_COLUMN}"
        log.info("skipped %s.csv, %s.md: %s (nothing to compare)", name, name, what)
        return []
    return _write_table(bit_optimal_table(curves, budgets), out, name)


def correlation_lines(cells: pd.DataFrame, cap: float) -> list[str]:
    """The ``stats.md`` lines of the perplexity-accuracy correlation, each ppl task one,
    followed by a plain-language caveat where r's sign differs from the paper's
    (:func:`analysis.stats.correlation_caveat`)."""
    lines = []
    for col in ppl_columns(cells):
        r, n = ppl_acc_correlation(cells, col, ACC_COLUMN, cap=cap)
        lines.append(
            f"- Pearson r({col}, {ACC_COLUMN}) = {r:.3f} over {n} stable cells "
            f"(ppl <= {cap:g}); the paper reports {PAPER_PPL_ACC_R:g}"
        )
        stable = stable_cells(cells, col, cap)
        se_col = f"{ACC_COLUMN}:stderr"
        caveat = correlation_caveat(
            r,
            n,
            acc=stable[ACC_COLUMN],
            acc_stderr=stable[se_col] if se_col in stable.columns else None,
        )
        if caveat:
            lines.append(f"  - {caveat}")
    return lines


def make_tables(
    results: Results,
    out: Path,
    ppl_column: str | None,
    cap: float,
    per_sample: pd.DataFrame | None = None,
    selection: str = "split",
) -> list[Path]:
    """bit_optimal_k, best_config, cells, failed_cells, skipped_files (.md + .csv), stats.md.

    The bit-optimal table rests on the selection-corrected main curves (every point of a
    family on the same examples: :func:`accuracy_curves`) and the best-config table on
    held-out accuracies when ``per_sample`` is given (docs/analysis.md). A table without
    rows, or a bit-optimal table of a single k, is not written (one INFO line each).
    """
    cells = results.cells
    paths = _write_table(cell_table(cells), out, "cells")
    if not results.failed.empty:
        paths += _write_table(results.failed, out, "failed_cells")
    if results.problems:
        paths += _write_table(problems_frame(results), out, "skipped_files")
    if ACC_COLUMN not in cells.columns:
        for name in ("bit_optimal_k", "best_config"):
            log.info("skipped %s.csv, %s.md: no cell has %s", name, name, ACC_COLUMN)
        log.info("skipped stats.md: no cell has %s", ACC_COLUMN)
        return paths
    curves = accuracy_curves(cells, per_sample, selection)
    budgets = default_budgets(curves)
    paths += _bit_optimal(curves, budgets, out, "bit_optimal_k")
    others = sorted(set(cells["method"]) - {"blockwise", "proxy", "none"})
    for method in others:  # every other method's own curves (e.g. gptq, hqq), same budgets
        mcurves = accuracy_curves(cells, per_sample, selection, method=method)
        paths += _bit_optimal(mcurves, budgets, out, f"bit_optimal_k_{method}")
    paths += _write_table(
        best_config_table(cells, budgets, per_sample=per_sample), out, "best_config"
    )
    lines = ["# Statistics", "", *correlation_lines(cells, cap)]
    lines.append(f"- main curves: selection={selection} ({_SELECTION_DOC[selection]})")
    if results.failed.shape[0]:
        lines.append(f"- {len(results.failed)} failed cell(s) dropped (failed_cells.md)")
    if results.problems:
        lines.append(
            f"- {len(results.problems)} unreadable cell file(s) skipped (skipped_files.md)"
        )
    if results.n_legacy:
        lines.append(
            f"- {results.n_legacy} legacy cell(s) (schema_version < 2) excluded; {LEGACY_HINT}"
        )
    (out / "stats.md").write_text("\n".join(lines) + "\n")
    return [*paths, out / "stats.md"]


_SELECTION_DOC = {
    "split": "configuration chosen on half A of the examples, accuracy on held-out half B; "
    "in a family where a choice was made, every point is on half B, baselines included",
    "fixed": "configuration chosen by coverage, then label; no accuracy used",
}


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
        paths += write_findings(claims_report(results, nll_task=args.ppl_task), out)
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
