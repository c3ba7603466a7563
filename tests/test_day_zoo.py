"""The zoo's tasks fit each zoo model's context; an over-long local task is never scored.

Issue 22: every nano cell scored ``zoo_lastword`` 0.0 and printed ~200 lm-eval "exceeds
model's maximum length" warnings: the passages (40 words, ~80 tokens) and mc queries (up to
~180 tokens) were longer than nano's 64-token context, and lm-eval cut them from the left.
The references here are computed with the model's own tokenizer and weights, independently
of harness/evaluate.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from zoo_fixtures import (  # noqa: F401 (nano_zoo is a fixture)
    NANO_SIZES,
    corpus_for_tests,
    mc_accuracy,
    nano_zoo,
    read_jsonl,
)

from harness.evaluate.tasks import check_context, materialize, model_max_length
from harness.zoo import build_family
from harness.zoo.evalsets import RECIPE

CONF = Path(__file__).resolve().parents[1] / "conf"


def _context(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["max_position_embeddings"]


def _tokens(tok, text: str) -> int:
    return len(tok(text).input_ids)


@pytest.mark.parametrize("size", NANO_SIZES)
def test_every_zoo_example_fits_the_model_context(nano_zoo, size):  # noqa: F811
    from transformers import AutoTokenizer

    folder = nano_zoo[size]
    tok, context = AutoTokenizer.from_pretrained(folder), _context(folder)
    mc = read_jsonl(folder / "kbit_eval" / "mc.jsonl")
    lastword = read_jsonl(folder / "kbit_eval" / "lastword.jsonl")
    mc_lengths = [_tokens(tok, it["query"] + " " + c) for it in mc for c in it["choices"]]
    lw_lengths = [_tokens(tok, it["text"]) for it in lastword]
    # what lm-eval reads whole (context + continuation) never exceeds the model's window
    assert max(mc_lengths) <= context and max(lw_lengths) <= context
    # the files were not emptied to get there: most items survive the fitting
    assert len(mc) >= 0.9 * 300 and len(lastword) >= 0.9 * 300
    counts = json.loads((folder / "kbit_eval" / "counts.json").read_text())
    assert counts["context"] == context and counts["recipe"] == RECIPE
    assert counts["mc_longest_tokens"] == max(mc_lengths)
    assert counts["lastword_longest_tokens"] == max(lw_lengths)
    meta = json.loads((folder / "kbit_zoo.json").read_text())
    assert meta["eval_sets"] == counts
    card = (folder / "README.md").read_text()
    assert f"{max(mc_lengths)} tokens and the longest passage {max(lw_lengths)} tokens" in card
    for it in lastword:  # the target still occurs earlier in the (fitted) passage
        context_text, word = it["text"].rsplit(" ", 1)
        assert word in context_text


def _brute_force_lastword(folder: Path) -> list[float]:
    """1.0 / 0.0 per passage: is the last word the model's greedy continuation?

    As LAMBADA scores it: the continuation is " " + the last word (its tokens are those of the
    whole passage after the context's), right when every one of them is the argmax.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    right = []
    for it in read_jsonl(folder / "kbit_eval" / "lastword.jsonl"):
        context_text = it["text"].rsplit(" ", 1)[0]
        whole = tok(it["text"]).input_ids
        cont = whole[len(tok(context_text).input_ids) :]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0]
        right.append(float(logits[-len(cont) :].argmax(-1).tolist() == cont))
    return right


def _cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    from harness.config.schema import register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_nano_lastword_cell_equals_the_model_scored_directly(nano_zoo, tmp_path, caplog):  # noqa: F811
    from harness.records import cell_path, read_cell, records_from_table
    from harness.run.execute import cell_id, run_and_record

    folder = nano_zoo["l2d64"]
    cfg = _cfg(f"model={folder}", "eval=zoo", "eval.perplexity=[]", "bits=16", "device=cpu",
               f"results_dir={tmp_path}")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert run_and_record(cfg) == "ok"
    assert "exceeds model's maximum length" not in caplog.text  # nothing was cut
    rows = records_from_table(read_cell(cell_path(tmp_path, "adhoc", cell_id(cfg))))
    by = {(r.task, r.metric): r for r in rows}
    right = _brute_force_lastword(folder)
    lastword = by[("zoo_lastword", "acc")]
    assert lastword.n_samples == len(right)
    assert list(lastword.per_sample) == right  # passage by passage
    assert lastword.value == pytest.approx(sum(right) / len(right), abs=1e-12)
    # the mc task, scored by an independent implementation of lm-eval's rule (full contexts)
    assert by[("zoo_mc", "acc")].value == pytest.approx(mc_accuracy(folder)[0], abs=1e-12)


