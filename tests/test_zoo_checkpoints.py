"""Checkpoints along training: saved, addressable as zoo:<family>/<size>@<tokens>, recorded.

The training-tokens axis of a precision scaling law rests on three facts checked here: a
checkpoint is a complete model folder that loads with ``AutoModelForCausalLM``; saving it
does not change the training run (the final weights are bit-identical with and without
checkpoints); and a cell run on it records the tokens the checkpoint saw.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_run import make_cfg
from zoo_fixtures import corpus_for_tests, zoo_threads

from harness.models.training_tokens import PYTHIA_TOKENS_PER_STEP, train_tokens
from harness.records import cell_path, read_cell, records_from_table
from harness.zoo import ZooConfigError, build_family, load_family_config, resolve_model
from harness.zoo import config as zoo_config
from harness.zoo.config import parse_token_label, token_label

FAMILY = "ckpt"
BUDGET = 24_576  # 24 steps of 16 x 64 tokens
MARKS = [3_000, 6_000, 12_000]


def family(checkpoints: list[int] = MARKS) -> dict:
    """One nano size with a short budget and checkpoints (a plain dict, as a YAML would be)."""
    raw = yaml.safe_load((zoo_config.CONF_DIR / "nano.yaml").read_text())
    raw.update(name=FAMILY, sizes=raw["sizes"][:1], checkpoints=checkpoints, eval_every=8)
    raw["budget"] = {"kind": "fixed", "tokens": BUDGET}
    raw["corpus"] = corpus_for_tests()
    raw["eval_sets"].update(mc_items=24, lastword_items=24)
    return raw


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(zoo_dir, size folder) of the checkpointed family, and its YAML in a conf folder."""
    root = tmp_path_factory.mktemp("ckpt")
    (root / "conf").mkdir()
    (root / "conf" / f"{FAMILY}.yaml").write_text(yaml.safe_dump(family()))
    folder = build_family(family(), zoo_dir=root / "zoo", device="cpu", threads=zoo_threads())[0]
    return root, folder


