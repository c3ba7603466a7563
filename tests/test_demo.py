"""``kbit-demo`` end to end through its console script: family, sweep, store, figures, tables,
and the headline held-out loss figure with its findings.

The stock demo (the `demo` family, 84 cells) takes minutes of CPU; CI runs the same three
stages on the `nano` family (built once per session) with a trimmed grid and task limit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from zoo_fixtures import corpus_for_tests, nano_zoo  # noqa: F401 (fixture)

from harness.demo import FINDINGS, HEADLINE, checkout_figures, findings_text
from harness.records import read_store

pytestmark = pytest.mark.slow

GRID = 'hydra.sweeper.grids=[{dtype:"int,quantile",bits:"3,4"},{bits:"16"}]'


def test_kbit_demo_runs_every_stage_and_resumes(nano_zoo, tmp_path):  # noqa: F811
    zoo_dir = next(iter(nano_zoo.values())).parents[1]
    cmd = [str(Path(sys.executable).parent / "kbit-demo"), "--family", "nano",
           "--zoo-dir", str(zoo_dir), "--results", str(tmp_path / "results"),
           "--out", str(tmp_path / "figures"), GRID, "eval.limit=20"]  # fmt: skip
    if corpus_for_tests():
        cmd[3:3] = ["--corpus", corpus_for_tests()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    readme_figures = checkout_figures()
    before = {p: p.read_bytes() if p.exists() else None for p in readme_figures.values()}

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_store(tmp_path / "results", "demo").to_pylist()
    cells = {r["cell_id"] for r in rows}
    assert len(cells) == 3 * 5 and all(r["status"] == "ok" for r in rows)
    assert {r["model"] for r in rows} == {f"zoo:nano/{s}" for s in nano_zoo}
    assert {r["task"] for r in rows} >= {"heldout", "zoo_mc", "zoo_lastword", "zeroshot_mean"}
    assert (tmp_path / "figures" / "scaling_acc.png").stat().st_size > 10_000
    assert "Bit-optimal k per total-bit budget" in proc.stdout
    # The headline: held-out loss with per-window intervals, its findings printed.
    assert (tmp_path / "figures" / HEADLINE).stat().st_size > 10_000
    findings = findings_text(tmp_path / "figures" / FINDINGS)
    assert "largest model" in findings and findings in proc.stdout
    nll = [r for r in rows if r["task"] == "heldout" and r["metric"] == "nll"]
    assert nll and all(r["per_sample"] for r in nll)
    assert "1/3" in proc.stderr and "2/3" in proc.stderr and "3/3" in proc.stderr
    # A non-stock run leaves the README's figures alone.
    assert {p: p.read_bytes() if p.exists() else None for p in readme_figures.values()} == before

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "15 done, 0 failed, 0 to run" in again.stdout + again.stderr
    assert read_store(tmp_path / "results", "demo").num_rows == len(rows)
