"""kbit-plot's tables: cells, failed cells, skipped files, bit-optimal k, best config, stats.

Each table is written as ``name.csv`` and ``name.md``; a table without rows is not written
(one INFO line says so). The bit-optimal table rests on the selection-corrected main curves
(every point of a family on the same examples: :func:`analysis.plot_figures.accuracy_curves`)
and the best-config table on held-out accuracies when per-example results are given
(docs/analysis.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import ACC_COLUMN, LEGACY_HINT, Results
from analysis.plot_figures import PAPER_METHOD, accuracy_curves
from analysis.stats import (
    PAPER_PPL_ACC_R,
    correlation_caveat,
    ppl_acc_correlation,
    stable_cells,
)
from analysis.tables import (
    best_config_table,
    bit_optimal_table,
    cell_table,
    default_budgets,
    to_markdown,
)

log = logging.getLogger("analysis")

SELECTION_DOC = {
    "split": "configuration chosen on half A of the examples, accuracy on held-out half B; "
    "in a family where a choice was made, every point is on half B, baselines included",
    "fixed": "configuration chosen by coverage, then label; no accuracy used",
}


def ppl_columns(cells: pd.DataFrame) -> list[str]:
    """The ``<task>:ppl`` columns present, wikitext2 first (the paper's perplexity set)."""
    cols = sorted(c for c in cells.columns if c.endswith(":ppl"))
    return sorted(cols, key=lambda c: c != "wikitext2:ppl")


def write_table(frame: pd.DataFrame, out: Path, name: str) -> list[Path]:
    """``name.csv`` and ``name.md``; nothing (one INFO line) for a table without rows."""
    if frame.empty:
        log.info("skipped %s.csv, %s.md: no rows", name, name)
        return []
    csv, md = out / f"{name}.csv", out / f"{name}.md"
    frame.to_csv(csv, index=False)
    md.write_text(to_markdown(frame))
    return [csv, md]


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
    return write_table(bit_optimal_table(curves, budgets), out, name)


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
    family on the same examples: :func:`analysis.plot_figures.accuracy_curves`) and the
    best-config table on held-out accuracies when ``per_sample`` is given (docs/analysis.md).
    A table without rows, or a bit-optimal table of a single k, is not written (one INFO line
    each).
    """
    cells = results.cells
    paths = write_table(cell_table(cells), out, "cells")
    if not results.failed.empty:
        paths += write_table(results.failed, out, "failed_cells")
    if results.problems:
        paths += write_table(problems_frame(results), out, "skipped_files")
    if ACC_COLUMN not in cells.columns:
        for name in ("bit_optimal_k", "best_config"):
            log.info("skipped %s.csv, %s.md: no cell has %s", name, name, ACC_COLUMN)
        log.info("skipped stats.md: no cell has %s", ACC_COLUMN)
        return paths
    curves = accuracy_curves(cells, per_sample, selection)
    budgets = default_budgets(curves)
    paths += _bit_optimal(curves, budgets, out, "bit_optimal_k")
    others = sorted(set(cells["method"]) - {PAPER_METHOD, "proxy", "none"})
    for method in others:  # every other method's own curves (e.g. gptq, hqq), same budgets
        mcurves = accuracy_curves(cells, per_sample, selection, method=method)
        paths += _bit_optimal(mcurves, budgets, out, f"bit_optimal_k_{method}")
    paths += write_table(
        best_config_table(cells, budgets, per_sample=per_sample), out, "best_config"
    )
    lines = ["# Statistics", "", *correlation_lines(cells, cap)]
    lines.append(f"- main curves: selection={selection} ({SELECTION_DOC[selection]})")
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
