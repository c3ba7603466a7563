# ruff: noqa: F811  (the session fixture nano_zoo is imported, then requested by name)
"""Slow zoo tests on a real built family: loading, model cards, caching, resume, determinism."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from zoo_fixtures import (  # noqa: F401
    NANO_SIZES,
    corpus_for_tests,
    nano_zoo,
    read_jsonl,
    zoo_threads,
)

from harness.zoo import build_family, load_family_config, resolve_model

pytestmark = pytest.mark.slow


def test_nano_builds_every_size(nano_zoo: dict[str, Path]) -> None:
    assert list(nano_zoo) == NANO_SIZES


@pytest.mark.parametrize("size", NANO_SIZES)
def test_model_loads_offline_and_card_is_consistent(nano_zoo: dict[str, Path], size: str) -> None:
    folder = nano_zoo[size]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    meta = json.loads((folder / "kbit_zoo.json").read_text())
    # independent parameter count from the loaded model
    assert meta["n_params"] == sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    assert meta["n_nonembedding_params"] == meta["n_params"] - emb
    s = meta["summary"]
    assert s["tokens_seen"] == s["steps"] * meta["batch_size"] * meta["context"]
    card = (folder / "README.md").read_text()
    for needle in (meta["corpus"]["hash"], f"{s['tokens_seen']:,}", f"{s['final_val_loss']:.4f}",
                   f"{meta['n_nonembedding_params']:,} non-embedding"):  # fmt: skip
        assert needle in card
    log = read_jsonl(folder / "train_log.jsonl")
    assert log[-1]["val_loss"] == s["final_val_loss"] and log[-1]["step"] == s["steps"]
    # the card's validation loss agrees with HF's own loss on held-out text
    ids = tok(
        (folder / "kbit_eval" / "heldout.txt").read_text()[:20000], return_tensors="pt"
    ).input_ids
    n = ids.shape[1] // meta["context"]
    windows = ids[0, : n * meta["context"]].view(n, meta["context"])
    with torch.no_grad():
        hf_loss = model(input_ids=windows, labels=windows).loss.item()
    assert abs(hf_loss - s["final_val_loss"]) < 0.25
    assert hf_loss < 0.8 * torch.log(torch.tensor(float(len(tok)))).item()  # far below uniform


def test_eval_files_have_the_documented_format(nano_zoo: dict[str, Path]) -> None:
    cfg = load_family_config("nano").eval_sets
    kbit_eval = nano_zoo["l1d32"] / "kbit_eval"
    mc = read_jsonl(kbit_eval / "mc.jsonl")
    assert len(mc) == cfg.mc_items
    assert all(
        len(it["choices"]) == cfg.mc_choices and 0 <= it["gold"] < cfg.mc_choices for it in mc
    )
    lastword = read_jsonl(kbit_eval / "lastword.jsonl")
    assert len(lastword) == cfg.lastword_items and all(" " in it["text"] for it in lastword)
    assert len((kbit_eval / "heldout.txt").read_text()) > 0.9 * cfg.heldout_chars
    # every size of the family is evaluated on the very same files
    for folder in nano_zoo.values():
        assert (folder / "kbit_eval" / "mc.jsonl").read_bytes() == (
            kbit_eval / "mc.jsonl"
        ).read_bytes()


def test_largest_nano_beats_smallest_on_validation_loss(nano_zoo: dict[str, Path]) -> None:
    losses = [json.loads((nano_zoo[s] / "kbit_zoo.json").read_text())["summary"]["final_val_loss"]
              for s in NANO_SIZES]  # fmt: skip
    assert losses[-1] < losses[0]


def test_second_build_is_cached(
    nano_zoo: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    zoo_dir = nano_zoo["l1d32"].parents[1]
    before = {s: (p / "model.safetensors").stat().st_mtime_ns for s, p in nano_zoo.items()}
    with caplog.at_level(logging.INFO, logger="harness.zoo"):
        paths = build_family("nano", zoo_dir=zoo_dir, corpus=corpus_for_tests())
    assert paths == list(nano_zoo.values())
    assert caplog.text.count("cached") == len(NANO_SIZES)
    assert before == {s: (p / "model.safetensors").stat().st_mtime_ns for s, p in nano_zoo.items()}


def test_resolve_model_finds_the_build(
    nano_zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = corpus_for_tests()
    if corpus:
        monkeypatch.setenv("KBIT_CORPUS_DIR", corpus)
    else:
        monkeypatch.delenv("KBIT_CORPUS_DIR", raising=False)
    assert resolve_model("zoo:nano/l2d64", nano_zoo["l1d32"].parents[1]) == nano_zoo["l2d64"]


def test_resume_rebuilds_only_the_missing_size_bit_identically(
    nano_zoo: dict[str, Path], tmp_path: Path
) -> None:
    zoo_dir = tmp_path / "zoo"
    shutil.copytree(nano_zoo["l1d32"].parents[1], zoo_dir, ignore=shutil.ignore_patterns("logs"))
    family = zoo_dir / nano_zoo["l1d32"].parent.name
    shutil.rmtree(family / "l1d32")  # as if the build had died before finishing this size
    kept = (family / "l2d64" / "model.safetensors").stat().st_mtime_ns
    build_family(
        "nano", zoo_dir=zoo_dir, corpus=corpus_for_tests(), device="cpu", threads=zoo_threads()
    )
    assert (family / "l2d64" / "model.safetensors").stat().st_mtime_ns == kept
    original = (nano_zoo["l1d32"] / "model.safetensors").read_bytes()
    assert (family / "l1d32" / "model.safetensors").read_bytes() == original


def _one_size(seed: int) -> dict:
    """The smallest nano size with a short budget: what the determinism test builds twice."""
    cfg = load_family_config("nano")
    cfg.sizes, cfg.seed, cfg.budget.tokens, cfg.name = cfg.sizes[:1], seed, 20_000, "nano1"
    return cfg


def test_same_config_and_seed_give_bit_identical_weights(tmp_path: Path) -> None:
    corpus = corpus_for_tests()
    a = build_family(
        _one_size(0), zoo_dir=tmp_path / "a", corpus=corpus, device="cpu", threads=zoo_threads()
    )[0]
    b = build_family(
        _one_size(0), zoo_dir=tmp_path / "b", corpus=corpus, device="cpu", threads=zoo_threads()
    )[0]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    c = build_family(
        _one_size(1), zoo_dir=tmp_path / "c", corpus=corpus, device="cpu", threads=zoo_threads()
    )[0]
    wa, wc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)  # the seed matters


def test_cli_reports_cached(nano_zoo: dict[str, Path]) -> None:
    zoo_dir = nano_zoo["l1d32"].parents[1]
    env = {**os.environ, "KBIT_ZOO_DIR": str(zoo_dir)}
    env.pop("KBIT_CORPUS_DIR", None)
    corpus = corpus_for_tests()
    args = ["zoo=nano", *([f"zoo.corpus={corpus}"] if corpus else [])]
    code = "from harness.zoo.cli import main; main()"
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert (out.stdout + out.stderr).count("cached") == len(NANO_SIZES)
