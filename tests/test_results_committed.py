"""The measured stores committed under docs/results/ reproduce the fits and findings beside them.

docs/results/ holds the stores of the `tokens` and `micro` claims sweeps (as .tar.xz: the
parquet cell files verbatim) and what kbit-fit and kbit-plot --report made of them. A change
to the analysis that moves a committed number fails here, and a reader can check any figure
or verdict from the store without retraining a model (docs/results/README.md).
"""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import pytest

from analysis.claims import claims_report
from analysis.fit import fit_store
from analysis.load import load_results

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _store(name: str, tmp_path: Path) -> Path:
    archive = RESULTS / name / "store.tar.xz"
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path


def test_the_tokens_fit_is_reproduced_from_the_committed_store(tmp_path: Path) -> None:
    committed = json.loads((RESULTS / "tokens" / "fit" / "fit.json").read_text())
    opts = committed["options"]
    report = fit_store(
        load_results(_store("tokens", tmp_path)),
        task=opts["task"], method=opts["method"], block_size=opts["block_size"],
        bits=opts["bits"], dtypes=opts["dtypes"], n_boot=opts["n_boot"], seed=opts["seed"],
        level=opts["level"], min_delta=opts["min_delta"],
    )  # fmt: skip
    fresh = report.to_dict()
    assert sorted(fresh["fits"]) == sorted(committed["fits"])
    for group, fit in committed["fits"].items():
        for name, interval in fit["params"].items():
            got = fresh["fits"][group]["params"][name]
            for end in ("estimate", "low", "high"):
                assert got[end] == pytest.approx(interval[end], rel=1e-9), (group, name, end)
    assert [r["verdict"] for r in fresh["leave_one_out"]] == [
        r["verdict"] for r in committed["leave_one_out"]
    ]


@pytest.mark.parametrize("name", ["tokens", "micro"])
def test_the_claims_findings_are_reproduced_from_the_committed_store(
    name: str, tmp_path: Path
) -> None:
    committed = json.loads((RESULTS / name / "findings.json").read_text())
    report = claims_report(
        load_results(_store(name, tmp_path)),
        n_boot=committed["n_boot"],
        level=committed["level"],
        seed=committed["seed"],
    ).to_dict()
    verdicts = [(f["scope"], f["claim"], f["verdict"]) for f in report["findings"]]
    assert verdicts == [(f["scope"], f["claim"], f["verdict"]) for f in committed["findings"]]
    for new, old in zip(report["findings"], committed["findings"], strict=True):
        for a, b in zip(new["comparisons"], old["comparisons"], strict=True):
            for end in ("estimate", "low", "high"):
                if b[end] is None:  # findings.json writes a missing number (None, NaN) as null
                    assert a[end] is None or math.isnan(a[end])
                else:
                    assert a[end] == pytest.approx(b[end], rel=1e-9, abs=1e-12), (a, b)
