"""With this much memory, which model and which precision? Answered from measured cells only.

The advisor considers every measured cell whose ``total_model_bits`` (as recorded: weights in
k bits, block scales, 16-bit leftovers) fits the budget, and reports the best by mean zero-shot
accuracy with its confidence interval, the runner-up, and a paired bootstrap interval of their
difference: if that interval contains 0, the data do not separate the two.

Best of N: the best of N noisy accuracies is biased up, and its ordinary interval is too
optimistic. So the best and the runner-up are *chosen* on half A of the examples (even
positions of each task's list) and their accuracies, intervals and difference are *estimated*
on the held-out half B (analysis/selection.py). Where some fitting cell has no per-example
results, the choice uses all examples and every interval is Bonferroni-widened instead: level
1 - alpha/N for an accuracy, 1 - alpha/(N(N-1)/2) for a difference. The output says which.

Budget units (case-insensitive, SI prefixes are powers of 10, IEC prefixes powers of 2)::

    bit, bits, kbit, Mbit, Gbit          1, 1e3, 1e6, 1e9 bits
    B, byte, bytes, kB, MB, GB, TB       8, 8e3, 8e6, 8e9, 8e12 bits
    KiB, MiB, GiB, TiB                   8 * 2**10, 2**20, 2**30, 2**40 bits

Units ending in a lower-case ``b`` (``b``, ``Gb``, ``Mib``) are refused as ambiguous: bits or
bytes? A wrong guess would be off by 8x.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.load import ACC_COLUMN, Results
from analysis.selection import (
    half_scores,
    rank_heldout,
    selection_text,
    split_halves,
    task_samples,
)
from analysis.stats import (
    DEFAULT_LEVEL,
    DEFAULT_N_BOOT,
    Interval,
    bootstrap_mean_ci,
    normal_interval,
    paired_bootstrap_diff,
)
from analysis.tables import config_label, rank_under_budget
from harness.names import did_you_mean

log = logging.getLogger(__name__)

_UNITS_BITS = {
    "bit": 1.0,
    "bits": 1.0,
    "kbit": 1e3,
    "kbits": 1e3,
    "mbit": 1e6,
    "mbits": 1e6,
    "gbit": 1e9,
    "gbits": 1e9,
    "b": 8.0,
    "byte": 8.0,
    "bytes": 8.0,
    "kb": 8e3,
    "mb": 8e6,
    "gb": 8e9,
    "tb": 8e12,
    "kib": 8.0 * 2**10,
    "mib": 8.0 * 2**20,
    "gib": 8.0 * 2**30,
    "tib": 8.0 * 2**40,
}
_UNIT_NAMES = ["bits", "kbit", "Mbit", "Gbit", "B", "kB", "MB", "GB", "TB"]
_UNIT_NAMES += ["KiB", "MiB", "GiB", "TiB"]
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_budget(text: str) -> float:
    """A memory budget such as ``4GiB``, ``500MB``, ``3.5GB`` or ``2e9bits`` -> bits."""
    m = _BUDGET_RE.match(str(text))
    if not m:
        raise ValueError(
            f"budget {text!r} is not <number><unit>, e.g. 4GiB, 500MB, 2e9bits; "
            f"units: {', '.join(_UNIT_NAMES)}"
        )
    number, unit = float(m.group(1)), m.group(2)
    if not unit:
        raise ValueError(f"budget {text!r} has no unit; add one of {', '.join(_UNIT_NAMES)}")
    if unit.endswith("b"):  # 'b', 'Gb', 'Mib': bits or bytes? refuse instead of guessing 8x
        raise ValueError(
            f"budget {text!r}: unit {unit!r} is ambiguous (bits or bytes?); write e.g. "
            f"{unit[:-1]}B for bytes or {unit[:-1]}bits for bits"
        )
    factor = _UNITS_BITS.get(unit.lower())
    if factor is None:
        hint = did_you_mean(unit, _UNIT_NAMES, cutoff=0.3)
        raise ValueError(
            f"budget {text!r}: unknown unit {unit!r}; known: {', '.join(_UNIT_NAMES)}{hint}"
        )
    bits = number * factor
    if not math.isfinite(bits) or bits <= 0:
        raise ValueError(f"budget {text!r} must be a positive, finite size")
    return bits


def format_bits(bits: float) -> str:
    """Bits as a human size in GiB/MiB (binary), with the bit count."""
    nbytes = bits / 8
    unit, div = ("GiB", 2**30) if nbytes >= 2**30 else ("MiB", 2**20)
    return f"{nbytes / div:.3g} {unit} ({bits:.4g} bits)"


class NothingFits(ValueError):
    """No measured cell fits the budget."""


@dataclass
class Choice:
    """One ranked cell. ``accuracy`` is the estimate to trust (see ``Advice.selection``)."""

    key: str
    model: str
    model_family: str
    bits: int
    dtype: str
    block_size: int | None
    config: str
    total_model_bits: float
    accuracy: float  # held-out half B when chosen by split, else all examples
    ci: Interval | None
    recorded_accuracy: float = float("nan")  # the store's value, all examples


@dataclass
class Advice:
    """The advisor's answer for one budget."""

    budget_bits: float
    best: Choice
    runner_up: Choice | None = None
    diff_ci: Interval | None = None  # best minus runner-up
    n_fitting: int = 0
    notes: list[str] = field(default_factory=list)
    selection_rule: str = "none"  # none | split | bonferroni (analysis/selection.py)
    selection: str = ""  # the one line saying how the best was chosen and estimated

    def to_dict(self) -> dict:
        def choice(c: Choice | None) -> dict | None:
            if c is None:
                return None
            d = dict(c.__dict__)
            d["ci"] = c.ci.to_dict() if c.ci else None
            return d

        return {
            "budget_bits": self.budget_bits,
            "budget_GiB": self.budget_bits / 8 / 2**30,
            "n_fitting": self.n_fitting,
            "selection_rule": self.selection_rule,
            "selection": self.selection,
            "best": choice(self.best),
            "runner_up": choice(self.runner_up),
            "diff_ci": self.diff_ci.to_dict() if self.diff_ci else None,
            "notes": self.notes,
        }


