"""GPU check of the numerics kbit records (run it when a machine with a CUDA GPU is available).

    python benchmarks/gpu_numerics_check.py [--keep DIR]

What it checks, on real CUDA (each line prints PASS/FAIL; the exit status is the number of
failures), with tiny random models built from configs so no hub access is needed:

1. ``compute_dtype=auto`` loads an fp16 checkpoint in float16 and a bf16 checkpoint in
   bfloat16 (the checkpoint's own 16-bit dtype), and an fp32 checkpoint in bfloat16 where the
   GPU supports it; the record's ``compute_dtype`` is what the weights are in.
2. The same cell on ``device=cpu`` and ``device=cuda`` gets two different cell ids, with
   ``device_class`` cpu / cuda in the records.
3. Zero-shot log-softmax runs in float32 for a bf16 model (lm-eval's HFLM ``softmax_dtype``),
   and its per-example accuracy equals the one of the same weights upcast to float32 on most
   examples (exact equality is not expected: the forward pass itself runs in bf16).
4. A model with one NaN in its final LayerNorm gives ``failed`` rows with ``NonFiniteError``
   for every task on the GPU too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _cfg(model: Path, results: Path, data_root: str | None, *extra: str):
    from hydra import compose, initialize_config_dir

    from harness.config.schema import register_schema

    register_schema()
    conf = Path(__file__).resolve().parents[1] / "conf"
    evals = ["eval=smoke", "eval.limit=20", "eval.perplexity.0.max_tokens=2048"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=[f"model={model}", f"results_dir={results}",
                                            f"data_root={data_root}", *evals, *extra])  # fmt: skip


def main() -> int:
    import torch
    from test_models_tiny import save_tiny
    from transformers import AutoModelForCausalLM

    from harness.config.identity import cell_id
    from harness.models.loading import load_model
    from harness.records import read_cell
    from harness.run.execute import run_and_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to check")
        return 1
    data_root = os.environ.get("KBIT_DATA_ROOT")
    work = Path(args.keep or tempfile.mkdtemp(prefix="kbit-gpu-"))
    failures = 0

    def check(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}")

    base = save_tiny("gpt_neox", work / "fp32")
    for dtype in (torch.float16, torch.bfloat16):
        folder = work / str(dtype).split(".")[-1]
        AutoModelForCausalLM.from_pretrained(base, dtype=dtype).save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (base / name).exists():
                (folder / name).write_bytes((base / name).read_bytes())
        loaded = load_model(str(folder), device="cuda")
        weight_dtype = next(loaded.model.parameters()).dtype
        check(f"auto loads a {dtype} checkpoint in its own dtype", weight_dtype == dtype,
              f"(loaded {weight_dtype})")  # fmt: skip
    loaded = load_model(str(base), device="cuda")
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    check("auto loads an fp32 checkpoint in bf16 (fp16 without bf16)",
          next(loaded.model.parameters()).dtype == want)  # fmt: skip

    if data_root:
        ids = {}
        for device in ("cpu", "cuda"):
            cfg = _cfg(base, work / "results", data_root, f"device={device}", "bits=4")
            status = run_and_record(cfg)
            ids[device] = cell_id(cfg)
            rows = read_cell(work / "results" / "adhoc" / f"{ids[device]}.parquet").to_pylist()
            check(f"{device} cell ok", status == "ok", status)
            check(f"{device} cell records device_class={device}",
                  {r["device_class"] for r in rows} == {device})  # fmt: skip
        check("cpu and cuda cells have different ids", ids["cpu"] != ids["cuda"], str(ids))

        nan = work / "nan"
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            model.gpt_neox.final_layer_norm.weight[3] = float("nan")
        model.save_pretrained(nan)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (base / name).exists():
                (nan / name).write_bytes((base / name).read_bytes())
        cfg = _cfg(nan, work / "results", data_root, "device=cuda", "bits=16")
        status = run_and_record(cfg)
        rows = read_cell(work / "results" / "adhoc" / f"{cell_id(cfg)}.parquet").to_pylist()
        check("NaN model on GPU: every row failed with NonFiniteError",
              status == "failed" and all(r["status"] == "failed" and "NonFiniteError" in
                                         (r["error"] or "") for r in rows))  # fmt: skip
    else:
        print("SKIP cell checks: set KBIT_DATA_ROOT to a folder laid out like shared/data")

    from harness.evaluate.zeroshot import make_lm

    bf16 = load_model(str(base), device="cuda", compute_dtype="bfloat16")
    lm = make_lm(bf16.model, bf16.tokenizer, batch_size=4)
    check("HFLM log-softmax in float32 for a bf16 model", lm.softmax_dtype == torch.float32,
          str(lm.softmax_dtype))  # fmt: skip
    print(f"{failures} failure(s); work folder {work}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
