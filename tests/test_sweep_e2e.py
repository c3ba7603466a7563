"""Sweeps end to end through ``kbit-run --multirun`` on tiny random-weight models.

- Kill test: SIGKILL the sweep at random points three times, re-launching each time; the final
  store must equal an uninterrupted run: cells x metrics rows, no duplicates, same values.
- Bad input stops before anything is queued, with one clear message, and writes nothing.

The helpers here (tiny models, the grid) are shared with tests/test_slurm.py.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.records import cell_files, read_store

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "old",
    "dogs",
    "ran",
    "to",
    "the",
    "red",
    "barn",
    "and",
    "small",
    "birds",
    "sang",
    "over",
    "green",
    "hills",
    "near",
    "quiet",
    "rivers",
    "where",
    "people",
    "walked",
    "slowly",
    "every",
    "morning",
]


def make_tiny_models(root: Path, n: int = 2) -> list[Path]:
    """``n`` GPT-2 models (2 layers, width 32, different seeds) with a small trained BPE."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=160, special_tokens=["<|endoftext|>", "<unk>"])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>"
    )
    eos = fast.convert_tokens_to_ids("<|endoftext|>")
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        cfg = GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                         bos_token_id=eos, eos_token_id=eos)  # fmt: skip
        path = root / f"tiny{i}"
        GPT2LMHeadModel(cfg).save_pretrained(path)
        fast.save_pretrained(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> list[Path]:
    return make_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory) -> Path:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("eval") / "text.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(400)))
    return path


def grid_args(models: list[Path], text: Path, results: Path, sweep: str = "e2e") -> list[str]:
    """A 2-model grid: {int, float} x bits {3, 4} + the 16-bit baseline = 5 cells per model."""
    return [
        "hydra/sweeper=kbit",
        f"model={','.join(str(m) for m in models)}",
        "dtype=int,float",
        "bits=3,4,16",
        "block_size=16",
        f"sweep={sweep}",
        f"results_dir={results}",
        "eval=ppl",
        f"eval.perplexity=[{{name:tiny,path:'{text}',seqlen:32,max_tokens:256}}]",
        "device=cpu",
    ]


def kbit_run(args: list[str], **kw) -> subprocess.Popen:
    """``kbit-run --multirun ARGS`` in its own process group (so a test can kill all of it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    exe = shutil.which("kbit-run") or str(Path(sys.executable).parent / "kbit-run")
    cmd = [exe, "--multirun", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)  # fmt: skip


def run_to_end(args: list[str], timeout: float = 300) -> tuple[int, str]:
    proc = kbit_run(args)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _rows(results: Path, sweep: str) -> dict[tuple[str, str, str], float]:
    table = read_store(results, sweep).to_pylist()
    keys = [(r["cell_id"], r["task"], r["metric"]) for r in table]
    assert len(keys) == len(set(keys)), "duplicate rows in the store"
    assert all(r["status"] == "ok" for r in table)
    return {(r["cell_id"], r["task"], r["metric"]): r["value"] for r in table}


@pytest.mark.slow
def test_sigkill_three_times_then_resume_equals_uninterrupted(tiny_models, eval_text, tmp_path):
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    tic = time.monotonic()
    rc, out = run_to_end(grid_args(tiny_models, eval_text, ref_dir))
    full_s = time.monotonic() - tic
    assert rc == 0, out[-3000:]
    assert "10 cells in total (2 duplicate cells merged): 0 done, 0 failed, 10 to run" in out
    reference = _rows(ref_dir, "e2e")
    per_cell = {cid for cid, _, _ in reference}
    assert len(per_cell) == 10 and len(reference) == 10 * 2  # cells x metrics (ppl, nll)

    rng = random.Random(int(os.environ.get("KBIT_KILL_SEED", "0")))
    for _ in range(3):
        proc = kbit_run(grid_args(tiny_models, eval_text, kill_dir))
        time.sleep(rng.uniform(0.2, 1.0) * full_s)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = len(cell_files(kill_dir, "e2e"))
    rc, out = run_to_end(grid_args(tiny_models, eval_text, kill_dir))
    assert rc == 0, out[-3000:]
    assert f"{done_before} done, 0 failed, {10 - done_before} to run" in out
    assert _rows(kill_dir, "e2e") == reference  # same keys, identical values


def _assert_nothing_written(results: Path) -> None:
    assert not results.exists() or not any(results.rglob("*")), sorted(results.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, expected",
    [
        ({"dtype=int,float": "dtype=int,nf4"}, "bits=3"),  # nf4 is 4-bit only
        ({"bits=3,4,16": "bits=3,4,42"}, "bits=42"),
        ("missing-model", "does-not-exist"),
        ("unwritable", "is not a folder"),
        ("hydra.sweeper.jobs.cells_per_job=0", "cells_per_job=0"),
        ("hydra.sweeper.resources={gpu_memory_gbb:80}", "did you mean 'gpu_memory_gb'"),
        ("hydra.launcher.poll_s=-1", "hydra.launcher.poll_s=-1.0: allowed"),
        ("hydra.sweeper.dry_run=maybe", "hydra.sweeper.dry_run='maybe': allowed: true or false"),
    ],
    ids=["illegal-dtype-bits", "illegal-bits", "unreachable-model", "unwritable-results",
         "bad-cells-per-job", "unknown-resource-setting", "bad-poll", "bad-dry-run"],
)  # fmt: skip
def test_bad_input_stops_before_launch(tiny_models, eval_text, tmp_path, change, expected):
    results = tmp_path / "results"
    args = grid_args(tiny_models, eval_text, results)
    if change == "missing-model":
        args[1] = f"model={tiny_models[0]},{tmp_path / 'does-not-exist'}"
    elif change == "unwritable":
        (tmp_path / "file").write_text("x")
        results = tmp_path / "file" / "results"
        args = grid_args(tiny_models, eval_text, results)
    elif isinstance(change, str):  # a packing setting, on the packing launcher
        args = [*args, "hydra/launcher=local", change]
    else:
        args = [change.get(a, a) for a in args]
    rc, out = run_to_end(args)
    assert rc == 2, out[-3000:]
    assert "Sweep not launched" in out and expected in out, out[-3000:]
    assert "Launching" not in out  # nothing queued
    _assert_nothing_written(results)


@pytest.mark.slow
def test_unknown_sweep_names_the_options(tmp_path):
    rc, out = run_to_end(["+sweeps@_global_=dmeo", f"results_dir={tmp_path / 'r'}"])
    assert rc == 2
    assert "sweeps='dmeo' is unknown" in out and "did you mean 'demo'" in out
    _assert_nothing_written(tmp_path / "r")
