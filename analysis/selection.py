"""Selection on one half of the examples, estimation on the other: unbiased best-of-N.

Why: picking the best of N configurations by their observed accuracy and then reporting that
same accuracy reports the maximum of N noisy numbers, which is biased upwards, and more so
the larger N (a grid holds more configurations at k=4 and k=8 than at other k, so exactly
those curves would be lifted). Splitting each task's examples in two halves by position makes
the choice and the estimate rest on disjoint examples: the held-out estimate of whatever was
chosen is unbiased for that choice's accuracy.

Halves: *half A* is the even positions (0, 2, 4, ...) of every task's ``per_sample`` list,
*half B* the odd positions. Every cell of a store evaluates the same examples in the same
order, so position i is the same example in every cell (the paired design is kept).

Points shown together rest on the same examples (:func:`same_examples`): once any point of a
panel is reported on half B, every point of it is, baselines included. A point on all examples
drawn next to one on half B would differ by the sampling noise of the half (0.18 against 0.14
for one cell of a zoo store), which reads like an effect of k.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from harness.records import MEAN_ZEROSHOT_TASK

log = logging.getLogger(__name__)

HALF_A = "half A (even example positions)"
HALF_B = "half B (odd example positions)"
SCORE_COLUMNS = ["acc_a", "acc_b"]
# What a main-curve point rests on (the ``estimate`` column of analysis.tables.main_curves).
ESTIMATE_ALL = "all examples"
ESTIMATE_HELDOUT = f"held-out {HALF_B}"


def split_halves(samples: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """``({task: half A}, {task: half B})`` of one cell's per-task 0/1 results."""
    a = {t: np.asarray(v, dtype=float)[0::2] for t, v in samples.items()}
    b = {t: np.asarray(v, dtype=float)[1::2] for t, v in samples.items()}
    return a, b


def task_samples(per_sample: pd.DataFrame, key: str) -> dict[str, np.ndarray]:
    """{task: per-example 0/1} of one cell's per-task accuracy rows (not the derived mean)."""
    rows = per_sample[(per_sample["key"] == key) & (per_sample["metric"] == "acc")]
    rows = rows[rows["task"] != MEAN_ZEROSHOT_TASK]
    return {r.task: np.asarray(r.per_sample, dtype=float) for r in rows.itertuples()}


def half_scores(per_sample: pd.DataFrame) -> pd.DataFrame:
    """Macro-mean accuracy per cell on half A and on half B, indexed by ``key``.

    Only per-task ``acc`` rows count (the derived ``zeroshot_mean`` row is the same examples
    again). A cell whose tasks have fewer than two examples has no two halves: it is left out.
    """
    rows = per_sample[(per_sample["metric"] == "acc") & (per_sample["task"] != MEAN_ZEROSHOT_TASK)]
    keys, acc_a, acc_b = [], [], []
    for key, values in zip(rows["key"], rows["per_sample"], strict=True):
        v = np.asarray(values, dtype=float)
        if v.size < 2:
            continue
        keys.append(key)
        acc_a.append(v[0::2].mean())
        acc_b.append(v[1::2].mean())
    per_task = pd.DataFrame({"key": keys, "acc_a": acc_a, "acc_b": acc_b})
    return per_task.groupby("key")[SCORE_COLUMNS].mean()


def selection_text(n: int, rule: str) -> str:
    """The one line every output states about how its best was chosen and estimated."""
    if n <= 1:
        return "selection: none (one candidate); estimated on all examples"
    if rule == "split":
        return (
            f"selection: best of N={n} chosen on {HALF_A}, accuracy estimated on held-out {HALF_B}"
        )
    if rule == "bonferroni":
        return (
            f"selection: best of N={n} chosen on all examples (no per-example results to split); "
            f"intervals Bonferroni-widened over the N={n} candidates"
        )
    if rule == "fixed":
        return f"selection: fixed rule among N={n} (coverage, then label; no accuracy used)"
    raise ValueError(f"unknown selection rule {rule!r}")


def rank_heldout(ranked: pd.DataFrame, scores: pd.DataFrame | None) -> tuple[pd.DataFrame, str]:
    """Candidate cells re-ranked so that the best's reported accuracy is unbiased.

    ``ranked``: the candidates (with ``key`` and ``total_model_bits``); ``scores``: from
    :func:`half_scores`. Returns ``(frame, rule)``:

    * ``"none"``: at most one candidate, nothing was selected; ``frame`` as given;
    * ``"split"``: ranked by half-A accuracy (ties: fewer total bits, then key), with
      ``acc_a``/``acc_b`` columns: report ``acc_b`` of the top rows;
    * ``"bonferroni"``: some candidate has no two halves (no per-example results), so
      ``frame`` stays ranked on all examples and its intervals must be widened over N.
    """
    if len(ranked) <= 1:
        return ranked, "none"
    if scores is None:
        return ranked, "bonferroni"
    joined = ranked.join(scores[SCORE_COLUMNS], on="key")
    if joined["acc_a"].isna().any():
        return ranked, "bonferroni"
    order = joined.sort_values(
        ["acc_a", "total_model_bits", "key"], ascending=[False, True, True], ignore_index=True
    )
    return order, "split"


def same_examples(
    curves: pd.DataFrame,
    scores: pd.DataFrame | None,
    y: str,
    panel: Sequence[str] = ("model_family",),
) -> pd.DataFrame:
    """``curves`` with every accuracy of a panel on the same examples as its held-out points.

    ``curves``: rows with ``key``, ``y`` and ``estimate`` (:func:`analysis.tables.main_curves`);
    ``scores``: :func:`half_scores` of the same store. Within each ``panel`` group (one figure
    panel, or one family's rows of a table) that holds a point reported on held-out half B,
    every point reported on all examples (a 16-bit baseline, a k with one candidate
    configuration) is replaced by its own half-B accuracy, and its ``estimate`` says so. Half B
    played no part in any choice, so it stays an unbiased estimate for those points too; only
    the noise grows, and it is the same noise the selected points carry.

    Perplexity curves are left as they are: perplexity is never split, so they hold no
    half-B point. A point with no half-B score
    (no per-example results) cannot move: it keeps its all-examples value, with one warning
    per panel naming how many points differ. Idempotent.
    """
    if scores is None or curves.empty or "estimate" not in curves.columns:
        return curves
    held = curves["estimate"] == ESTIMATE_HELDOUT
    if not held.any():
        return curves
    cols = [c for c in panel if c in curves.columns]
    in_split_panel = (
        held.groupby([curves[c] for c in cols], dropna=False).transform("any")
        if cols
        else pd.Series(True, index=curves.index)
    )
    move = in_split_panel & (curves["estimate"] == ESTIMATE_ALL)
    if not move.any():
        return curves
    acc_b = curves["key"].map(scores["acc_b"]) if "acc_b" in scores else np.nan
    acc_b = pd.Series(acc_b, index=curves.index, dtype=float)
    ok = move & acc_b.notna()
    out = curves.copy()
    out.loc[ok, y] = acc_b[ok]
    out.loc[ok, "estimate"] = ESTIMATE_HELDOUT
    stuck = move & ~ok
    if stuck.any():
        where = ", ".join(sorted({str(v) for v in curves.loc[stuck, cols[0]]}) if cols else ["all"])
        log.warning(
            "%d point(s) without per-example results stay on all examples beside points on "
            "held-out %s (%s): they are not on the same examples",
            int(stuck.sum()),
            HALF_B,
            where,
        )
    return out