def _check_recorded(key: str, samples: dict[str, np.ndarray], recorded: float) -> None:
    """Warn when the per-task lists do not reproduce the recorded mean (a schema slip)."""
    macro = float(np.mean([v.mean() for v in samples.values()]))
    if abs(macro - recorded) > 1e-6:
        log.warning(
            "%s: macro mean of per-task per_sample (%.6f) != recorded %s (%.6f)",
            key,
            macro,
            ACC_COLUMN,
            recorded,
        )


def _choice(
    row: pd.Series,
    samples: dict[str, np.ndarray],
    context: pd.DataFrame,
    n_boot: int,
    level: float,
    seed: int,
) -> Choice:
    """A ranked cell with its interval at ``level`` from ``samples`` (or its stderr)."""
    se = row.get(f"{ACC_COLUMN}:stderr", np.nan)
    if samples:
        ci = bootstrap_mean_ci(samples, n_boot=n_boot, level=level, seed=seed)
    elif pd.notna(se):
        ci = normal_interval(row[ACC_COLUMN], se, level)
    else:
        ci = None
    bs = row["block_size"]
    return Choice(
        key=row["key"],
        model=row["model"],
        model_family=row["model_family"],
        bits=int(row["bits"]),
        dtype=row["dtype"],
        block_size=None if pd.isna(bs) else int(bs),
        config=config_label(row, context),
        total_model_bits=float(row["total_model_bits"]),
        accuracy=ci.estimate if ci is not None else float(row[ACC_COLUMN]),
        ci=ci,
        recorded_accuracy=float(row[ACC_COLUMN]),
    )


def _diff_interval(
    best: Choice,
    second: Choice,
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    n_boot: int,
    level: float,
    seed: int,
) -> tuple[Interval | None, str | None]:
    if a and b and set(a) == set(b) and all(a[t].shape == b[t].shape for t in a):
        return paired_bootstrap_diff(a, b, n_boot=n_boot, level=level, seed=seed), None
    diff = best.accuracy - second.accuracy
    if best.ci and second.ci and best.ci.method == second.ci.method == "normal":
        # Half-widths are z * stderr at the same level, so they add in quadrature.
        half = math.hypot(*[(c.ci.high - c.ci.low) / 2 for c in (best, second)])
        return Interval(diff, diff - half, diff + half, level, "normal-unpaired"), (
            "no paired per-example results: the difference CI is unpaired (wider)"
        )
    return None, "no per-example results for both: no CI for the difference"


