"""Claim 1: 4-bit is bit-optimal for zero-shot accuracy at most total-bit budgets."""

from __future__ import annotations

import numpy as np

from analysis.claims.compare import curve_points, interp, pooled_comparison
from analysis.claims.model import (
    CLAIMS,
    FAILS,
    HOLDS,
    NEGATIVE,
    NOT_SEPARATED,
    POSITIVE,
    Comparison,
    Finding,
    ScopeData,
    bonferroni_level,
    not_tested,
)
from analysis.load import ACC_COLUMN
from analysis.selection import split_halves
from analysis.tables import ESTIMATE_HELDOUT, default_budgets, main_curves

CLAIM1_DEF = (
    "Per budget on a 2-per-octave log2 grid (analysis.tables.default_budgets over the main "
    "curves), the 4-bit main curve (plain blockwise; one configuration per k, chosen on half A "
    "of the examples as in the scaling figure) interpolated linearly in log2(total model bits) "
    "minus every other k's curve covering that budget (no extrapolation), on held-out half B "
    "wherever any configuration was chosen. A budget counts for 4-bit when every difference is "
    "> 0, against it when some difference is < 0. Holds: > half of the budgets count for 4-bit; "
    "does not hold: > half count against it."
)


def claim_bit_optimal(scope: ScopeData) -> Finding:
    """Claim 1 (definition: :data:`CLAIM1_DEF`)."""
    cells = scope.cells

    def skip(why: str) -> Finding:
        return not_tested(1, scope.name, ACC_COLUMN, CLAIM1_DEF, why)

    curves = main_curves(cells, ACC_COLUMN, scope.per_sample, "split")
    if curves.empty or 4 not in set(curves["bits"]):
        return skip("no 4-bit blockwise cells with zero-shot accuracy")
    others = sorted(int(k) for k in set(curves["bits"]) - {4})
    if not others:
        return skip("no blockwise cells of any k other than 4")
    half_b = bool((curves["estimate"] == ESTIMATE_HELDOUT).any())
    use = {k: (split_halves(s)[1] if half_b else s) for k, s in scope.samples.items()}
    points = {int(k): curve_points(curves, int(k), use) for k in set(curves["bits"])}
    jobs, missing = [], 0
    for budget in default_budgets(curves):
        x = float(np.log2(budget))
        inside4, s4 = interp(points[4], x)
        if not inside4:
            continue
        for k in others:
            inside, sk = interp(points[k], x)
            if not inside:
                continue
            if s4 is None or sk is None:
                missing += 1
                continue
            jobs.append((budget, k, s4, sk))
    if not jobs:
        why = "no budget inside both the 4-bit curve and another k's curve"
        return skip(why if not missing else "no per-example results on the curves' cells")
    m = len(jobs)
    lvl = bonferroni_level(scope.level, m)
    comps: list[Comparison] = []
    by_budget: dict[float, list[tuple[int, Comparison]]] = {}
    for budget, k, s4, sk in jobs:
        c = pooled_comparison(
            [(s4, sk)],
            f"budget 2^{np.log2(budget):.1f} bits: 4-bit - {k}-bit",
            ACC_COLUMN,
            lvl,
            scope.n_boot,
            scope.seed,
        )
        comps.append(c)
        by_budget.setdefault(budget, []).append((k, c))
    rows, n_for, n_against, n_top = [], 0, 0, 0
    for budget, kcs in by_budget.items():
        ks, cs = [k for k, _ in kcs], [c for _, c in kcs]
        if all(c.outcome == POSITIVE for c in cs):
            status = "4-bit best"
            n_for += 1
        elif any(c.outcome == NEGATIVE for c in cs):
            better = [k for k, c in zip(ks, cs, strict=True) if c.outcome == NEGATIVE]
            status = f"beaten by k={','.join(map(str, better))}"
            n_against += 1
        else:
            status = "not separated"
        top = all(c.estimate >= 0 for c in cs)
        n_top += top
        rows.append(
            dict(
                budget_bits=float(budget),
                log2_budget=float(np.log2(budget)),
                compared_k=ks,
                status=status,
                four_bit_highest_estimate=top,
            )
        )
    n = len(by_budget)
    if n_for > n / 2:
        verdict = HOLDS
    elif n_against > n / 2:
        verdict = FAILS
    else:
        verdict = NOT_SEPARATED
    reason = (
        f"4-bit is separated above every other k at {n_for}/{n} budgets, significantly beaten "
        f"at {n_against}/{n}; highest point estimate at {n_top}/{n}"
    )
    if missing:
        reason += f"; {missing} comparison(s) without paired per-example data left out"
    finding = Finding(
        1,
        CLAIMS[1],
        scope.name,
        ACC_COLUMN,
        CLAIM1_DEF,
        verdict,
        reason,
        scope.level,
        f"Bonferroni over m={m} intervals (each at {lvl:.4g})",
        comps,
        rows,
    )
    chosen = curves.drop_duplicates("bits").sort_values("bits")
    finding.notes.append(
        "curves: "
        + "; ".join(f"k={int(r.bits)} {r.config}" for r in chosen.itertuples())
        + (f"; estimated on {ESTIMATE_HELDOUT}" if half_b else "; estimated on all examples")
    )
    return finding
