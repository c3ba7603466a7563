"""Held-out loss against total model bits: ``kbit-plot``'s held-out figure, findings and tables.

The view and its rules are described in :mod:`analysis.heldout_loss` (the computation:
per-window losses, choices on half A, numbers on half B, paired intervals); the figure is
:mod:`analysis.heldout_plot` (registered on the ``heldout`` path of
:mod:`analysis.figure_registry`), the findings text :mod:`analysis.heldout_text`. This module
is the entry point (:func:`heldout_figures`) and keeps every public name of the three
importable from ``analysis.heldout``.
"""

from __future__ import annotations

from pathlib import Path

from analysis.figure_registry import registered_figures, save_registered
from analysis.figures import FORMATS, save_figure
from analysis.heldout_loss import (
    BUDGET_COLUMNS,
    FIGURE_NAME,
    FINDINGS_NAME,
    IDENT,
    METHOD_TEXT,
    MIN_WINDOWS_TO_SPLIT,
    NLL_METRIC,
    PREFERRED_TASKS,
    HeldoutLoss,
    heldout_loss,
    window_losses,
)
from analysis.heldout_plot import heldout_figure
from analysis.heldout_text import findings_markdown, findings_summary, format_interval
from analysis.load import Results
from analysis.stats import DEFAULT_LEVEL, DEFAULT_N_BOOT

__all__ = [
    "BUDGET_COLUMNS",
    "FIGURE_NAME",
    "FINDINGS_NAME",
    "IDENT",
    "METHOD_TEXT",
    "MIN_WINDOWS_TO_SPLIT",
    "NLL_METRIC",
    "PREFERRED_TASKS",
    "HeldoutLoss",
    "findings_markdown",
    "findings_summary",
    "format_interval",
    "heldout_figure",
    "heldout_figures",
    "heldout_loss",
    "window_losses",
]


def heldout_figures(
    results: Results,
    out: str | Path,
    task: str | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> list[Path]:
    """``heldout_bits.{png,pdf}``, ``heldout_findings.md``, ``heldout_points.csv`` and
    ``heldout_budgets.csv`` into ``out``; returns the paths written ([] and nothing written
    when no cell has per-window held-out losses). Every figure registered on the ``heldout``
    path is drawn from the same :class:`HeldoutLoss`."""
    loss = heldout_loss(results, task, n_boot=n_boot, level=level, seed=seed)
    if loss is None:
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for spec in registered_figures("heldout"):  # heldout_bits, then any plugin's
        if spec.skip_reason is None or spec.skip_reason(loss) is None:
            paths += save_registered(spec, loss, out, save_figure, formats=FORMATS) or []
    findings = out / f"{FINDINGS_NAME}.md"
    findings.write_text(findings_markdown(loss) + "\n")
    loss.points.to_csv(out / "heldout_points.csv", index=False)
    loss.budgets.to_csv(out / "heldout_budgets.csv", index=False)
    return [*paths, findings, out / "heldout_points.csv", out / "heldout_budgets.csv"]
