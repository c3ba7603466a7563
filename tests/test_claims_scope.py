"""The claims as one typed ``claim(scope: ScopeData) -> Finding`` each (issue 23, item 4).

A newcomer tests a claim on one scope by building its :class:`ScopeData` from the public
functions and calling the claim; that gives the finding the full report gives.
"""

from __future__ import annotations

import inspect
import json
import typing

import pytest

import analysis.claims as claims
from analysis.claims import (
    CLAIM_TESTS,
    CLAIMS,
    Finding,
    ScopeData,
    claims_report,
    nll_column,
    scope_data,
    split_scopes,
)
from analysis.load import ACC_COLUMN, load_results
from analysis.synthetic import write_synthetic_store

N_BOOT = 200


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    store = write_synthetic_store(
        tmp_path_factory.mktemp("store"),
        families=("pythia",),
        sizes=(125e6, 1.3e9, 6.7e9),
        ks=(3, 4, 8, 16),
        dtypes=("int", "float", "quantile"),
        block_sizes=(64, 256),
        variants=(("blockwise", False, 0.0), ("proxy", False, 0.02)),
        n_examples=60,
    )
    return load_results(store)


def test_every_claim_takes_one_scope_and_returns_a_finding():
    assert sorted(CLAIM_TESTS) == sorted(CLAIMS)
    for number, test in CLAIM_TESTS.items():
        params = list(inspect.signature(test).parameters)
        hints = typing.get_type_hints(test)
        assert params == ["scope"], (number, params)
        assert hints["scope"] is ScopeData and hints["return"] is Finding, number


def test_a_claim_on_a_scope_built_by_hand_equals_the_report(results):
    report = claims_report(results, n_boot=N_BOOT, seed=3)
    cells = results.cells
    nll_col = nll_column(cells)
    scopes = split_scopes(cells)
    assert [s.name for s, _ in scopes] == [s.name for s in report.scopes]
    for scope, scells in scopes:
        measured = scells[scells[ACC_COLUMN].notna()]
        data = scope_data(results, scope, measured, nll_col, N_BOOT, report.level, 3)
        assert data.name == scope.name and len(data.cells) == len(measured)
        for number, test in CLAIM_TESTS.items():
            mine = json.dumps(test(data).to_dict(), sort_keys=True, default=str)
            (theirs,) = [
                json.dumps(f.to_dict(), sort_keys=True, default=str)
                for f in report.findings
                if f.scope == scope.name and f.claim == number
            ]
            assert mine == theirs, (scope.name, number)
    # the verdicts are real tests of the grid, not all "not tested"
    assert {f.verdict for f in report.findings} - {claims.NOT_TESTED}


def test_the_old_public_names_are_importable_from_analysis_claims():
    for name in ("Comparison", "Finding", "Scope", "Report", "pooled_comparison",
                 "split_scopes", "claims_report", "format_findings", "write_findings",
                 "bonferroni_level", "claim_bit_optimal", "claim_block_size", "claim_dtype",
                 "claim_proxy", "CLAIM1_DEF", "CLAIM4_DEF", "HOLDS", "VERDICTS"):  # fmt: skip
        assert hasattr(claims, name), name
