"""GPTQ speed, side by side in one run: kbit's implementation vs the plain algorithm, and a
whole model's GPTQ vs one perplexity evaluation of it.

    python benchmarks/gptq_bench.py                 # 1024x4096 and 4096x1024, int4 B=128
    python benchmarks/gptq_bench.py --full-reference  # run the plain algorithm on every column
    python benchmarks/gptq_bench.py --threads 1     # on a shared, loaded machine (see below)

Per layer: ``gptq_quantize_weight`` (float32, Cholesky factor, lazy batches of 128 columns)
against the paper's algorithm written plainly (float32, one column at a time, H^-1 updated
by the OBS elimination formula, as in tests/test_gptq.py but in float32). The plain
algorithm costs O(in^2) memory traffic per column, so for in > 2048 it is timed on its first
``--ref-cols`` columns and extrapolated linearly (marked ``~``; an over-estimate, since its
weight update shrinks as columns are done: 1024x4096 at 1 thread measured 97 s in full vs
167 s extrapolated).

Model: the largest zoo model found under $KBIT_ZOO_DIR or ~/.cache/kbit/zoo (its
kbit_eval/heldout.txt is the evaluation text and the calibration source), else a random
4-layer GPT-NeoX evaluated on random token windows. Hessians come from 128 calibration
windows of the model's context (at most 2048 tokens), GPTQ's default.

Threads: the column loop is thousands of small (one column) ops; when other processes load
the cores, torch's intra-op thread pool waits on descheduled workers and each small op can
take milliseconds instead of microseconds (measured 20x slower at load 5 on 2 cores). Time
with ``--threads 1`` there, and say which was used (the first line prints it).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from harness.quantize.gptq import calibration_ids, gptq_quantize_model, gptq_quantize_weight


def random_hessian(n_in: int, n_tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, n_in, generator=gen)
    x = x + 0.5 * x.roll(1, dims=1)  # neighbouring features correlated
    return 2 / n_tokens * x.T @ x


def plain_gptq(w: torch.Tensor, h: torch.Tensor, block: int, max_cols: int | None = None):
    """The paper's loop, int4 absmax groups, no lazy batches; stops after ``max_cols``."""
    from harness.dtypes import codebook
    from harness.kernels.torch_ops import thresholds

    w = w.clone()
    h = h + 0.01 * torch.diag(h).mean() * torch.eye(h.shape[0])
    hinv = torch.linalg.inv(h)
    code = codebook("int", 4)
    thr = thresholds(code)[:-1]
    q = torch.zeros_like(w)
    scale = torch.ones(w.shape[0])
    for j in range(w.shape[1] if max_cols is None else max_cols):
        if j % block == 0:
            scale = w[:, j : j + block].abs().amax(dim=1).half().float()
        y = (w[:, j] / scale).clamp(-1, 1)
        q[:, j] = code[torch.searchsorted(thr, y)] * scale
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, j + 1 :] -= err.unsqueeze(1) * hinv[j, j + 1 :].unsqueeze(0)
        hinv.addr_(hinv[:, j].clone(), hinv[j, :].clone(), alpha=-1 / float(hinv[j, j]))
    return q


def bench_layer(out_f: int, in_f: int, ref_cols: int, full: bool) -> None:
    w = torch.randn(out_f, in_f) * 0.02
    h = random_hessian(in_f)
    start = time.perf_counter()
    gptq_quantize_weight(w, h, dtype="int", bits=4, block_size=128)
    kbit_s = time.perf_counter() - start
    cols = None if full or in_f <= 2048 else ref_cols
    start = time.perf_counter()
    plain_gptq(w, h, 128, cols)
    ref_s = (time.perf_counter() - start) * (1 if cols is None else in_f / cols)
    mark = " " if cols is None else "~"
    print(
        f"{out_f:>5} x {in_f:<5}  kbit {kbit_s:8.2f} s   plain {mark}{ref_s:8.2f} s   "
        f"plain / kbit {mark}{ref_s / kbit_s:6.1f}x"
    )


def find_zoo_model() -> Path | None:
    """The largest built zoo model (by weight file size), or None."""
    roots = [os.environ.get("KBIT_ZOO_DIR"), str(Path.home() / ".cache" / "kbit" / "zoo")]
    found = [
        p.parent
        for root in roots
        if root and Path(root).is_dir()
        for p in Path(root).glob("*/*/model.safetensors")
        if (p.parent / "kbit_eval" / "heldout.txt").is_file()
    ]
    return max(found, key=lambda d: (d / "model.safetensors").stat().st_size, default=None)


def bench_model(n_samples: int) -> None:
    from harness.models.loading import quantizable_modules

    folder = find_zoo_model()
    if folder is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from harness.evaluate.perplexity import default_seqlen, perplexity

        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        text = (folder / "kbit_eval" / "heldout.txt").read_text(encoding="utf-8")
        seqlen = default_seqlen(model)
        calib = calibration_ids(tok, text, n_samples, seqlen, seed=0)
        name = str(folder)

        def evaluate() -> None:
            perplexity(model, tok, text)
    else:
        import transformers as tf

        from harness.evaluate.perplexity import window_nll_sums

        cfg = tf.GPTNeoXConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=1024, max_position_embeddings=512,
                               vocab_size=4096)  # fmt: skip
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg).eval()
        seqlen = 512
        calib = torch.randint(0, 4096, (n_samples, seqlen))
        eval_ids = torch.randint(0, 4096, (40, seqlen))
        name = "random GPT-NeoX 4x256 (no zoo model found)"

        def evaluate() -> None:
            with torch.no_grad():
                for row in eval_ids:
                    window_nll_sums(model, row.unsqueeze(0))

    start = time.perf_counter()
    evaluate()
    eval_s = time.perf_counter() - start
    start = time.perf_counter()
    gptq_quantize_model(
        model, quantizable_modules(model), calib, dtype="int", bits=4, block_size=64
    )
    gptq_s = time.perf_counter() - start
    print(f"model {name}: {n_samples} x {seqlen} calibration tokens")
    print(f"  GPTQ (int4, B=64) {gptq_s:8.2f} s   one perplexity evaluation {eval_s:8.2f} s   "
          f"GPTQ / eval {gptq_s / eval_s:6.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-reference", action="store_true")
    parser.add_argument("--ref-cols", type=int, default=256)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for out_f, in_f in ((1024, 4096), (4096, 1024)):
        bench_layer(out_f, in_f, args.ref_cols, args.full_reference)
    if not args.no_model:
        bench_model(args.samples)


if __name__ == "__main__":
    main()
