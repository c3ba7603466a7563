"""The paper sweep on a Slurm launcher, planned as a user would (``hydra.sweeper.dry_run=true``):
19,994 cells, packed into jobs of one model, each model's resources from the rule applied to
its config.json parameter count, nothing loaded, written or submitted.

Hub metadata comes from a local HF cache of the paper models' config.json files (as a user
with the hub cache populated would have it; the tests are offline).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_paper_plan_prints_jobs_arrays_and_resources_per_model(tmp_path, data_root, plan_bench):
    hub = plan_bench.build_fake_hub(tmp_path / "hf" / "hub")
    results = tmp_path / "results"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(hub),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KBIT_DATA_ROOT": str(data_root)}  # fmt: skip
    cmd = [
        str(Path(sys.executable).parent / "kbit-run"), "--multirun", "+sweeps@_global_=paper",
        f"results_dir={results}", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=1", "hydra.sweeper.dry_run=true",
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "19994 cells in total" in text, text[-3000:]
    plan = re.search(r"plan: 19994 cells in (\d+) jobs .*?(\d+) resource class\(es\):", text)
    assert plan, text[-3000:]
    classes = [line for line in text.splitlines() if line.startswith("  - ")]
    assert len(classes) == int(plan.group(2)) >= 3
    by_label = {line.split(":")[0][4:]: line for line in classes}
    big = [label for label, line in by_label.items() if "facebook/opt-66b" in line]
    bloom = [label for label, line in by_label.items() if "bigscience/bloom," in line + ","]
    assert big and big[0].startswith("2 GPU"), by_label  # 66B x 2 bytes x 1.3 > 80 GB
    assert bloom and bloom[0].startswith("6 GPU"), by_label  # 176B
    small = [label for label, line in by_label.items() if "facebook/opt-125m" in line]
    assert small and small[0].startswith("1 GPU"), by_label
    assert "dry run" in text and "submitted" not in text
    assert not results.exists() or not any(results.rglob("*.parquet"))