@pytest.fixture
def shipped(built: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make the test family resolvable by name, as a YAML under conf/zoo/ would be."""
    root, _ = built
    monkeypatch.setattr(zoo_config, "CONF_DIR", root / "conf")
    monkeypatch.delenv("KBIT_CORPUS_DIR", raising=False)
    return root / "zoo"


def test_labels_round_trip() -> None:
    for tokens in (999, 1_000, 500_000, 1_500_000, 2_000_000, 8_000_000, 3_000_000_000):
        assert parse_token_label(token_label(tokens)) == tokens
    assert token_label(500_000) == "500k" and token_label(2_000_000) == "2M"
    with pytest.raises(ValueError, match="not a token count"):
        parse_token_label("2 million")


def test_checkpoints_are_model_folders_along_training(built: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM

    _, folder = built
    final = json.loads((folder / "kbit_zoo.json").read_text())
    assert final["train_tokens"] == BUDGET and final["checkpoint"] == token_label(BUDGET)
    assert list(final["checkpoints"]) == [token_label(t) for t in MARKS]
    seen, losses = [], []
    for label, tokens in final["checkpoints"].items():
        ckpt = folder / "checkpoints" / label
        meta = json.loads((ckpt / "kbit_zoo.json").read_text())
        assert meta["train_tokens"] == tokens == meta["summary"]["tokens_seen"]
        assert meta["final_tokens"] == BUDGET
        # the first step at or past the requested count: at most one step of tokens later
        target = parse_token_label(label)
        assert target <= tokens < target + 16 * 64
        model = AutoModelForCausalLM.from_pretrained(ckpt)
        assert model.num_parameters() == final["n_params"]
        assert (ckpt / "kbit_eval" / "heldout.txt").is_file()
        assert f"zoo:{FAMILY}/l1d32@{label}" in (ckpt / "README.md").read_text()
        seen.append(tokens)
        losses.append(meta["summary"]["final_val_loss"])
    losses.append(final["summary"]["final_val_loss"])
    assert seen == sorted(seen)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    # a checkpoint is a different model from the end of training
    early = load_file(folder / "checkpoints" / token_label(MARKS[0]) / "model.safetensors")
    last = load_file(folder / "model.safetensors")
    assert any(not torch.equal(early[k], last[k]) for k in last)


def test_saving_checkpoints_does_not_change_the_training_run(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    _, folder = built
    plain = build_family(family([]), zoo_dir=tmp_path, device="cpu", threads=zoo_threads())[0]
    assert (plain / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert not (plain / "checkpoints").exists()


def test_checkpoints_are_deterministic(built: tuple[Path, Path], tmp_path: Path) -> None:
    """A second build of the same config gives the same checkpoint weights, byte for byte."""
    _, folder = built
    again = build_family(family(), zoo_dir=tmp_path, device="cpu", threads=zoo_threads())[0]
    for label in [token_label(t) for t in MARKS]:
        a = folder / "checkpoints" / label / "model.safetensors"
        b = again / "checkpoints" / label / "model.safetensors"
        assert a.read_bytes() == b.read_bytes(), label


def test_resolve_checkpoint_specs(built: tuple[Path, Path], shipped: Path) -> None:
    _, folder = built
    assert resolve_model(f"zoo:{FAMILY}/l1d32", shipped) == folder
    assert resolve_model(f"zoo:{FAMILY}/l1d32@{token_label(BUDGET)}", shipped) == folder
    assert resolve_model(f"zoo:{FAMILY}/l1d32@6k", shipped) == folder / "checkpoints" / "6k"
    assert resolve_model(f"zoo:{FAMILY}/l1d32@6000", shipped) == folder / "checkpoints" / "6k"
    with pytest.raises(ZooConfigError, match=r"no checkpoint '5k'.*\['3k', '6k', '12k'"):
        resolve_model(f"zoo:{FAMILY}/l1d32@5k", shipped)
    with pytest.raises(ZooConfigError, match="not a token count"):
        resolve_model(f"zoo:{FAMILY}/l1d32@lots", shipped)
    with pytest.raises(ZooConfigError, match="not a zoo spec"):
        resolve_model(f"zoo:{FAMILY}/l1d32@", shipped)


def test_a_lost_checkpoint_folder_is_named(
    built: tuple[Path, Path], shipped: Path, tmp_path: Path
) -> None:
    _, folder = built
    copy = tmp_path / "zoo"
    shutil.copytree(shipped, copy)
    shutil.rmtree(copy / folder.parent.name / "l1d32" / "checkpoints" / "3k")
    with pytest.raises(ZooConfigError, match="no checkpoint '3k'"):
        resolve_model(f"zoo:{FAMILY}/l1d32@3k", copy)


@pytest.mark.parametrize(
    ("marks", "message"),
    [
        ([6_000, 3_000], "increasing"),
        ([0], "positive"),
        ([BUDGET], "below budget.tokens"),
        ([1_000_000, 1_000_001], "must differ"),
    ],
)
def test_bad_checkpoints_are_refused_at_load(marks: list[int], message: str) -> None:
    raw = family(marks)
    if message == "must differ":
        raw["budget"]["tokens"] = 2_000_000
    with pytest.raises(ZooConfigError, match=rf"checkpoints=.*{message}"):
        load_family_config(raw)


def test_families_without_checkpoints_keep_their_hash() -> None:
    """Adding the field must not rebuild every family users already have."""
    from dataclasses import asdict

    from harness.zoo.config import ZOO_FORMAT_VERSION
    from harness.zoo.paths import family_hash, stable_hash

    cfg = load_family_config("nano")
    shared = asdict(cfg)
    for key in ("name", "description", "sizes", "corpus", "checkpoints"):
        shared.pop(key)
    shared["tokenizer"] = "t"
    expected = stable_hash({"v": ZOO_FORMAT_VERSION, "cfg": shared, "corpus": "c"})
    assert family_hash(cfg, "c", "t") == expected
    cfg.checkpoints = [1000]
    assert family_hash(cfg, "c", "t") != expected


def test_train_tokens_of_known_models(built: tuple[Path, Path], tmp_path: Path) -> None:
    _, folder = built
    assert train_tokens("zoo:x/y", folder) == BUDGET
    saved = json.loads((folder / "kbit_zoo.json").read_text())["checkpoints"]
    assert train_tokens("zoo:x/y@3k", folder / "checkpoints" / "3k") == saved["3k"]
    assert train_tokens("EleutherAI/pythia-70m") == 143_000 * 2048 * 1024
    assert train_tokens("EleutherAI/pythia-1.4b-deduped") == 143_000 * PYTHIA_TOKENS_PER_STEP
    local = tmp_path / "pythia-160m-step1000"
    local.mkdir()
    assert train_tokens(str(local), local) == 1000 * 2_097_152
    assert train_tokens("facebook/opt-125m") is None
    assert train_tokens(str(tmp_path), tmp_path) is None


def test_a_cell_on_a_checkpoint_records_its_tokens_and_window_losses(
    built: tuple[Path, Path], shipped: Path, tmp_path: Path
) -> None:
    from harness.run.execute import run_and_record

    _, folder = built
    spec = f"zoo:{FAMILY}/l1d32@6k"
    cfg = make_cfg(f"model={spec}", f"zoo_dir={shipped}", "eval=zoo", "eval.limit=8",
                   f"results_dir={tmp_path}", "device=cpu", "bits=4", "dtype=int")  # fmt: skip
    assert run_and_record(cfg) == "ok"
    from harness.config.identity import cell_id

    rows = records_from_table(read_cell(cell_path(tmp_path, cfg.sweep, cell_id(cfg))))
    expected = json.loads((folder / "checkpoints" / "6k" / "kbit_zoo.json").read_text())
    assert {r.train_tokens for r in rows} == {expected["train_tokens"]}
    nll = next(r for r in rows if r.task == "heldout" and r.metric == "nll")
    ppl = next(r for r in rows if r.task == "heldout" and r.metric == "ppl")
    windows = torch.tensor(nll.per_sample, dtype=torch.float64)
    assert len(windows) * (64 - 1) == nll.n_samples  # nano's context: 64-token windows
    assert windows.mean().item() == pytest.approx(nll.value, rel=1e-5)
    assert ppl.per_sample is None and ppl.value == pytest.approx(torch.exp(windows.mean()).item())


def test_the_tokens_family_spans_the_axes_it_promises() -> None:
    """conf/zoo/tokens.yaml: >= 3 sizes over >= 8x non-embedding parameters, each trained to
    >= 20 tokens per parameter, >= 5 checkpoints (the end included) over >= 16x in tokens.

    Counted on the meta device from the family's own config builder (no training), with the
    vocabulary the BPE is asked for.
    """
    from transformers import AutoModelForCausalLM

    from harness.models.loading import count_params
    from harness.zoo.model import build_config

    cfg = load_family_config("tokens")
    nonemb = []
    for size in cfg.sizes:
        hf = build_config(cfg.architecture, size, cfg.tokenizer.vocab_size, cfg.context, 0, 0)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf)
        nonemb.append(count_params(model)[1])
    assert len(nonemb) >= 3 and max(nonemb) / min(nonemb) >= 8, nonemb
    assert cfg.budget.kind == "fixed" and cfg.budget.tokens / max(nonemb) >= 20
    points = [*cfg.checkpoints, cfg.budget.tokens]
    assert len(points) >= 5 and points[-1] / points[0] >= 16, points
