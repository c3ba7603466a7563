"""Fast zoo tests: configs, validation errors, hashing, parameter counts, eval-set builders."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.models.loading import count_params
from harness.zoo import ZooConfigError, ZooModelNotBuiltError, build_family, resolve_model
from harness.zoo.config import SizeConfig, family_names, load_family_config
from harness.zoo.corpus import PACKAGED_CORPUS, corpus_hash, load_corpus, normalize
from harness.zoo.evalsets import EvalSetsConfig, make_lastword, make_mc, sentences
from harness.zoo.model import ARCHITECTURES, build_config
from harness.zoo.paths import family_hash, size_hash
from harness.zoo.resolve import parse_spec

FAMILIES = family_names()


def _nonemb(model: torch.nn.Module) -> int:
    return count_params(model)[1]


def _family_models(name: str) -> list[torch.nn.Module]:
    cfg = load_family_config(name)
    return [AutoModelForCausalLM.from_config(build_config(cfg.architecture, s, 512, cfg.context, 0, 1))
            for s in cfg.sizes]  # fmt: skip


@pytest.mark.parametrize("name", FAMILIES, ids=FAMILIES)
def test_shipped_family_loads(name: str) -> None:
    cfg = load_family_config(name)
    assert cfg.name == name and cfg.sizes


@pytest.mark.parametrize(
    ("name", "min_sizes", "min_span"), [("nano", 3, 1), ("demo", 4, 10), ("micro", 5, 30)]
)
def test_family_spans_required_sizes(name: str, min_sizes: int, min_span: float) -> None:
    counts = [_nonemb(m) for m in _family_models(name)]
    assert len(counts) >= min_sizes
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert counts[-1] / counts[0] >= min_span


def test_gpt_neox_nonembedding_count_matches_formula() -> None:
    # Independent reference: per layer qkv (3d^2+3d) + dense (d^2+d) + FFN (2 d f + f + d)
    # + two LayerNorms (4d); plus the final LayerNorm (2d). Embedding and head excluded.
    size = SizeConfig(name="x", layers=3, width=48, heads=4, ffn=100)
    model = AutoModelForCausalLM.from_config(build_config("gpt_neox", size, 300, 32, 0, 1))
    d, f, L = 48, 100, 3
    expected = L * (3 * d * d + 3 * d + d * d + d + 2 * d * f + f + d + 4 * d) + 2 * d
    total, nonemb = count_params(model)
    assert nonemb == expected
    assert total == expected + 2 * 300 * d  # untied input embedding and head


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_round_trips(arch: str, tmp_path: Path) -> None:
    size = SizeConfig(name="x", layers=1, width=32, heads=2)
    model = AutoModelForCausalLM.from_config(build_config(arch, size, 300, 32, 0, 1)).eval()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, again(input_ids=x).logits)
    assert again.config.model_type == arch


def _family(**overrides) -> dict:
    base = {"name": "t", "sizes": [{"name": "a", "layers": 1, "width": 32, "heads": 2}]}
    return {**base, **overrides}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"sizes": [{"name": "a", "layers": 1, "width": 30, "heads": 4}]}, "sizes[0].width"),
        ({"architecture": "gpt_neo"}, "architecture"),
        ({"tokenizer": {"kind": "bpe", "vocab_size": 100}}, "tokenizer.vocab_size"),
        ({"tokenizer": {"kind": "file", "path": "/nonexistent.json"}}, "tokenizer.path"),
        ({"budget": {"kind": "chinchilla"}}, "budget.kind"),
        ({"corpus": "/nonexistent/folder"}, "corpus"),
        ({"contxt": 64}, "contxt"),
    ],
)
def test_bad_config_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ZooConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_family_config(_family(**overrides))


def test_unknown_architecture_suggests_closest() -> None:
    with pytest.raises(ZooConfigError, match="did you mean 'gpt_neox'"):
        load_family_config(_family(architecture="gpt_neo"))


def test_unknown_family_suggests_closest() -> None:
    with pytest.raises(ZooConfigError, match="did you mean 'nano'"):
        load_family_config("nanoo")


def test_empty_corpus_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("   \n")
    with pytest.raises(ZooConfigError, match="corpus="):
        build_family(_family(corpus=str(tmp_path)), zoo_dir=tmp_path / "zoo")


def test_vocab_larger_than_corpus_names_the_field(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text("the cat sat on the mat. " * 20)
    cfg = _family(corpus=str(tmp_path), tokenizer={"kind": "bpe", "vocab_size": 4000})
    with pytest.raises(ZooConfigError, match=r"tokenizer.vocab_size=4000 is larger"):
        build_family(cfg, zoo_dir=tmp_path / "zoo")


def test_unwritable_zoo_dir_names_the_field(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a folder cannot be made below a file, not even by root
    with pytest.raises(ZooConfigError, match="zoo_dir="):
        build_family(_family(), zoo_dir=blocker / "zoo")


def test_resolve_unbuilt_names_the_build_command(tmp_path: Path) -> None:
    for spec in ("zoo:nano/l1d32", "nano/l1d32"):  # harness.models.loading strips the prefix
        with pytest.raises(ZooModelNotBuiltError, match="kbit-zoo zoo=nano"):
            resolve_model(spec, tmp_path)
    with pytest.raises(ZooConfigError, match="did you mean 'l1d32'"):
        resolve_model("zoo:nano/l1d33", tmp_path)


@pytest.mark.parametrize("spec", ["zoo:nano", "zoo:/x", "zoo:a/b/c", "nano"])
def test_bad_spec(spec: str) -> None:
    with pytest.raises(ZooConfigError, match="zoo:<family>/<size>"):
        parse_spec(spec)


def test_hash_covers_training_fields_but_not_sizes(tmp_path: Path) -> None:
    cfg = load_family_config("nano")
    h = family_hash(cfg, "c", "t")
    assert family_hash(replace(cfg, sizes=cfg.sizes[:1], name="other"), "c", "t") == h
    assert family_hash(replace(cfg, seed=1), "c", "t") != h
    assert family_hash(cfg, "c2", "t") != h
    assert size_hash(h, cfg.sizes[0]) != size_hash(h, replace(cfg.sizes[0], lr=0.1))
    # the corpus enters by content, not by path
    shutil.copytree(PACKAGED_CORPUS, tmp_path / "copy")
    assert corpus_hash(tmp_path / "copy") == corpus_hash(None)


def test_normalize_joins_hard_wraps() -> None:
    assert (
        normalize("One line\nwrapped here.\n\n\nNext  para.\r\n")
        == "One line wrapped here.\n\nNext para."
    )


def test_sentences_respect_abbreviations() -> None:
    text = 'Mr. Darcy bowed. "Is it?" she asked. He met St. John. Then rain.\n\nNew paragraph'
    expected = [
        "Mr. Darcy bowed.",
        '"Is it?" she asked.',
        "He met St. John.",
        "Then rain.",
        "New paragraph",
    ]
    assert sentences(text) == expected


@pytest.fixture(scope="module")
def packaged():
    return load_corpus(None, 0.2)


def test_packaged_split_is_disjoint_and_stable(packaged) -> None:
    train = {d.name for d in packaged.train}
    held = {d.name for d in packaged.heldout}
    assert held and train and not train & held
    assert held == {d.name for d in load_corpus(None, 0.2).heldout}


def test_mc_items_are_real_continuations(packaged) -> None:
    cfg = EvalSetsConfig(mc_items=100)
    items = make_mc(packaged.heldout, cfg, seed=0)
    assert len(items) == 100
    assert make_mc(packaged.heldout, cfg, seed=0) == items  # reproducible
    assert set(it["gold"] for it in items) == set(range(cfg.mc_choices))
    per_doc = [(d.text, set(sentences(d.text))) for d in packaged.heldout]
    gold_len, other_len = [], []
    for it in items:
        true = it["choices"][it["gold"]]
        full = it["query"] + " " + true
        # query + " " + the true choice ends with a whole sentence of exactly one document
        owners = [text for text, sents in per_doc
                  if any(full.endswith(s) and s.endswith(" " + true) for s in sents)]  # fmt: skip
        assert len(owners) == 1, it
        for k, choice in enumerate(it["choices"]):
            if k != it["gold"]:
                assert choice not in owners[0]  # distractors come from another document
                other_len.append(len(choice))
        gold_len.append(len(true))
        assert json.loads(json.dumps(it)) == it
    # distractors are matched in length: no length bias for summed log-likelihoods
    mean_gold, mean_other = sum(gold_len) / len(gold_len), sum(other_len) / len(other_len)
    assert abs(mean_gold - mean_other) < 0.1 * mean_gold


def test_lastword_target_occurs_in_context(packaged) -> None:
    items = make_lastword(
        packaged.heldout, EvalSetsConfig(lastword_items=200, lastword_words=40), seed=0
    )
    assert len(items) == 200
    for it in items:
        context, target = it["text"].rsplit(" ", 1)
        assert target.isalpha() and target in context


def test_built_tokenizer_round_trips_text(packaged, tmp_path: Path) -> None:
    from harness.zoo.tokenizer import get_tokenizer

    texts = [d.text[:200_000] for d in packaged.train]
    tok = get_tokenizer(load_family_config("nano").tokenizer, texts, "k", tmp_path, 64)
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    sample = packaged.heldout[0].text[:2000]
    assert again.decode(again(sample).input_ids) == sample
    assert again.eos_token == "<|endoftext|>" and again.pad_token == "<|padding|>"


@pytest.mark.parametrize("name", FAMILIES, ids=FAMILIES)
def test_kbit_zoo_config_composes(name: str, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from harness.zoo.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR.parent), version_base="1.3"):
        cfg = compose(
            "zoo_build", overrides=[f"zoo={name}", f"zoo.corpus={tmp_path}", "zoo_dir=/z"]
        )
    family = load_family_config(OmegaConf.to_container(cfg.zoo, resolve=True))
    assert family.name == name and family.corpus == str(tmp_path) and cfg.zoo_dir == "/z"
