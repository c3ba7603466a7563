"""Helpers for zoo tests: build the nano family once per session, and a reference scorer.

Other test modules can use the built family with ``from zoo_fixtures import nano_zoo``.
The scorer re-implements lm-eval's multiple-choice rule independently of harness/evaluate:
sum of log p(" " + choice | query) per choice, argmax = the prediction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

NANO_SIZES = ["l1d32", "l2d48", "l2d64"]


def corpus_for_tests() -> str | None:
    """The shared Gutenberg corpus when present (as in CI), else the packaged one (None)."""
    root = os.environ.get("KBIT_DATA_ROOT")
    folder = Path(root) / "corpus" / "gutenberg" if root else None
    return str(folder) if folder is not None and folder.is_dir() else None


def zoo_threads() -> int | None:
    """Torch threads for test builds: $KBIT_ZOO_THREADS (1 helps on a busy machine) or default.

    Bit-identity holds for equal thread counts, so every test build uses this one value.
    """
    return int(os.environ.get("KBIT_ZOO_THREADS") or 0) or None


@pytest.fixture(scope="session")
def nano_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{size: folder} of the nano family, built once (KBIT_ZOO_DIR caches it across runs)."""
    from harness.zoo import build_family

    zoo_dir = os.environ.get("KBIT_ZOO_DIR") or tmp_path_factory.mktemp("zoo")
    threads = int(os.environ.get("KBIT_ZOO_THREADS") or 0) or None  # 1 helps on a busy machine
    paths = build_family(
        "nano", zoo_dir=zoo_dir, corpus=corpus_for_tests(), device="cpu", threads=threads
    )
    return {p.name: p for p in paths}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


@torch.no_grad()
def continuation_logprob(model, tok, context: str, continuation: str, max_len: int) -> float:
    """log p(continuation | context), context and continuation tokenized apart (lm-eval's rule)."""
    ctx = tok(context, add_special_tokens=False).input_ids
    cont = tok(continuation, add_special_tokens=False).input_ids
    ids = (ctx + cont)[-(max_len + 1) :]
    x = torch.tensor([ids[:-1]])
    logp = torch.log_softmax(model(input_ids=x).logits[0].float(), dim=-1)
    targets = torch.tensor(ids[1:])
    per_token = logp[torch.arange(len(targets)), targets]
    return per_token[-len(cont) :].sum().item()


def mc_accuracy(folder: Path, limit: int | None = None) -> tuple[float, int]:
    """(accuracy, n) of a zoo model on its own kbit_eval/mc.jsonl."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    items = read_jsonl(folder / "kbit_eval" / "mc.jsonl")[:limit]
    max_len = model.config.max_position_embeddings
    correct = 0
    for it in items:
        scores = [
            continuation_logprob(model, tok, it["query"], " " + c, max_len) for c in it["choices"]
        ]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == it["gold"])
    return correct / len(items), len(items)


def point_env_at_zoo(monkeypatch: pytest.MonkeyPatch, zoo_dir: Path) -> None:
    """Make ``zoo:nano/<size>`` (in this process and in the subprocesses it starts) resolve
    to the ``nano_zoo`` fixture's build: its zoo folder, and the corpus it was built from
    (the corpus is part of the family's fingerprint, so a different one is another build)."""
    monkeypatch.setenv("KBIT_ZOO_DIR", str(zoo_dir))
    corpus = corpus_for_tests()
    if corpus is None:
        monkeypatch.delenv("KBIT_CORPUS_DIR", raising=False)
    else:
        monkeypatch.setenv("KBIT_CORPUS_DIR", corpus)
