"""kbit-run's recorded accuracy equals the lm_eval command line's on the same saved model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_models_tiny import save_tiny

from harness.records import read_store, records_from_table

TASKS = ["lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy"]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_kbit_run_accuracy_equals_lm_eval_cli(tmp_path, data_root):
    from harness.models.loading import load_model
    from harness.quantize import quantize_model

    env = {
        **os.environ,
        "KBIT_CACHE_DIR": str(tmp_path / "cache"),
        "KBIT_DATA_ROOT": str(data_root),
    }
    model_dir = save_tiny("gpt_neox", tmp_path / "tiny")
    tasks = "[" + ",".join(TASKS) + "]"
    subprocess.run(
        [str(BIN / "kbit-run"), f"model={model_dir}", "eval=smoke", f"eval.tasks={tasks}",
         f"eval.mean_of={tasks}", "eval.perplexity=[]", "eval.limit=12", "eval.batch_size=4",
         "dtype=int", "bits=4", "block_size=32", f"results_dir={tmp_path / 'results'}",
         "device=cpu"],
        check=True, env=env,
    )  # fmt: skip
    rows = records_from_table(read_store(tmp_path / "results"))
    assert rows and {r.status for r in rows} == {"ok"}

    # the same quantized weights, saved, evaluated by lm-eval's own command line
    loaded = load_model(str(model_dir), device="cpu")
    quantize_model(loaded.model, "int", 4, 32, progress=False)
    loaded.model.save_pretrained(tmp_path / "quantized")
    loaded.tokenizer.save_pretrained(tmp_path / "quantized")
    include = tmp_path / "tasks"
    subprocess.run([sys.executable, "-m", "harness.evaluate", "--data-root", str(data_root),
                    "--out", str(include), "--tasks", ",".join(TASKS)], check=True, env=env)  # fmt: skip
    subprocess.run(
        [str(BIN / "lm_eval"), "--model", "hf",
         "--model_args", f"pretrained={tmp_path / 'quantized'},dtype=float32",
         "--tasks", ",".join(TASKS), "--include_path", str(include), "--limit", "12",
         "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "lm_eval")],
        check=True, env=env,
    )  # fmt: skip
    cli = json.loads(next((tmp_path / "lm_eval").rglob("results*.json")).read_text())["results"]
    got = {(r.task, r.metric): r.value for r in rows}
    compared = 0
    for task in TASKS:
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in cli[task]:
                assert got[(task, metric)] == cli[task][f"{metric},none"], (task, metric)
                compared += 1
    assert compared == 8  # lambada acc, piqa 2, hellaswag 2, winogrande acc, arc_easy 2
