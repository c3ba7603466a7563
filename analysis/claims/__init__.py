"""The paper's four claims, tested on a store: a verdict per claim, with paired intervals.

Dettmers & Zettlemoyer (2022), "The case for 4-bit precision", make four claims that a k-bit
sweep can check. :func:`claims_report` tests each on every *scope* of a store (one model
family, one training-token count where the store records one, one numerics and data set:
cells that are never compared across) and gives one of four verdicts:

* ``holds``: the intervals the claim rests on all point the claim's way;
* ``does not hold``: some interval the claim rests on points the other way;
* ``not separated by the data``: neither (an interval contains 0);
* ``not tested``: the store lacks the cells (or per-example results) the claim needs; the
  reason names what is missing. A verdict is never made up from point estimates alone.

Every interval is a paired percentile bootstrap (:func:`analysis.stats.paired_bootstrap_diff`,
stratified by task): the cells of a scope evaluate the same examples in the same order, so
one replicate resamples the example positions once for all the cells compared. A *pooled*
difference over P cell pairs is the mean of the P differences; since every pair shares the
examples, it equals the difference of the per-example means ``mean_i a_i[e]`` and
``mean_i b_i[e]``, and bootstrapping those resamples all pairs jointly. Where a verdict rests
on m intervals they are Bonferroni-widened to level ``1 - (1 - level) / m`` each, so that
they hold together with probability ``level``. Detail rows (other methods, per-k splits,
held-out NLL) are shown at ``level`` and never enter a verdict. The definitions are in
docs/analysis.md ("Claims report").

Layout: :mod:`analysis.claims.model` (verdicts, :class:`Comparison`, :class:`Finding`,
:class:`Scope`, :class:`ScopeData`, :class:`Report`), :mod:`analysis.claims.compare` (paired
comparisons and cell pairing), :mod:`analysis.claims.scope` (scopes), one module per claim
(:mod:`~analysis.claims.bit_optimal`, :mod:`~analysis.claims.block_size`,
:mod:`~analysis.claims.dtype`, :mod:`~analysis.claims.proxy`; each a typed
``claim(scope: ScopeData) -> Finding``), :mod:`analysis.claims.report` (:func:`claims_report`)
and :mod:`analysis.claims.render` (findings.md, findings.json). Every public name stays
importable from ``analysis.claims``.
"""

from analysis.claims.bit_optimal import CLAIM1_DEF, claim_bit_optimal
from analysis.claims.block_size import CLAIM2_DEF, claim_block_size
from analysis.claims.compare import pooled_comparison
from analysis.claims.dtype import CLAIM3_DEF, claim_dtype
from analysis.claims.model import (
    CLAIMS,
    DETAIL_ROLE,
    DTYPE_ORDER,
    FAILS,
    HOLDS,
    NEGATIVE,
    NO_INTERVAL,
    NOT_SEPARATED,
    NOT_TESTED,
    PAPER_METHOD,
    POSITIVE,
    TIED,
    VERDICT_ROLE,
    VERDICTS,
    Comparison,
    Finding,
    Report,
    Samples,
    Scope,
    ScopeData,
    bonferroni_level,
)
from analysis.claims.proxy import CLAIM4_DEF, claim_proxy
from analysis.claims.render import format_findings, write_findings
from analysis.claims.report import CLAIM_TESTS, claims_report
from analysis.claims.scope import nll_column, scope_data, split_scopes

__all__ = [
    "CLAIM1_DEF",
    "CLAIM2_DEF",
    "CLAIM3_DEF",
    "CLAIM4_DEF",
    "CLAIMS",
    "CLAIM_TESTS",
    "DETAIL_ROLE",
    "DTYPE_ORDER",
    "FAILS",
    "HOLDS",
    "NEGATIVE",
    "NOT_SEPARATED",
    "NOT_TESTED",
    "NO_INTERVAL",
    "PAPER_METHOD",
    "POSITIVE",
    "TIED",
    "VERDICTS",
    "VERDICT_ROLE",
    "Comparison",
    "Finding",
    "Report",
    "Samples",
    "Scope",
    "ScopeData",
    "bonferroni_level",
    "claim_bit_optimal",
    "claim_block_size",
    "claim_dtype",
    "claim_proxy",
    "claims_report",
    "format_findings",
    "nll_column",
    "pooled_comparison",
    "scope_data",
    "split_scopes",
    "write_findings",
]
