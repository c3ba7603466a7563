"""Evaluation overhead of kbit, measured side by side in one run on a locally built model.

Prints three ratios (targets in brackets):

1. perplexity tokens/s through ``harness.evaluate.perplexity`` vs a bare batched forward loop
   over the same windows: (a) logits only, no loss (the floor: nothing computes a perplexity
   faster), and (b) the loop of the Hugging Face perplexity guide, ``model(batch,
   labels=batch).loss``, which computes the same loss inside forward               [>= 0.9x]
2. zero-shot wall time of ``kbit-run`` vs the ``lm_eval`` command line, same saved model,
   same tasks, same limit and batch size (both as fresh processes)                [<= 1.05x]
3. per-cell overhead: (wall - forward) / wall of an in-process cell on a cached model, as a
   sweep runs it after its first cells (quantize + perplexity + zero-shot)        [<= 10%]

    python benchmarks/eval_bench.py            # a random GPT-2-small-shaped GPT-NeoX (~8 min)
    python benchmarks/eval_bench.py --hidden 256 --layers 4 --limit 40 --max-tokens 8192 \
        --repeats 2                               # a tiny model (~6 min), see below
    python benchmarks/eval_bench.py --model /path/to/model --limit 200

The default shape is GPT-2 small's (hidden 768, 12 layers, 50k vocabulary), the scale of the
smallest OPT and GPT-2 models the paper quantizes. The overhead share depends on the model: lm-eval's own
per-request work (a log-softmax over the whole vocabulary at every position, request
building, tokenization) costs the same per example whatever the model's depth, so on a tiny
model it is a large share of the cell (about a quarter at hidden 256, 4 layers).

Needs KBIT_DATA_ROOT (shared/data layout) for WikiText-2 and the local task files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BIN = Path(sys.executable).parent


def build_model(folder: Path, data_root: Path, hidden: int, layers: int) -> Path:
    """A random-weight GPT-NeoX with the Pythia tokenizer (from the data root) saved to folder."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(data_root / "tokenizers" / "gpt-neox-20b.json"),
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
    )  # fmt: skip
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                        max_position_embeddings=2048, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_perplexity(model_dir: Path, data_root: Path, args) -> dict[str, float]:
    from harness.evaluate import load_text, perplexity_details, token_ids
    from harness.evaluate.perplexity import windows
    from harness.models.loading import load_model

    loaded = load_model(str(model_dir), device=args.device)
    text = load_text("wikitext2", data_root=data_root)
    wins = windows(token_ids(loaded.tokenizer, text), args.seqlen, args.max_tokens)
    n_tokens = wins.numel()

    def bare() -> None:
        with torch.no_grad():
            for start in range(0, wins.shape[0], args.batch_size):
                batch = wins[start : start + args.batch_size].to(loaded.device)
                _ = loaded.model(batch, use_cache=False).logits
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()

    def bare_loss() -> None:
        total = 0.0
        with torch.no_grad():
            for start in range(0, wins.shape[0], args.batch_size):
                batch = wins[start : start + args.batch_size].to(loaded.device)
                total += float(loaded.model(batch, labels=batch, use_cache=False).loss)

    def kbit() -> None:
        perplexity_details(loaded.model, loaded.tokenizer, text, args.seqlen, args.max_tokens,
                           args.batch_size, progress=False)  # fmt: skip

    bare(), bare_loss(), kbit()  # warm up (allocator, token cache)
    times = {"kbit": [], "bare": [], "bare_loss": []}
    for _ in range(max(3, args.repeats)):  # interleaved, best of each
        for name, fn in (("kbit", kbit), ("bare", bare), ("bare_loss", bare_loss)):
            times[name].append(best_of(1, fn))
    return {name: n_tokens / min(ts) for name, ts in times.items()}


