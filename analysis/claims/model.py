"""The claims' data model: verdicts, a comparison, a finding, a scope and the report.

Why a module of its own: every claim (:mod:`analysis.claims.bit_optimal` and its siblings),
the scoping (:mod:`analysis.claims.scope`) and the rendering (:mod:`analysis.claims.render`)
share these types; keeping them apart from the statistics lets each claim module import the
model without importing any other claim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

HOLDS = "holds"
FAILS = "does not hold"
NOT_SEPARATED = "not separated by the data"
NOT_TESTED = "not tested"
VERDICTS = (HOLDS, FAILS, NOT_SEPARATED, NOT_TESTED)

VERDICT_ROLE = "verdict"  # a comparison the verdict rests on
DETAIL_ROLE = "detail"  # shown for context, never part of the verdict

POSITIVE, NEGATIVE, TIED, NO_INTERVAL = "> 0", "< 0", "contains 0", "no interval"

CLAIMS = {
    1: "4-bit is bit-optimal for zero-shot accuracy at most total-bit budgets",
    2: "smaller blocks help at 3 and 4 bits",
    3: "at 4 bits, quantile >= float > int",
    4: "proxy quantization stabilises 3-bit but does not beat 4-bit",
}

PAPER_METHOD = "blockwise"  # the paper's round-to-nearest block-wise quantization

DTYPE_ORDER = ("int", "float", "quantile")  # claim 3, the data type entries as they are


@dataclass
class Comparison:
    """One difference (oriented so that > 0 is the claim's direction) with its interval."""

    label: str
    metric: str  # cell-frame column, e.g. zeroshot_mean:acc or heldout:nll
    estimate: float
    low: float | None
    high: float | None
    level: float  # of this interval (Bonferroni-adjusted for verdict rows)
    n: int  # cell pairs pooled
    n_examples: int  # examples (accuracy) or windows (NLL) resampled
    role: str = VERDICT_ROLE
    outcome: str = NO_INTERVAL  # > 0 | < 0 | contains 0 | no interval
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Finding:
    """One claim on one scope: its verdict, the reason, and the comparisons behind it."""

    claim: int
    text: str
    scope: str
    metric: str
    definition: str
    verdict: str
    reason: str
    level: float  # the family-wise level of the verdict's intervals
    correction: str
    comparisons: list[Comparison] = field(default_factory=list)
    budgets: list[dict] = field(default_factory=list)  # claim 1: per-budget outcome
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["comparisons"] = [c.to_dict() for c in self.comparisons]
        return d


@dataclass
class Scope:
    """Cells compared with each other: one family, token count, numerics and data set."""

    name: str
    model_family: str
    train_tokens: str
    variant: str
    sweeps: list[str]
    n_models: int
    n_cells: int
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """Every claim on every scope, with the settings that make it reproducible."""

    scopes: list[Scope]
    findings: list[Finding]
    n_boot: int
    level: float
    seed: int
    results_dir: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "results_dir": self.results_dir,
            "n_boot": self.n_boot,
            "level": self.level,
            "seed": self.seed,
            "claims": {str(k): v for k, v in CLAIMS.items()},
            "scopes": [asdict(s) for s in self.scopes],
            "findings": [f.to_dict() for f in self.findings],
            "notes": self.notes,
        }


Samples = dict[str, np.ndarray]


@dataclass(frozen=True)
class ScopeData:
    """What a claim reads about one scope: its cells, their per-example data and the settings.

    Every claim is ``claim(scope: ScopeData) -> Finding``. Why one argument: the claims used
    to take eight positional arguments in an order each claim kept for itself; one typed
    value lets a new claim read what it needs by name and keeps call sites from drifting.
    """

    scope: Scope
    cells: pd.DataFrame  # the scope's cells that measured zero-shot accuracy
    per_sample: pd.DataFrame  # their per-example rows (Results.per_sample)
    samples: dict[str, Samples]  # key -> {task: 0/1 per example} (accuracy)
    nll_samples: dict[str, Samples]  # key -> {task: per-window NLL} of ``nll_col``'s task
    nll_col: str | None  # the held-out NLL column of the detail rows; None: no per-window data
    n_boot: int
    level: float
    seed: int

    @property
    def name(self) -> str:
        """The scope's name as the findings show it."""
        return self.scope.name


def bonferroni_level(level: float, m: int) -> float:
    """Per-interval level so that ``m`` intervals hold together with probability ``level``."""
    return 1 - (1 - level) / max(m, 1)


def not_tested(claim: int, scope: str, metric: str, definition: str, why: str) -> Finding:
    """A ``not tested`` finding of ``claim`` on ``scope``, saying why."""
    return Finding(
        claim, CLAIMS[claim], scope, metric, definition, NOT_TESTED, why, float("nan"), "none"
    )
