"""The claims report as markdown (``findings.md``) and JSON (``findings.json``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from analysis.claims.model import CLAIMS, NOT_TESTED, Comparison, Report


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


def json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def write_findings(report: Report, out: str | Path) -> list[Path]:
    """``findings.md`` and ``findings.json`` into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "findings.md", out / "findings.json"
    md.write_text(format_findings(report))
    js.write_text(json.dumps(json_safe(report.to_dict()), indent=2) + "\n")
    return [md, js]