def bench_zeroshot(model_dir: Path, data_root: Path, work: Path, args) -> tuple[float, float]:
    env = {**os.environ, "KBIT_DATA_ROOT": str(data_root), "KBIT_CACHE_DIR": str(work / "cache")}
    tasks = args.tasks.split(",")
    include = work / "tasks"
    subprocess.run([sys.executable, "-m", "harness.evaluate", "--data-root", str(data_root),
                    "--out", str(include), "--tasks", args.tasks], check=True, env=env)  # fmt: skip
    kbit_cmd = [str(BIN / "kbit-run"), f"model={model_dir}", "bits=16", "eval=paper",
                "eval.perplexity=[]", f"eval.tasks=[{args.tasks}]", f"eval.mean_of=[{args.tasks}]",
                f"eval.limit={args.limit}", f"eval.batch_size={args.batch_size}",
                "eval.bootstrap_iters=100000",  # lm_eval CLI's default: the same work
                f"device={args.device}", f"results_dir={work / 'zs'}"]  # fmt: skip
    cli_cmd = [str(BIN / "lm_eval"), "--model", "hf", "--model_args",
               f"pretrained={model_dir},dtype=float32", "--tasks", ",".join(tasks),
               "--include_path", str(include), "--limit", str(args.limit),
               "--batch_size", str(args.batch_size), "--device", args.device,
               "--output_path", str(work / "cli")]  # fmt: skip
    run = lambda cmd: subprocess.run(cmd, check=True, env=env, capture_output=True)  # noqa: E731
    run(cli_cmd)  # warm the datasets cache for both
    t_kbit, t_cli = [], []
    for i in range(args.repeats):
        for cmd, acc in ((kbit_cmd, t_kbit), (cli_cmd, t_cli)):
            cmd = [*cmd[:-1], cmd[-1] + str(i)]  # a fresh results folder: nothing skipped
            start = time.perf_counter()
            run(cmd)
            acc.append(time.perf_counter() - start)
    return min(t_kbit), min(t_cli)


def bench_cell(model_dir: Path, data_root: Path, work: Path, args) -> dict:
    """In-process cells on one cached model, as a sweep runs them; the last one is timed.

    The 16-bit and int4 cells before it warm up what a sweep pays once per process (the
    compiled quantization kernels, the lm-eval task objects), so the timed float4 cell shows
    the steady-state cost of a cell.
    """
    from hydra import compose, initialize_config_dir

    from harness.config.schema import register_schema
    from harness.records import read_store
    from harness.run.execute import ModelCache, run_and_record

    register_schema()
    conf = Path(__file__).resolve().parents[1] / "conf"
    overrides = [f"model={model_dir}", "eval=paper", f"eval.tasks=[{args.tasks}]",
                 f"eval.mean_of=[{args.tasks}]", f"eval.limit={args.limit}",
                 f"eval.batch_size={args.batch_size}", f"eval.perplexity.0.seqlen={args.seqlen}",
                 f"eval.perplexity.0.max_tokens={args.max_tokens}", f"device={args.device}",
                 f"results_dir={work / 'cells'}", "sweep=bench"]  # fmt: skip
    cache = ModelCache()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for extra in (["bits=16"], ["bits=4", "dtype=int"], ["bits=4", "dtype=float"]):
            cfg = compose("config", overrides=[*overrides, *extra, "block_size=64"])
            status = run_and_record(cfg, cache)
            assert status == "ok", status
    rows = read_store(work / "cells", "bench").to_pylist()
    return next(r for r in rows if r["dtype"] == "float")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="saved model folder; default: build one")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", default="piqa,winogrande,hellaswag,lambada_openai")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    data_root = Path(
        os.environ.get("KBIT_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    if not (data_root / "eval").is_dir():
        sys.exit(f"KBIT_DATA_ROOT={data_root} has no eval/ folder; set it to the shared data")
    os.environ["KBIT_DATA_ROOT"] = str(data_root)
    work = Path(tempfile.mkdtemp(prefix="kbit_eval_bench_"))
    os.environ["KBIT_CACHE_DIR"] = str(work / "cache")
    model_dir = (
        Path(args.model)
        if args.model
        else build_model(work / "model", data_root, args.hidden, args.layers)
    )

    tps = bench_perplexity(model_dir, data_root, args)
    cell = bench_cell(model_dir, data_root, work, args)
    t_kbit, t_cli = bench_zeroshot(model_dir, data_root, work, args)
    print(f"model: {model_dir}  device: {args.device}  torch threads: {torch.get_num_threads()}")
    print(f"{'measurement':<44}{'kbit':>12}{'reference':>12}{'ratio':>9}  target")
    for ref, label in (("bare", "logits-only loop"), ("bare_loss", "loop with HF loss")):
        print(f"{'perplexity tokens/s (vs ' + label + ')':<44}{tps['kbit']:>12.0f}"
              f"{tps[ref]:>12.0f}{tps['kbit'] / tps[ref]:>8.3f}x  >= 0.9x")  # fmt: skip
    print(f"{'zero-shot wall s (vs lm_eval CLI)':<44}{t_kbit:>12.2f}{t_cli:>12.2f}"
          f"{t_kbit / t_cli:>8.3f}x  <= 1.05x")  # fmt: skip
    share = (cell["wall_s"] - cell["forward_s"]) / cell["wall_s"]
    print(f"{'per-cell overhead (wall - forward) / wall':<44}{cell['wall_s']:>11.2f}s"
          f"{cell['forward_s']:>11.2f}s{share:>8.1%}   <= 10%")  # fmt: skip
    print(f"  cell breakdown: quantize {cell['quantize_s']:.2f}s, eval {cell['eval_s']:.2f}s")


if __name__ == "__main__":
    main()