def compare_cells(
    results: Results,
    key_a: str,
    key_b: str,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Interval:
    """Paired bootstrap CI of mean zero-shot accuracy, cell ``key_a`` minus cell ``key_b``.

    Keys are ``<sweep>/<cell_id>`` (the ``key`` column of the cell frame). The pair is named
    by the caller, not picked from the data, so no selection correction applies: all
    examples are used.
    """
    known = results.cells["key"].tolist()
    for key in (key_a, key_b):
        if key not in known:
            raise KeyError(
                f"cell key {key!r} is not among the {len(known)} ok cells{did_you_mean(key, known)}"
            )
    per_sample = results.per_sample([key_a, key_b])
    a, b = task_samples(per_sample, key_a), task_samples(per_sample, key_b)
    if not a or not b:
        raise ValueError(f"no per-example results for {key_a if not a else key_b!r}")
    return paired_bootstrap_diff(a, b, n_boot=n_boot, level=level, seed=seed)


def _nothing_fits(results: Results, budget_bits: float) -> NothingFits:
    cells = results.cells
    measured = cells[cells[ACC_COLUMN].notna()]
    small = measured.loc[measured["total_model_bits"].idxmin()]
    return NothingFits(
        f"no measured configuration fits {format_bits(budget_bits)}; the smallest is "
        f"{small['model']} k={int(small['bits'])} {config_label(small, measured)} at "
        f"{format_bits(small['total_model_bits'])}"
    )


def _bonferroni(level: float, m: int) -> float:
    """Per-interval level so that ``m`` intervals hold together with probability ``level``."""
    return 1 - (1 - level) / max(m, 1)


def advise(
    results: Results,
    budget_bits: float,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Advice:
    """The best measured (model, k, data type, block size) within ``budget_bits``.

    Best of N corrected (module docstring): chosen on half A, estimated on half B; or, when
    some fitting cell lacks per-example results, Bonferroni-widened intervals.
    """
    cells = results.cells
    if ACC_COLUMN not in cells.columns or cells[ACC_COLUMN].notna().sum() == 0:
        raise NothingFits(f"no cell in {results.results_dir!r} has a {ACC_COLUMN} measurement")
    ranked = rank_under_budget(cells, budget_bits)
    if ranked.empty:
        raise _nothing_fits(results, budget_bits)
    n = len(ranked)
    per_sample = results.per_sample(ranked["key"].tolist())
    order, rule = rank_heldout(ranked, half_scores(per_sample))
    top = order.head(2)
    samples = [task_samples(per_sample, key) for key in top["key"]]
    for (_, row), s in zip(top.iterrows(), samples, strict=True):
        if s:
            _check_recorded(row["key"], s, row[ACC_COLUMN])
    acc_level, diff_level = level, level
    if rule == "split":
        samples = [split_halves(s)[1] for s in samples]  # estimate on held-out half B
    elif rule == "bonferroni":
        acc_level, diff_level = _bonferroni(level, n), _bonferroni(level, n * (n - 1) // 2)
    choices = [
        _choice(row, s, ranked, n_boot, acc_level, seed)
        for (_, row), s in zip(top.iterrows(), samples, strict=True)
    ]
    advice = Advice(
        budget_bits=budget_bits,
        best=choices[0],
        n_fitting=n,
        selection_rule=rule,
        selection=selection_text(n, rule),
    )
    if advice.best.ci is None:
        advice.notes.append("no per-example results or stderr recorded: no CI for the best")
    if len(choices) > 1:
        advice.runner_up = choices[1]
        advice.diff_ci, note = _diff_interval(*choices, *samples, n_boot, diff_level, seed)
        if note:
            advice.notes.append(note)
    digests = ranked["data_digest"].nunique() if "data_digest" in ranked.columns else 1
    if digests > 1:
        advice.notes.append(
            f"the fitting cells were evaluated on {digests} different data sets (data "
            "digests): their accuracies are not strictly comparable"
        )
    return advice


def _choice_lines(title: str, c: Choice) -> list[str]:
    acc = f"{c.ci}" if c.ci else f"{c.accuracy:.4f} (no CI)"
    return [
        f"{title}: {c.model} ({c.model_family}) at k={c.bits}, {c.config}",
        f"  size {format_bits(c.total_model_bits)}",
        f"  mean zero-shot accuracy {acc}",
    ]


def format_advice(advice: Advice) -> str:
    """Human-readable advice, with the line that says how the best was picked."""
    lines = [
        f"Budget: {format_bits(advice.budget_bits)}; {advice.n_fitting} measured "
        "configuration(s) fit.",
        advice.selection,
        *_choice_lines("Best", advice.best),
    ]
    if advice.runner_up:
        lines += _choice_lines("Runner-up", advice.runner_up)
        if advice.diff_ci:
            d = advice.diff_ci
            verdict = (
                "not separated by the data (CI contains 0)"
                if d.low <= 0 <= d.high
                else "best is significantly better"
            )
            lines.append(f"Best - runner-up: {d}: {verdict}")
    lines += [f"Note: {n}" for n in advice.notes]
    return "\n".join(lines)
