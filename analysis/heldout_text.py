"""The held-out findings: headline sentences and tables (``heldout_findings.md``).

Every sentence is computed from a :class:`analysis.heldout_loss.HeldoutLoss`; the README's
caption quotes :func:`findings_summary`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.heldout_loss import IDENT, METHOD_TEXT, HeldoutLoss
from harness.records import BASELINE_BITS


def format_interval(est: float, low: float, high: float, signed: bool = False) -> str:
    """``+0.012 [0.009, 0.015]``: enough decimals to show the interval's width (3 to 6)."""
    width = abs(high - low)
    decimals = 3 if not width > 0 else int(min(6, max(3, 1 - np.floor(np.log10(width)))))
    sign = "+" if signed else ""
    return f"{est:{sign}.{decimals}f} [{low:.{decimals}f}, {high:.{decimals}f}]"


_ci = format_interval


def _bits_text(bits: float) -> str:
    e = np.log2(bits)
    return f"2^{e:.1f}".replace(".0", "") + f" ({bits / 8 / 1024:.0f} KiB)"


def findings_summary(loss: HeldoutLoss) -> list[str]:
    """The headline sentences (what the README caption quotes), computed from the data."""
    pct = round(100 * loss.level)
    lines = []
    for (fam, var), fp in loss.points.groupby(IDENT, sort=True):
        name = " ".join(str(i) for i in (fam, var) if i)
        q = fp.dropna(subset=["d16"])
        if not q.empty:  # the largest model with a 16-bit baseline
            largest = q.loc[q["n_params"].idxmax(), "model"]
            big = fp[fp["model"] == largest].sort_values("bits")
            base = big[big["bits"] == BASELINE_BITS].iloc[0]
            parts = [
                f"{int(r.bits)}-bit {_ci(r.d16, r.d16_low, r.d16_high, signed=True)}"
                for r in big.dropna(subset=["d16"]).itertuples()
            ]
            lines.append(
                f"{name}, largest model ({largest}, 16-bit loss "
                f"{_ci(base.nll, base.nll_low, base.nll_high)}): k-bit quantization changes its "
                f"held-out loss by {'; '.join(parts)} nats/token ({pct}% paired intervals)."
            )
            above = [
                f"{k}-bit at {int((g['d16_low'] > 0).sum())} of {len(g)}"
                for k, g in q.groupby("bits")
            ]
            below = int((q["d16_high"] < 0).sum())
            lines.append(
                f"{name}: models whose loss increase over 16-bit is above 0 beyond its interval: "
                f"{', '.join(above)} (below 0: {below} of {len(q)} model-k pairs)."
            )
        bud = loss.budgets[(loss.budgets["model_family"] == fam) & (loss.budgets["variant"] == var)]
        if bud.empty:
            continue
        wins = bud[bud["rank_a"] == 1]
        runner = bud[bud["rank_a"] == 2].set_index("budget_bits")
        counts = wins["bits"].value_counts().sort_index()
        sep_n = sum(bool(runner.loc[b, "d_best_low"] > 0) for b in wins["budget_bits"])
        lines.append(
            f"{name}: at {len(wins)} total-bit budgets covered by two or more k curves, the "
            f"lowest loss (ranked on half A) is at "
            + ", ".join(f"k={k} ({n})" for k, n in counts.items())
            + f"; its lead over the runner-up (half B) is above 0 beyond its interval at {sep_n} "
            f"of {len(wins)}."
        )
        # The budget the most curves cover (the largest such): the widest comparison.
        n_at = bud.groupby("budget_bits")["bits"].count()
        widest = float(n_at[n_at == n_at.max()].index.max())
        at = bud[bud["budget_bits"] == widest].sort_values("rank_a")
        best = int(at["bits"].iloc[0])
        gaps = "; ".join(
            f"{int(r.bits)}-bit {_ci(r.d_best, r.d_best_low, r.d_best_high, signed=True)}"
            for r in at.iloc[1:].sort_values("bits").itertuples()
        )
        lines.append(
            f"{name}: at {_bits_text(widest)}, the budget the most k curves cover "
            f"({len(at)}), the best k (ranked on half A) is {best} (loss "
            f"{at['nll'].iloc[0]:.3f}); each other k's loss minus it: {gaps} nats/token."
        )
    return lines


def _md_table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def findings_markdown(loss: HeldoutLoss) -> str:
    """The findings file: how the numbers were made, the headline sentences, the tables."""
    tokens = f" of {loss.window_tokens} predicted tokens" if loss.window_tokens else ""
    out = [
        "# Held-out loss against total model bits",
        "",
        f"Task `{loss.task}`: mean NLL (nats/token) of {loss.n_windows} windows{tokens} per "
        f"cell, the same windows in every cell. Numbers on {loss.estimate}; "
        + METHOD_TEXT.format(pct=round(100 * loss.level), n_boot=loss.n_boot, seed=loss.seed)
        + ".",
        "",
        "## Findings",
        "",
        *(f"- {line}" for line in findings_summary(loss)),
        "",
        "## Loss increase over the same model's 16-bit baseline",
        "",
    ]
    for (fam, var), fp in loss.points.groupby(IDENT, sort=True):
        ks = sorted(int(k) for k in fp["bits"].unique() if k != BASELINE_BITS)
        rows = []
        for model, g in fp.sort_values("n_params").groupby("model", sort=False):
            g = g.set_index("bits")
            row = {"model": model, "parameters": int(g["n_params"].iloc[0])}
            if BASELINE_BITS in g.index:
                r = g.loc[BASELINE_BITS]
                row["16-bit loss"] = _ci(r.nll, r.nll_low, r.nll_high)
            for k in ks:
                r = g.loc[k] if k in g.index else None
                ok = r is not None and np.isfinite(r.d16)
                row[f"{k}-bit"] = _ci(r.d16, r.d16_low, r.d16_high, signed=True) if ok else ""
            rows.append(row)
        configs = fp[fp["bits"] != BASELINE_BITS].drop_duplicates("bits").sort_values("bits")
        chosen = ", ".join(f"{int(r.bits)}-bit {r.config} (of {r.n_candidates})"
                           for r in configs.itertuples())  # fmt: skip
        out += [f"### {' '.join(str(i) for i in (fam, var) if i)}", "",
                f"Configuration per k (chosen on half A): {chosen}.", "",
                _md_table(pd.DataFrame(rows).fillna("")), ""]  # fmt: skip
    out += ["## Equal total bits: each k's loss minus the best k's (paired)", ""]
    for (fam, var), bud in loss.budgets.groupby(IDENT, sort=True):
        rows = []
        for budget, g in bud.groupby("budget_bits"):
            g = g.sort_values("rank_a")
            row = {"budget": _bits_text(budget), "best k (half A)": int(g["bits"].iloc[0]),
                   "its loss": f"{g['nll'].iloc[0]:.3f}"}  # fmt: skip
            for r in g.iloc[1:].itertuples():
                row[f"rank {r.rank_a}"] = (
                    f"k={r.bits}: {_ci(r.d_best, r.d_best_low, r.d_best_high, signed=True)}"
                )
            rows.append(row)
        table = pd.DataFrame(rows).fillna("")
        out += [f"### {' '.join(str(i) for i in (fam, var) if i)}", "", _md_table(table), ""]
    return "\n".join(out)
