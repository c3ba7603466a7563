"""Claim 2: smaller blocks help at 3 and 4 bits."""

from __future__ import annotations

from analysis.claims.compare import (
    block_order,
    bs_text,
    detail_rows,
    pairs_by,
    pooled_comparison,
    sample_pairs,
    simple_verdict,
)
from analysis.claims.model import CLAIMS, PAPER_METHOD, Finding, ScopeData, not_tested
from analysis.load import ACC_COLUMN

CLAIM2_DEF = (
    "Pairs of cells of the same model, k in {3, 4}, method blockwise, data type (and overrides), "
    "scale format, centering, differing only in block size: each block size against the next "
    "larger one measured (a per-tensor scale is the largest). Difference = accuracy(smaller) - "
    "accuracy(larger), averaged over all pairs (the extra scale bits are not charged). Holds: "
    "interval > 0; does not hold: < 0. Detail rows: per k, other methods, held-out NLL (larger "
    "minus smaller, so > 0 = smaller better) where per-window data exist."
)


def claim_block_size(scope: ScopeData) -> Finding:
    """Claim 2 (definition: :data:`CLAIM2_DEF`)."""
    cells = scope.cells
    cells = cells[cells["bits"].isin([3, 4])]

    def make_pairs(frame):
        return pairs_by(frame, "block_size", block_order)

    pairs = make_pairs(cells[cells["method"] == PAPER_METHOD])
    if not pairs:
        return not_tested(
            2,
            scope.name,
            ACC_COLUMN,
            CLAIM2_DEF,
            "no blockwise 3- or 4-bit cells that differ only in block size",
        )
    label = "smaller - larger block"
    main = pooled_comparison(
        sample_pairs(pairs, scope.samples),
        f"{label}, blockwise k=3,4",
        ACC_COLUMN,
        scope.level,
        scope.n_boot,
        scope.seed,
    )
    if main is None:
        return not_tested(
            2,
            scope.name,
            ACC_COLUMN,
            CLAIM2_DEF,
            f"{len(pairs)} block-size pair(s) but no paired per-example results",
        )
    sizes = sorted({(bs_text(a["block_size"]), bs_text(b["block_size"])) for a, b in pairs})
    main.note = "; ".join(
        filter(None, [main.note, "steps " + ", ".join(f"{a}<{b}" for a, b in sizes)])
    )
    detail = detail_rows(scope, cells, make_pairs, label)
    verdict, reason = simple_verdict(main)
    return Finding(
        2,
        CLAIMS[2],
        scope.name,
        ACC_COLUMN,
        CLAIM2_DEF,
        verdict,
        f"{reason} over {main.n} pair(s)",
        scope.level,
        "none (one interval)",
        [main, *detail],
    )
