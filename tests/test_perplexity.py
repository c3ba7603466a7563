"""Perplexity (GPTQ protocol) against an independent per-window loop written here."""

from __future__ import annotations

import math

import pytest
import torch
from test_models_tiny import tiny_model

from harness.evaluate import load_text, perplexity, perplexity_details, token_ids


def reference_ppl(model, ids: torch.Tensor, seqlen: int) -> float:
    """One window at a time, log-softmax by hand, tail dropped, mean over predicted tokens."""
    nll, count = 0.0, 0
    for w in range(ids.numel() // seqlen):
        window = ids[w * seqlen : (w + 1) * seqlen]
        with torch.no_grad():
            logits = model(window[None]).logits[0].double()
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        picked = logp[torch.arange(seqlen - 1), window[1:]]  # log p(token t+1 | <= t)
        nll -= float(picked.sum())
        count += seqlen - 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def opt():
    return tiny_model("opt")


@pytest.fixture(scope="module")
def text(data_root):
    return load_text("wikitext2", data_root=data_root)[:3000]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_independent_per_window_loop(opt, text, batch_size, monkeypatch, tmp_path):
    monkeypatch.setenv("KBIT_CACHE_DIR", str(tmp_path))
    model, tok = opt
    ids = tok(text, return_tensors="pt").input_ids[0]
    seqlen = 64
    assert ids.numel() % seqlen != 0  # the tail is really dropped
    res = perplexity_details(model, tok, text, seqlen, batch_size=batch_size, progress=False)
    assert res.n_windows == ids.numel() // seqlen
    assert res.n_tokens == res.n_windows * (seqlen - 1)
    assert res.ppl == pytest.approx(reference_ppl(model, ids, seqlen), rel=1e-5)
    assert res.forward_s > 0


def test_max_tokens_limits_the_windows(opt, text):
    model, tok = opt
    ids = tok(text, return_tensors="pt").input_ids[0]
    got = perplexity(model, tok, text, seqlen=32, max_tokens=200)
    assert got == pytest.approx(reference_ppl(model, ids[:200], 32), rel=1e-5)


def test_default_seqlen_is_capped_by_model_positions(opt, text):
    model, tok = opt  # max_position_embeddings = 256
    res = perplexity_details(model, tok, text * 2, progress=False)
    assert res.seqlen == 256


def test_too_short_text_fails_clearly(opt):
    model, tok = opt
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tok, "short text", seqlen=64)


def test_tokenization_is_cached_in_memory_and_on_disk(opt, monkeypatch, tmp_path):
    monkeypatch.setenv("KBIT_CACHE_DIR", str(tmp_path))
    _, tok = opt
    text = "a fresh text for the cache test " * 10
    first = token_ids(tok, text)
    assert torch.equal(first, tok(text, return_tensors="pt").input_ids[0])
    files = list((tmp_path / "tokens").glob("*.npy"))
    assert len(files) == 1
    from harness.evaluate import datasets

    datasets._MEMORY.clear()
    calls = []
    monkeypatch.setattr(type(tok), "__call__", lambda *a, **k: calls.append(1))
    assert torch.equal(token_ids(tok, text), first)  # from disk, tokenizer not called
    assert not calls


def test_dataset_resolution(data_root, tmp_path):
    assert load_text("wikitext2", data_root=data_root) == (
        data_root / "eval/wikitext2/test.txt"
    ).read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="did you mean 'wikitext2'"):
        load_text("wikitxt2", data_root=data_root)
    with pytest.raises(ValueError, match="does not exist"):
        load_text("wikitext2", data_root=tmp_path)
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    assert load_text(str(tmp_path)) == "one\n\ntwo"
    (tmp_path / "kbit_eval").mkdir()
    (tmp_path / "kbit_eval" / "heldout.txt").write_text("held out")
    assert load_text("heldout", "model:kbit_eval/heldout.txt", model_dir=tmp_path) == "held out"


def test_nan_windows_are_counted_not_raised(text, monkeypatch, tmp_path):
    """A NaN in the final LayerNorm makes every window's NLL NaN: counted, ppl NaN, no raise."""
    monkeypatch.setenv("KBIT_CACHE_DIR", str(tmp_path))
    model, tok = tiny_model("gpt_neox")
    normal = perplexity_details(model, tok, text, 64, batch_size=2, progress=False)
    assert normal.nonfinite == 0 and math.isfinite(normal.ppl)
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight[0] = float("nan")
    broken = perplexity_details(model, tok, text, 64, batch_size=2, progress=False)
    assert broken.nonfinite == broken.n_windows > 1
    assert math.isnan(broken.ppl)


def test_text_files_are_checked_and_sourced(data_root, tmp_path):
    from harness.evaluate import check_text_file, text_source
    from harness.evaluate.datasets import resolve_text_path

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        resolve_text_path("mine", str(empty))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ok \xff\xfe not utf-8")
    with pytest.raises(ValueError, match=r"binary\.txt is not UTF-8 text") as err:
        check_text_file("mine", binary)
    assert "\n" not in str(err.value)
    src = text_source("wikitext2", data_root=data_root)
    wiki = (data_root / "eval/wikitext2/test.txt").resolve()
    import hashlib

    want = hashlib.sha256(wiki.read_bytes()).hexdigest()
    assert src.source == f"local:{wiki};sha256={want}" and src.version == "gptq-1"
    assert text_source("wikitext2").source == "hub:wikitext/wikitext-2-raw-v1@unpinned"
    (tmp_path / "dir").mkdir()
    for name in ("a", "b"):
        (tmp_path / "dir" / f"{name}.txt").write_text(name)
    assert text_source("d", str(tmp_path / "dir")).source.count("+local:") == 1
