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
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import (
    ACC_COLUMN,
    Results,
    fill_config_defaults,
    tokens_text,
    training_tokens,
)
from analysis.selection import split_halves
from analysis.stats import DEFAULT_LEVEL, DEFAULT_N_BOOT, paired_bootstrap_diff
from analysis.tables import (
    ESTIMATE_HELDOUT,
    QUANT_CONFIG,
    VARIANT_COLUMNS,
    config_keys,
    default_budgets,
    main_curves,
    variant_labels,
)
from harness.records import MEAN_ZEROSHOT_TASK

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
# A cell's quantization configuration apart from k (a claim varies one field of it).
_QUANT = QUANT_CONFIG


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


# --- per-example data ------------------------------------------------------------------

Samples = dict[str, np.ndarray]


def _samples_by_key(per_sample: pd.DataFrame, nll_task: str | None) -> tuple[dict, dict]:
    """({key: {task: 0/1}} of per-task accuracy rows, {key: {task: per-window NLL}})."""
    acc: dict[str, Samples] = {}
    nll: dict[str, Samples] = {}
    if per_sample.empty:
        return acc, nll
    for row in per_sample.itertuples():
        values = np.asarray(row.per_sample, dtype=float)
        if values.ndim != 1 or values.size == 0:
            continue
        if row.metric == "acc" and row.task != MEAN_ZEROSHOT_TASK:
            acc.setdefault(row.key, {})[row.task] = values
        elif row.metric == "nll" and row.task == nll_task:
            nll.setdefault(row.key, {})[row.task] = values
    return acc, nll


def _signature(samples: Samples) -> tuple:
    return tuple(sorted((t, v.size) for t, v in samples.items()))


def _combine(parts: Sequence[tuple[float, Samples | None]]) -> Samples | None:
    """sum_i w_i * samples_i, per task and example; None if any is missing or they differ."""
    if not parts or any(s is None for _, s in parts):
        return None
    sig = _signature(parts[0][1])
    if any(_signature(s) != sig for _, s in parts):
        return None
    return {t: sum(w * s[t] for w, s in parts) for t in parts[0][1]}


