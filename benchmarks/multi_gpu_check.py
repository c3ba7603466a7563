"""Multi-GPU check of sharded loading (run it when a machine with >= 2 CUDA GPUs is available).

    python benchmarks/multi_gpu_check.py [--model DIR] [--families gpt_neox,llama,opt]
                                         [--compute-dtype float32] [--cpu-dry-run] [--keep DIR]

With fewer than 2 GPUs it prints ``skipped: needs >= 2 GPUs`` and exits 0 (``--cpu-dry-run``
runs the same steps with every "GPU" replaced by the CPU, to check the script itself).

For each model (tiny random GPT-NeoX / Llama / OPT with 8 decoder blocks built from configs,
OPT's head tied to its embedding; or ``--model``, a local folder), it loads the model twice:
once whole on ``cuda:0``, once through ``load_model(device="auto", gpu_memory=...)`` with a
per-GPU memory small enough that the plan (``harness.models.placement``) must shard it. Then, each
line PASS/FAIL, the exit status the number of failures:

1. the sharded load follows the plan: more than one GPU holds weights, every parameter sits
   on the GPU its device-map entry names, ``device`` is the input embedding's, device class
   ``cuda``;
2. logits and perplexity of the unquantized model equal the single-device ones (within
   ``--rtol``; cross-GPU copies do not change values, so they are normally identical);
3. round-to-nearest quantization in place: every quantized weight stays on its own GPU and
   equals the single-device model's bit for bit; perplexity within ``--rtol``;
4. GPTQ (calibration activations moved to each layer's GPU): perplexity within ``--gptq-rtol``
   of the single-device GPTQ;
5. restore: every weight bit-identical to the pristine weights, on its own GPU; perplexity
   back to the unquantized value exactly.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HEADROOM = 1.25
_TEXT = (
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst "
    "of times. Call me Ishmael. In the beginning the universe was created. Question: Answer: "
) * 60


def build_model(family: str, folder: Path) -> Path:
    """A random-weight model of ``family`` with 8 decoder blocks, saved with its tokenizer."""
    import torch
    from test_models_tiny import tiny_config, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_config(family, len(tok))
    cfg.num_hidden_layers = 8
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def eval_text() -> str:
    root = os.environ.get("KBIT_DATA_ROOT")
    wiki = Path(root) / "eval/wikitext2/test.txt" if root else None
    return wiki.read_text()[:20000] if wiki is not None and wiki.is_file() else _TEXT


def snapshot(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def main() -> int:
    import torch

    from harness.evaluate import perplexity_details
    from harness.models.loading import load_model
    from harness.models.placement import input_device, plan_placement
    from harness.quantize import quantize_model, restore_model
    from harness.quantize.gptq import calibration_ids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local model folder (default: tiny built models)")
    parser.add_argument("--families", default="gpt_neox,llama,opt")
    parser.add_argument("--compute-dtype", default="float32")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--gptq-rtol", type=float, default=1e-2)
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="no GPUs: every 'GPU' is the CPU (checks the script only)")  # fmt: skip
    parser.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus < 2 and not args.cpu_dry_run:
        print(f"skipped: needs >= 2 GPUs (found {n_gpus}); nothing checked")
        return 0
    work = Path(args.keep or tempfile.mkdtemp(prefix="kbit-multigpu-"))
    os.environ.setdefault("KBIT_CACHE_DIR", str(work / "cache"))
    text = eval_text()
    failures = 0

    def check(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}".rstrip(), flush=True)

    def close(a: float, b: float, rtol: float) -> bool:
        return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * abs(b)

    folders = [Path(args.model)] if args.model else [
        build_model(f, work / f) for f in args.families.split(",")
    ]  # fmt: skip
    n_fake = max(n_gpus, 4) if args.cpu_dry_run else n_gpus
    for folder in folders:
        tag = folder.name
        single = load_model(str(folder), device="cpu" if args.cpu_dry_run else "cuda:0",
                            compute_dtype=args.compute_dtype)  # fmt: skip
        weight_bytes = sum(p.numel() * p.element_size() for p in single.model.parameters())
        # GPU 0 cannot hold weights x headroom; all GPUs together can
        fake = [int(weight_bytes * HEADROOM * max(0.6, 1.5 / n_fake))] * n_fake
        if args.cpu_dry_run:
            from accelerate import dispatch_model

            plan = plan_placement(folder, single.compute_dtype, fake, headroom=HEADROOM)
            cpu_map = dict.fromkeys(plan.device_map, "cpu")
            sharded = load_model(str(folder), device_map=cpu_map, compute_dtype=args.compute_dtype)
            dispatch_model(sharded.model, cpu_map, force_hooks=True)
            expected = cpu_map
        else:
            sharded = load_model(str(folder), device="auto", gpu_memory=fake,
                                 compute_dtype=args.compute_dtype, headroom=HEADROOM)  # fmt: skip
            plan = sharded.placement
            expected = sharded.device_map or {}
        model = sharded.model
        # 1. placement
        check(f"{tag}: plan shards over several GPUs",
              plan is not None and plan.sharded and len(plan.devices) > 1,
              f"{plan.devices if plan else None}: {plan.reason if plan else 'no plan'}")  # fmt: skip
        keys = sorted(expected, key=len, reverse=True)

        def want_device(name: str, keys=keys, expected=expected) -> torch.device:
            key = next(k for k in keys if k == "" or name == k or name.startswith(k + "."))
            d = expected[key]
            return torch.device(f"cuda:{d}" if isinstance(d, int) else d)

        wrong = [n for n, p in model.named_parameters() if p.device != want_device(n)]
        check(f"{tag}: every parameter on its device-map GPU", not wrong, str(wrong[:3]))
        check(f"{tag}: device is the input embedding's, class {sharded.device_class}",
              sharded.device == input_device(model)
              and sharded.device_class == ("cpu" if args.cpu_dry_run else "cuda"),
              str(sharded.device))  # fmt: skip
        # 2. unquantized logits and perplexity
        ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a = single.model(ids.to(single.device), use_cache=False).logits.float().cpu()
            b = model(ids.to(sharded.device), use_cache=False).logits.float().cpu()
        check(f"{tag}: logits equal single-device", torch.allclose(a, b, rtol=args.rtol, atol=1e-5),
              f"max |diff| {float((a - b).abs().max()):.3g}")  # fmt: skip

        def ppl(m, tok=single.tokenizer) -> float:
            return perplexity_details(m, tok, text, args.seqlen, progress=False).ppl

        p_single, p_sharded = ppl(single.model), ppl(model)
        check(f"{tag}: perplexity equals single-device", close(p_sharded, p_single, args.rtol),
              f"{p_sharded:.6f} vs {p_single:.6f}")  # fmt: skip
        pristine = snapshot(model)
        devices = {n: p.device for n, p in model.named_parameters()}
        # 3. round-to-nearest in place, per device
        report = quantize_model(model, "int", 4, 64, progress=False)
        quantize_model(single.model, "int", 4, 64, progress=False)
        ref = single.model.state_dict()
        moved = [n for n, p in model.named_parameters() if p.device != devices[n]]
        differ = [f"{n}.weight" for n in report.modules
                  if not torch.equal(model.state_dict()[f"{n}.weight"].cpu(), ref[f"{n}.weight"].cpu())]  # fmt: skip
        check(f"{tag}: RTN weights stay on their GPUs", not moved, str(moved[:3]))
        check(f"{tag}: RTN weights equal single-device bit for bit", not differ, str(differ[:3]))
        q_single, q_sharded = ppl(single.model), ppl(model)
        check(f"{tag}: RTN perplexity equals single-device", close(q_sharded, q_single, args.rtol),
              f"{q_sharded:.6f} vs {q_single:.6f} (fp {p_single:.6f})")  # fmt: skip
        # 4. GPTQ: calibration activations follow the layers over the GPUs
        tokens = single.tokenizer(text, return_tensors="pt").input_ids[0]
        calib = calibration_ids(tokens, None, 8, args.seqlen, 0)
        for m in (single.model, model):
            quantize_model(m, "int", 4, 64, method="gptq", calibration=calib, progress=False)
        g_single, g_sharded = ppl(single.model), ppl(model)
        check(f"{tag}: GPTQ perplexity equals single-device",
              close(g_sharded, g_single, args.gptq_rtol), f"{g_sharded:.6f} vs {g_single:.6f}")  # fmt: skip
        # 5. restore
        restore_model(model)
        state = model.state_dict()
        bad = [k for k, v in state.items() if not torch.equal(v.cpu(), pristine[k])]
        moved = [n for n, p in model.named_parameters() if p.device != devices[n]]
        check(f"{tag}: restore is bit-identical", not bad, str(bad[:3]))
        check(f"{tag}: restored weights on their own GPUs", not moved, str(moved[:3]))
        r_sharded = ppl(model)
        check(f"{tag}: perplexity after restore equals the unquantized one",
              r_sharded == p_sharded, f"{r_sharded:.6f} vs {p_sharded:.6f}")  # fmt: skip
        single = sharded = model = None  # free this model's GPU memory before the next
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"{failures} failure(s)")
    return failures


if __name__ == "__main__":
    sys.exit(main())