def _overlong_copy(folder: Path, dest: Path, n_long: int = 5) -> tuple[Path, list[int]]:
    """A copy of a nano model whose lastword.jsonl ends with ``n_long`` over-long passages
    (as written before the fitting); returns it and those passages' lengths in tokens."""
    from transformers import AutoTokenizer

    shutil.copytree(folder, dest)
    items = read_jsonl(dest / "kbit_eval" / "lastword.jsonl")
    filler = (dest / "kbit_eval" / "heldout.txt").read_text().split()[:80]
    for it in items[-n_long:]:
        it["text"] = " ".join(filler) + " " + it["text"]
    with open(dest / "kbit_eval" / "lastword.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(it) + "\n" for it in items)
    tok = AutoTokenizer.from_pretrained(dest)
    return dest, [_tokens(tok, it["text"]) for it in items[-n_long:]]


def test_overlong_task_is_refused_in_one_line(nano_zoo, tmp_path):  # noqa: F811
    folder, lengths = _overlong_copy(nano_zoo["l1d32"], tmp_path / "old")
    assert model_max_length(folder) == _context(folder) == 64
    n = len(read_jsonl(folder / "kbit_eval" / "lastword.jsonl"))
    with pytest.raises(ValueError) as err:
        check_context(["zoo_mc", "zoo_lastword"], None, folder)
    line = str(err.value)
    assert "\n" not in line and line.startswith("task='zoo_lastword': ")
    assert f"{len(lengths)} of {n} examples" in line
    assert f"the longest is {max(lengths)} tokens, the context 64 tokens" in line
    assert "kbit-zoo" in line
    # eval.limit: only the examples evaluated are checked (lm-eval's rule for a fraction)
    check_context(["zoo_lastword"], None, folder, limit=n - len(lengths))
    with pytest.raises(ValueError, match=rf"^task='zoo_lastword': 2 of {n - 3} examples"):
        check_context(["zoo_lastword"], None, folder, limit=n - 3)
    fraction = (n - 1) / n - 1e-9  # rounds up to n - 1 documents
    with pytest.raises(ValueError, match=rf"^task='zoo_lastword': 4 of {n - 1} examples"):
        check_context(["zoo_lastword"], None, folder, limit=fraction)
    # the task folder for lm-eval is never written for it either
    with pytest.raises(ValueError, match=r"task='zoo_lastword': 5 of"):
        materialize(["zoo_lastword"], None, folder, out_dir=tmp_path / "tasks")
    assert not (tmp_path / "tasks" / "zoo_lastword.yaml").exists()


def test_overlong_task_is_never_scored_by_a_cell(nano_zoo, tmp_path):  # noqa: F811
    """Refused at validation (exit 2) where the runner checks it, else a failed cell."""
    from harness.config.schema import ConfigError
    from harness.records import cell_path, read_cell, records_from_table
    from harness.run.execute import cell_id, run_and_record

    folder, _ = _overlong_copy(nano_zoo["l1d32"], tmp_path / "old")
    cfg = _cfg(f"model={folder}", "eval=zoo", "eval.perplexity=[]", "bits=16", "device=cpu",
               f"results_dir={tmp_path / 'r'}")  # fmt: skip
    try:
        status = run_and_record(cfg)
    except ConfigError as err:
        assert str(err).startswith("task='zoo_lastword': 5 of") and "\n" not in str(err)
        assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.parquet"))
        return
    assert status == "failed"
    rows = records_from_table(read_cell(cell_path(tmp_path / "r", "adhoc", cell_id(cfg))))
    assert rows and all(r.status != "ok" for r in rows)
    assert any("task='zoo_lastword': 5 of" in (r.error or "") for r in rows)


def test_an_older_build_is_refitted_and_keeps_its_weights(nano_zoo, tmp_path):  # noqa: F811
    """A family folder built before the fitting (no recipe in counts.json, over-long files)
    gets fitted files on the next build, with its weights untouched."""
    zoo_dir = tmp_path / "zoo"
    shutil.copytree(nano_zoo["l1d32"].parents[1], zoo_dir, ignore=shutil.ignore_patterns("logs"))
    family = zoo_dir / nano_zoo["l1d32"].parent.name
    old_counts = {"heldout_chars": 50000, "mc_items": 300, "lastword_items": 300}
    for folder in [family, *(family / s for s in NANO_SIZES)]:
        (folder / "kbit_eval" / "counts.json").write_text(json.dumps(old_counts))
        shutil.copy(_overlong_copy(nano_zoo["l1d32"], tmp_path / f"o-{folder.name}")[0]
                    / "kbit_eval" / "lastword.jsonl", folder / "kbit_eval" / "lastword.jsonl")  # fmt: skip
    weights = {s: (family / s / "model.safetensors").read_bytes() for s in NANO_SIZES}
    with pytest.raises(ValueError, match="zoo_lastword"):
        check_context(["zoo_lastword"], None, family / "l2d64")
    paths = build_family("nano", zoo_dir=zoo_dir, corpus=corpus_for_tests(), device="cpu")
    assert [p.name for p in paths] == NANO_SIZES
    for s in NANO_SIZES:
        assert (family / s / "model.safetensors").read_bytes() == weights[s]
        for name in ("mc.jsonl", "lastword.jsonl", "counts.json"):
            assert (family / s / "kbit_eval" / name).read_bytes() == (
                nano_zoo[s] / "kbit_eval" / name
            ).read_bytes()
        meta = json.loads((family / s / "kbit_zoo.json").read_text())
        assert meta["eval_sets"]["recipe"] == RECIPE
    check_context(["zoo_mc", "zoo_lastword"], None, family / "l2d64")


def test_model_max_length_follows_lm_eval(tmp_path):
    """config.json's n_positions / max_position_embeddings / n_ctx (text_config first), then
    the tokenizer's model_max_length, then lm-eval's 2048."""
    from lm_eval.models.huggingface import HFLM

    cases = [({"n_positions": 96}, {}, 96), ({"max_position_embeddings": 200}, {}, 200),
             ({"text_config": {"max_position_embeddings": 512}, "n_positions": 16}, {}, 512),
             ({}, {"model_max_length": 300}, 300), ({}, {}, HFLM._DEFAULT_MAX_LENGTH)]  # fmt: skip
    for i, (config, tok_config, want) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
        assert model_max_length(folder) == want