def _outcome(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return NO_INTERVAL
    return POSITIVE if low > 0 else NEGATIVE if high < 0 else TIED


def pooled_comparison(
    pairs: Sequence[tuple[Samples | None, Samples | None]],
    label: str,
    metric: str,
    level: float,
    n_boot: int,
    seed: int,
    role: str = VERDICT_ROLE,
) -> Comparison | None:
    """Mean over pairs of (a - b), with a joint paired bootstrap interval over the examples.

    Pairs lacking per-example data on either side, or on examples unlike the most common
    set (other tasks or counts), are left out and counted in ``note``. None if no pair is
    left.
    """
    usable = [(a, b) for a, b in pairs if a and b and _signature(a) == _signature(b)]
    notes = []
    if len(usable) < len(pairs):
        notes.append(f"{len(pairs) - len(usable)} pair(s) without paired per-example data left out")
    if not usable:
        return None
    sigs = pd.Series([_signature(a) for a, _ in usable])
    common = sigs.value_counts().index[0]
    kept = [p for p, s in zip(usable, sigs, strict=True) if s == common]
    if len(kept) < len(usable):
        notes.append(f"{len(usable) - len(kept)} pair(s) on other examples left out")
    a = _combine([(1 / len(kept), x) for x, _ in kept])
    b = _combine([(1 / len(kept), y) for _, y in kept])
    ci = paired_bootstrap_diff(a, b, n_boot=n_boot, level=level, seed=seed)
    return Comparison(
        label=label,
        metric=metric,
        estimate=ci.estimate,
        low=ci.low,
        high=ci.high,
        level=level,
        n=len(kept),
        n_examples=sum(v.size for v in a.values()),
        role=role,
        outcome=_outcome(ci.low, ci.high),
        note="; ".join(notes),
    )


def bonferroni_level(level: float, m: int) -> float:
    """Per-interval level so that ``m`` intervals hold together with probability ``level``."""
    return 1 - (1 - level) / max(m, 1)


# --- scopes ------------------------------------------------------------------------------


def _tokens_label(cells: pd.DataFrame) -> pd.Series:
    """The training-token count of each cell's model as text ('' when the store has none).

    :func:`analysis.load.training_tokens` where the store records it; else the
    ``@<tokens>`` suffix of a zoo checkpoint's model name (``zoo:tokens/l2d64@1M``); else ''.
    """
    if "train_tokens" in cells.columns:
        return training_tokens(cells).map(tokens_text)
    names = cells["model"].astype(str)
    return names.map(lambda m: m.rsplit("@", 1)[1] if "@" in m else "")


def _model_id(cells: pd.DataFrame) -> pd.Series:
    """One model (checkpoint included): model name plus training tokens where recorded."""
    return cells["model"].astype(str) + "@" + cells["_tokens"]


def split_scopes(cells: pd.DataFrame) -> list[tuple[Scope, pd.DataFrame]]:
    """The store's cells cut into scopes: (family, training tokens, numerics and data).

    Within a scope the same configuration of the same model measured twice (in two sweeps)
    is kept once (the first by key), so no comparison counts it twice.
    """
    cells = fill_config_defaults(cells).copy()
    cells["_tokens"] = _tokens_label(cells)
    cells["_model"] = _model_id(cells)
    cells["_cfg"] = config_keys(cells)
    cells["_variant"] = ""
    for _, group in cells.groupby("model_family", sort=True):
        cells.loc[group.index, "_variant"] = variant_labels(group, group)
    out = []
    group_cols = ["model_family", "_tokens", *VARIANT_COLUMNS]
    for _, group in cells.groupby(group_cols, sort=True, dropna=False):
        group = group.sort_values("key")
        dups = group.duplicated(["_model", "bits", "_cfg"])
        group = group[~dups].reset_index(drop=True)
        family, tokens, variant = (
            str(group["model_family"].iloc[0]),
            str(group["_tokens"].iloc[0]),
            str(group["_variant"].iloc[0]),
        )
        name = (
            family + (f" @{tokens} tokens" if tokens else "") + (f" ({variant})" if variant else "")
        )
        scope = Scope(
            name=name,
            model_family=family,
            train_tokens=tokens,
            variant=variant,
            sweeps=sorted(group["sweep"].astype(str).unique()),
            n_models=int(group["_model"].nunique()),
            n_cells=len(group),
        )
        if dups.any():
            scope.notes.append(
                f"{int(dups.sum())} repeated cell(s) (same model and config) kept once"
            )
        out.append((scope, group))
    return out


# --- the claims --------------------------------------------------------------------------


def _not_tested(claim: int, scope: str, metric: str, definition: str, why: str) -> Finding:
    return Finding(
        claim, CLAIMS[claim], scope, metric, definition, NOT_TESTED, why, float("nan"), "none"
    )


CLAIM1_DEF = (
    "Per budget on a 2-per-octave log2 grid (analysis.tables.default_budgets over the main "
    "curves), the 4-bit main curve (plain blockwise; one configuration per k, chosen on half A "
    "of the examples as in the scaling figure) interpolated linearly in log2(total model bits) "
    "minus every other k's curve covering that budget (no extrapolation), on held-out half B "
    "wherever any configuration was chosen. A budget counts for 4-bit when every difference is "
    "> 0, against it when some difference is < 0. Holds: > half of the budgets count for 4-bit; "
    "does not hold: > half count against it."
)


def _curve_points(curves: pd.DataFrame, k: int, samples: dict) -> list[tuple[float, Samples]]:
    """(log2 total bits, per-example scores) of one k's curve; equal sizes averaged."""
    pts = curves[curves["bits"] == k]
    out: list[tuple[float, Samples | None]] = []
    for x, group in pts.groupby(np.log2(pts["total_model_bits"].astype(float)), sort=True):
        parts = [(1 / len(group), samples.get(key)) for key in group["key"]]
        out.append((float(x), _combine(parts)))
    return out


def _interp(points: list[tuple[float, Samples | None]], x: float) -> tuple[bool, Samples | None]:
    """(budget inside the curve's range, interpolated per-example scores or None if missing)."""
    if not points or x < points[0][0] - 1e-9 or x > points[-1][0] + 1e-9:
        return False, None
    xs = [p[0] for p in points]
    j = int(np.searchsorted(xs, x, side="right")) - 1
    j = min(max(j, 0), len(points) - 1)
    if j == len(points) - 1 or abs(x - xs[j]) < 1e-9:
        return True, points[j][1]
    w = (x - xs[j]) / (xs[j + 1] - xs[j])
    return True, _combine([(1 - w, points[j][1]), (w, points[j + 1][1])])


def claim_bit_optimal(
    scope: str, cells: pd.DataFrame, per_sample: pd.DataFrame, samples: dict, n_boot, level, seed
) -> Finding:
    """Claim 1 (definition: :data:`CLAIM1_DEF`)."""

    def skip(why: str) -> Finding:
        return _not_tested(1, scope, ACC_COLUMN, CLAIM1_DEF, why)

    curves = main_curves(cells, ACC_COLUMN, per_sample, "split")
    if curves.empty or 4 not in set(curves["bits"]):
        return skip("no 4-bit blockwise cells with zero-shot accuracy")
    others = sorted(int(k) for k in set(curves["bits"]) - {4})
    if not others:
        return skip("no blockwise cells of any k other than 4")
    half_b = bool((curves["estimate"] == ESTIMATE_HELDOUT).any())
    use = {k: (split_halves(s)[1] if half_b else s) for k, s in samples.items()}
    points = {int(k): _curve_points(curves, int(k), use) for k in set(curves["bits"])}
    jobs, missing = [], 0
    for budget in default_budgets(curves):
        x = float(np.log2(budget))
        inside4, s4 = _interp(points[4], x)
        if not inside4:
            continue
        for k in others:
            inside, sk = _interp(points[k], x)
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
    lvl = bonferroni_level(level, m)
    comps: list[Comparison] = []
    by_budget: dict[float, list[tuple[int, Comparison]]] = {}
    for budget, k, s4, sk in jobs:
        c = pooled_comparison(
            [(s4, sk)],
            f"budget 2^{np.log2(budget):.1f} bits: 4-bit - {k}-bit",
            ACC_COLUMN,
            lvl,
            n_boot,
            seed,
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
        scope,
        ACC_COLUMN,
        CLAIM1_DEF,
        verdict,
        reason,
        level,
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


def _pairs_by(
    cells: pd.DataFrame, vary: str, keep: Sequence[str], order
) -> list[tuple[pd.Series, pd.Series]]:
    """(better-by-claim, reference) cell pairs that differ only in ``vary``.

    ``order(values)`` returns the (candidate, reference) value pairs to form within a group.
    """
    if cells.empty:
        return []
    group_cols = ["_model", "bits", *[c for c in keep if c != vary]]
    pairs = []
    for _, group in cells.groupby(group_cols, sort=True, dropna=False):
        by_value = {
            v: row for v, row in zip(group[vary], (r for _, r in group.iterrows()), strict=True)
        }
        for cand, ref in order(list(by_value)):
            pairs.append((by_value[cand], by_value[ref]))
    return pairs


def _block_order(values: list) -> list[tuple]:
    """Adjacent (smaller, next larger) block sizes; a per-tensor scale (NaN) is the largest."""
    ranked = sorted(values, key=lambda b: math.inf if pd.isna(b) else float(b))
    return list(itertools.pairwise(ranked))


def _sample_pairs(pairs, samples: dict, lower_is_better: bool = False):
    """Per-example data of each (candidate, reference) pair, oriented so > 0 favours the first."""
    out = []
    for cand, ref in pairs:
        a, b = samples.get(cand["key"]), samples.get(ref["key"])
        out.append((b, a) if lower_is_better else (a, b))
    return out


def _bs_text(b) -> str:
    return "tensor" if pd.isna(b) else str(int(b))


CLAIM2_DEF = (
    "Pairs of cells of the same model, k in {3, 4}, method blockwise, data type (and overrides), "
    "scale format, centering, differing only in block size: each block size against the next "
    "larger one measured (a per-tensor scale is the largest). Difference = accuracy(smaller) - "
    "accuracy(larger), averaged over all pairs (the extra scale bits are not charged). Holds: "
    "interval > 0; does not hold: < 0. Detail rows: per k, other methods, held-out NLL (larger "
    "minus smaller, so > 0 = smaller better) where per-window data exist."
)


def _detail_rows(
    cells, samples, nll_samples, nll_col, make_pairs, label, n_boot, level, seed, split_k=True
) -> list[Comparison]:
    """Per-k, other-method and NLL detail comparisons of a pooled claim."""
    rows: list[Comparison] = []
    blockwise = cells[cells["method"] == PAPER_METHOD]

    def accuracy_detail(subset: pd.DataFrame, name: str) -> None:
        c = pooled_comparison(
            _sample_pairs(make_pairs(subset), samples), name, ACC_COLUMN, level, n_boot, seed,
            DETAIL_ROLE,
        )  # fmt: skip
        rows.extend([c] if c else [])

    if split_k:
        for k in sorted(blockwise["bits"].unique()):
            accuracy_detail(blockwise[blockwise["bits"] == k], f"{label}, blockwise k={k}")
    for method in sorted(set(cells["method"]) - {PAPER_METHOD, "none"}):
        accuracy_detail(cells[cells["method"] == method], f"{label}, {method}")
    if nll_col:
        pairs = make_pairs(blockwise)
        c = pooled_comparison(
            _sample_pairs(pairs, nll_samples, lower_is_better=True),
            f"{label}, blockwise, NLL (lower better: sign flipped)",
            nll_col,
            level,
            n_boot,
            seed,
            DETAIL_ROLE,
        )
        if c:
            rows.append(c)
        elif pairs:
            rows.append(
                Comparison(
                    f"{label}, blockwise, NLL",
                    nll_col,
                    float("nan"),
                    None,
                    None,
                    level,
                    len(pairs),
                    0,
                    DETAIL_ROLE,
                    NO_INTERVAL,
                    "no per-window data: not compared",
                )
            )
    return rows


def _simple_verdict(c: Comparison) -> tuple[str, str]:
    verdict = {POSITIVE: HOLDS, NEGATIVE: FAILS}.get(c.outcome, NOT_SEPARATED)
    return (
        verdict,
        f"pooled difference {c.estimate:+.4f} [{c.low:+.4f}, {c.high:+.4f}] ({c.outcome})",
    )


def claim_block_size(scope, cells, samples, nll_samples, nll_col, n_boot, level, seed) -> Finding:
    """Claim 2 (definition: :data:`CLAIM2_DEF`)."""
    cells = cells[cells["bits"].isin([3, 4])]

    def make_pairs(frame):
        return _pairs_by(frame, "block_size", _QUANT, _block_order)

    pairs = make_pairs(cells[cells["method"] == PAPER_METHOD])
    if not pairs:
        return _not_tested(
            2,
            scope,
            ACC_COLUMN,
            CLAIM2_DEF,
            "no blockwise 3- or 4-bit cells that differ only in block size",
        )
    label = "smaller - larger block"
    main = pooled_comparison(
        _sample_pairs(pairs, samples), f"{label}, blockwise k=3,4", ACC_COLUMN, level, n_boot, seed
    )
    if main is None:
        return _not_tested(
            2,
            scope,
            ACC_COLUMN,
            CLAIM2_DEF,
            f"{len(pairs)} block-size pair(s) but no paired per-example results",
        )
    sizes = sorted({(_bs_text(a["block_size"]), _bs_text(b["block_size"])) for a, b in pairs})
    main.note = "; ".join(
        filter(None, [main.note, "steps " + ", ".join(f"{a}<{b}" for a, b in sizes)])
    )
    detail = _detail_rows(
        cells, samples, nll_samples, nll_col, make_pairs, label, n_boot, level, seed
    )
    verdict, reason = _simple_verdict(main)
    return Finding(
        2,
        CLAIMS[2],
        scope,
        ACC_COLUMN,
        CLAIM2_DEF,
        verdict,
        f"{reason} over {main.n} pair(s)",
        level,
        "none (one interval)",
        [main, *detail],
    )


CLAIM3_DEF = (
    "At k=4, pairs of cells of the same model, method blockwise, block size, scale format and "
    "centering, with the data type entries quantile, float and int as they are (no overrides): "
    "quantile - float and float - int, each averaged over its pairs. Holds: float - int > 0 and "
    "quantile - float not < 0; does not hold: either < 0; else not separated. Two intervals, "
    "Bonferroni-widened."
)


def _dtype_pairs(frame: pd.DataFrame, cand: str, ref: str):
    frame = frame[(frame["dtype_overrides"] == "{}") & frame["dtype"].isin([cand, ref])]

    def order(values):
        return [(cand, ref)] if cand in values and ref in values else []

    return _pairs_by(frame, "dtype", _QUANT, order)


def claim_dtype(scope, cells, samples, nll_samples, nll_col, n_boot, level, seed) -> Finding:
    """Claim 3 (definition: :data:`CLAIM3_DEF`)."""
    cells = cells[cells["bits"] == 4]
    lvl = bonferroni_level(level, 2)
    comps, missing = [], []
    for cand, ref in (("quantile", "float"), ("float", "int")):
        pairs = _dtype_pairs(cells[cells["method"] == PAPER_METHOD], cand, ref)
        c = pooled_comparison(
            _sample_pairs(pairs, samples),
            f"{cand} - {ref}, blockwise k=4",
            ACC_COLUMN,
            lvl,
            n_boot,
            seed,
        )
        if c is None:
            missing.append(f"no 4-bit blockwise {cand}/{ref} pairs with per-example data")
        else:
            comps.append(c)
    for cand, ref in (("quantile", "float"), ("float", "int")):
        comps += _detail_rows(
            cells,
            samples,
            nll_samples,
            nll_col,
            lambda f, c=cand, r=ref: _dtype_pairs(f, c, r),
            f"{cand} - {ref}",
            n_boot,
            level,
            seed,
            split_k=False,
        )
    main = {c.label.split(",")[0]: c for c in comps if c.role == VERDICT_ROLE}
    if not main:
        return _not_tested(3, scope, ACC_COLUMN, CLAIM3_DEF, "; ".join(missing))
    text = "; ".join(
        f"{name} {c.estimate:+.4f} [{c.low:+.4f}, {c.high:+.4f}] (n={c.n})"
        for name, c in main.items()
    )
    reversed_ = [name for name, c in main.items() if c.outcome == NEGATIVE]
    if reversed_:
        verdict = FAILS
    elif missing:
        verdict = NOT_TESTED
        text += "; " + "; ".join(missing)
    elif main["float - int"].outcome == POSITIVE:
        verdict = HOLDS
    else:
        verdict = NOT_SEPARATED
    return Finding(
        3,
        CLAIMS[3],
        scope,
        ACC_COLUMN,
        CLAIM3_DEF,
        verdict,
        text,
        level,
        f"Bonferroni over m=2 intervals (each at {lvl:.4g})",
        comps,
    )


CLAIM4_DEF = (
    "(a) Every 3-bit proxy cell against its blockwise twin (same model, data type, block size, "
    "scale format, centering): proxy - blockwise accuracy, averaged over pairs. (b) Every 3-bit "
    "proxy cell against the blockwise 4-bit curve of the same data type, block size, scale "
    "format and centering across the scope's models, interpolated linearly in log2(total model "
    "bits) at the proxy cell's total bits (cells outside the curve's range left out): proxy - "
    "4-bit. Holds: (a) > 0 and (b) not > 0; does not hold: (a) < 0 or (b) > 0; else not "
    "separated. Two intervals, Bonferroni-widened."
)
_CURVE_CFG = ["dtype", "dtype_overrides", "block_size", "scale_format", "centering"]


def _curve_key(row: pd.Series) -> tuple:
    return tuple("nan" if pd.isna(row[c]) else str(row[c]) for c in _CURVE_CFG)


def _proxy_vs_4bit(proxy: pd.DataFrame, four: pd.DataFrame, samples: dict):
    """(proxy samples, 4-bit curve samples at its total bits) pairs; count outside the range."""
    curves: dict[tuple, list] = {}
    keys = pd.Series([_curve_key(row) for _, row in four.iterrows()], index=four.index)
    for key, group in four.groupby(keys, sort=True) if len(four) else []:
        curves[key] = _curve_points(group, 4, samples)
    pairs, outside = [], 0
    for _, row in proxy.iterrows():
        inside, s4 = _interp(
            curves.get(_curve_key(row), []), float(np.log2(row["total_model_bits"]))
        )
        if not inside:
            outside += 1
            continue
        pairs.append((samples.get(row["key"]), s4))
    return pairs, outside


def claim_proxy(scope, cells, samples, nll_samples, nll_col, n_boot, level, seed) -> Finding:
    """Claim 4 (definition: :data:`CLAIM4_DEF`)."""
    proxy = cells[cells["method"] == "proxy"]
    if proxy.empty:
        return _not_tested(4, scope, ACC_COLUMN, CLAIM4_DEF, "no proxy cells")
    proxy3 = proxy[proxy["bits"] == 3]
    if proxy3.empty:
        return _not_tested(4, scope, ACC_COLUMN, CLAIM4_DEF, "no 3-bit proxy cells")
    blockwise = cells[cells["method"] == PAPER_METHOD]
    lvl = bonferroni_level(level, 2)
    twins = {
        (row["_model"], *_curve_key(row)): row
        for _, row in blockwise[blockwise["bits"] == 3].iterrows()
    }
    pairs_a = [
        (row, twins[(row["_model"], *_curve_key(row))])
        for _, row in proxy3.iterrows()
        if (row["_model"], *_curve_key(row)) in twins
    ]
    comps, missing = [], []
    a = pooled_comparison(
        _sample_pairs(pairs_a, samples), "(a) proxy - blockwise, k=3", ACC_COLUMN, lvl, n_boot, seed
    )
    if a is None:
        missing.append("no 3-bit blockwise twins of the proxy cells with per-example data")
    else:
        comps.append(a)
    four = blockwise[blockwise["bits"] == 4]
    pairs_b, outside = _proxy_vs_4bit(proxy3, four, samples)
    b = pooled_comparison(
        pairs_b, "(b) proxy k=3 - blockwise k=4 at equal total bits", ACC_COLUMN, lvl, n_boot, seed
    )
    if b is None:
        missing.append(
            "no 4-bit blockwise curve (same data type, block size) covering the "
            "proxy cells' total bits"
        )
    else:
        if outside:
            b.note = "; ".join(
                filter(None, [b.note, f"{outside} proxy cell(s) outside the 4-bit curve's range"])
            )
        comps.append(b)
    if nll_col:
        c = pooled_comparison(
            _sample_pairs(pairs_a, nll_samples, lower_is_better=True),
            "(a) proxy - blockwise, k=3, NLL (lower better: sign flipped)",
            nll_col,
            level,
            n_boot,
            seed,
            DETAIL_ROLE,
        )
        comps += [c] if c else []
    if a is None and b is None:
        return _not_tested(4, scope, ACC_COLUMN, CLAIM4_DEF, "; ".join(missing))
    text = "; ".join(
        f"{c.label.split(' ')[0]} {c.estimate:+.4f} [{c.low:+.4f}, {c.high:+.4f}] (n={c.n})"
        for c in comps
        if c.role == VERDICT_ROLE
    )
    if (a and a.outcome == NEGATIVE) or (b and b.outcome == POSITIVE):
        verdict = FAILS
    elif missing:
        verdict, text = NOT_TESTED, text + "; " + "; ".join(missing)
    elif a.outcome == POSITIVE:
        verdict = HOLDS
    else:
        verdict = NOT_SEPARATED
    return Finding(
        4,
        CLAIMS[4],
        scope,
        ACC_COLUMN,
        CLAIM4_DEF,
        verdict,
        text,
        level,
        f"Bonferroni over m=2 intervals (each at {lvl:.4g})",
        comps,
    )


# --- the report --------------------------------------------------------------------------


def nll_column(cells: pd.DataFrame, nll_task: str | None = None) -> str | None:
    """The held-out NLL column the claims use: ``nll_task``, else wikitext2, else the first."""
    cols = sorted(c for c in cells.columns if c.endswith(":nll"))
    if nll_task:
        return f"{nll_task}:nll" if f"{nll_task}:nll" in cols else None
    cols = sorted(cols, key=lambda c: c != "wikitext2:nll")
    return cols[0] if cols else None


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
    nll_name = nll_col.split(":")[0] if nll_col else None
    for scope, scells in split_scopes(cells):
        report.scopes.append(scope)
        measured = scells[scells[ACC_COLUMN].notna()]
        if measured.empty:
            for claim in CLAIMS:
                report.findings.append(
                    _not_tested(claim, scope.name, ACC_COLUMN, "", f"no {ACC_COLUMN} measurements")
                )
            continue
        per_sample = results.per_sample(measured["key"].tolist())
        samples, nll_samples = _samples_by_key(per_sample, nll_name)
        if nll_col and not nll_samples:
            scope.notes.append(f"no per-window {nll_col} data: NLL comparisons skipped")
        scope_nll = nll_col if nll_samples else None
        args = (scope.name, measured)
        report.findings += [
            claim_bit_optimal(*args, per_sample, samples, n_boot, level, seed),
            claim_block_size(*args, samples, nll_samples, scope_nll, n_boot, level, seed),
            claim_dtype(*args, samples, nll_samples, scope_nll, n_boot, level, seed),
            claim_proxy(*args, samples, nll_samples, scope_nll, n_boot, level, seed),
        ]
    return report


def _num(x: float) -> str:
    return f"{x:+.4f}" if math.isfinite(x) else ""


def _ci_text(c: Comparison) -> str:
    if c.low is None or c.high is None:
        return ""
    return f"[{c.low:+.4f}, {c.high:+.4f}]"


def format_findings(report: Report) -> str:
    """The report as markdown (what ``kbit-plot --report`` writes to ``findings.md``)."""
    pct = f"{100 * report.level:g}%"
    lines = [
        "# Findings: the four claims of Dettmers & Zettlemoyer (2022)",
        "",
        f"Store `{report.results_dir}`. Paired percentile bootstrap over examples (stratified "
        f"by task), {report.n_boot} replicates, seed {report.seed}; verdicts at family-wise "
        f"level {pct}. Differences are oriented so that > 0 is the claim's direction. "
        "Intervals resample the examples; the models and cells measured are fixed. "
        'Definitions: docs/analysis.md, "Claims report".',
        "",
    ]
    lines += [f"Note: {n}" for n in report.notes]
    if not report.scopes:
        return "\n".join(lines) + "\n"
    lines += [
        "## Summary",
        "",
        "| scope | " + " | ".join(f"({k}) {t}" for k, t in CLAIMS.items()) + " |",
    ]
    lines.append("|---" * (len(CLAIMS) + 1) + "|")
    for scope in report.scopes:
        verdicts = {f.claim: f.verdict for f in report.findings if f.scope == scope.name}
        lines.append(f"| {scope.name} | " + " | ".join(verdicts.get(k, "") for k in CLAIMS) + " |")
    for scope in report.scopes:
        lines += [
            "",
            f"## {scope.name}",
            "",
            f"{scope.n_models} model(s), {scope.n_cells} cell(s); sweeps: {', '.join(scope.sweeps)}.",
        ]
        lines += [f"Note: {n}" for n in scope.notes]
        for f in (f for f in report.findings if f.scope == scope.name):
            lines += ["", f"### ({f.claim}) {f.text}", "", f"**{f.verdict}**: {f.reason}.", ""]
            if f.verdict == NOT_TESTED and not f.comparisons:
                continue
            lines.append(f"Metric `{f.metric}`; multiple comparisons: {f.correction}.")
            lines += [f"Note: {n}" for n in f.notes]
            if f.budgets:
                lines += [
                    "",
                    "| log2 budget | k compared | outcome | 4-bit highest estimate |",
                    "|---|---|---|---|",
                ]
                for b in f.budgets:
                    ks = ",".join(map(str, b["compared_k"]))
                    top = "yes" if b["four_bit_highest_estimate"] else "no"
                    lines.append(f"| {b['log2_budget']:.1f} | {ks} | {b['status']} | {top} |")
            lines += [
                "",
                "| comparison | metric | estimate | interval | level | pairs | examples "
                "| outcome | role | note |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for c in f.comparisons:
                lines.append(
                    f"| {c.label} | {c.metric} | {_num(c.estimate)} | {_ci_text(c)} | "
                    f"{c.level:.4g} | {c.n} | {c.n_examples} | {c.outcome} | {c.role} | {c.note} |"
                )
    return "\n".join(lines) + "\n"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def write_findings(report: Report, out: str | Path) -> list[Path]:
    """``findings.md`` and ``findings.json`` into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "findings.md", out / "findings.json"
    md.write_text(format_findings(report))
    js.write_text(json.dumps(_json_safe(report.to_dict()), indent=2) + "\n")
    return [md, js]
