"""The claims report: every claim of :data:`CLAIM_TESTS` on every scope of a store."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from analysis.claims.bit_optimal import claim_bit_optimal
from analysis.claims.block_size import claim_block_size
from analysis.claims.dtype import claim_dtype
from analysis.claims.model import CLAIMS, Finding, Report, ScopeData, not_tested
from analysis.claims.proxy import claim_proxy
from analysis.claims.scope import nll_column, scope_data, split_scopes
from analysis.load import ACC_COLUMN, Results
from analysis.stats import DEFAULT_LEVEL, DEFAULT_N_BOOT

# claim number -> its test, in the report's order (one module per claim).
CLAIM_TESTS: dict[int, Callable[[ScopeData], Finding]] = {
    1: claim_bit_optimal,
    2: claim_block_size,
    3: claim_dtype,
    4: claim_proxy,
}


def claims_report(
    results: Results,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    nll_task: str | None = None,
) -> Report:
    """Each of the paper's four claims on each scope of ``results``: verdict and intervals.

    Deterministic given ``seed``. ``nll_task``: the perplexity task whose per-window NLL gives
    the detail rows (default: wikitext2, else the first ``<task>:nll`` of the store).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    cells = results.cells
    report = Report([], [], n_boot, level, seed, results.results_dir)
    if cells.empty:
        report.notes.append("no ok cells: nothing tested")
        return report
    if ACC_COLUMN not in cells.columns:
        cells = cells.assign(**{ACC_COLUMN: np.nan})
    nll_col = nll_column(cells, nll_task)
    for scope, scells in split_scopes(cells):
        report.scopes.append(scope)
        measured = scells[scells[ACC_COLUMN].notna()]
        if measured.empty:
            for claim in CLAIMS:
                report.findings.append(
                    not_tested(claim, scope.name, ACC_COLUMN, "", f"no {ACC_COLUMN} measurements")
                )
            continue
        data = scope_data(results, scope, measured, nll_col, n_boot, level, seed)
        report.findings += [test(data) for test in CLAIM_TESTS.values()]
    return report
