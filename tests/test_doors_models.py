"""Issue 21, model folders and evaluation data: every bad input refused before a model loads.

Each case is a door the issue found open: a checkpoint missing a tensor (transformers fills it
with random values and the cell was recorded ``ok``), config.json shapes that differ from the
weights, a shard path outside the model folder, a malicious pickle, ``device=cuda`` on a host
without one, a perplexity text shorter than one window, a gold label outside the choices, a
``model:`` path leaving the model folder, and ``~`` / ``$VAR`` in user paths. The reference for
"what transformers would do with these weights" is transformers itself: its own loading report
(``output_loading_info=True``) on the same folder, so the pre-load check is tested against the
loader it predicts, not against a copy of its rules.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file
from test_models_tiny import tiny_config, tiny_tokenizer

from harness.models import weights as model_weights
from harness.models.loading import CheckpointMismatch, inspect_model, load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF = REPO_ROOT / "conf"
KBIT_RUN = Path(sys.executable).with_name("kbit-run")


# ----------------------------------------------------------------------------- helpers
def save_model(family: str, folder: Path, seed: int = 0, **config_changes) -> Path:
    """A tiny random model of ``family`` (config fields changed as given), saved with its
    tokenizer by save_pretrained (safetensors)."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = tiny_config(family, len(tok))
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def drop_tensor(folder: Path, key: str) -> None:
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    del tensors[key]
    save_file(tensors, weights, metadata={"format": "pt"})


def transformers_report(folder: Path) -> dict:
    """transformers' own loading report on ``folder`` (the independent reference): missing,
    unexpected and mismatched keys. A shape mismatch makes from_pretrained raise; the report
    then comes back with ``ignore_mismatched_sizes=True``."""
    from transformers import AutoModelForCausalLM

    try:
        _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    except RuntimeError:
        _, info = AutoModelForCausalLM.from_pretrained(
            folder, output_loading_info=True, ignore_mismatched_sizes=True
        )
    return info


def refusal(folder: Path) -> str:
    """inspect_model's one-line refusal of ``folder`` ("" when it passes)."""
    try:
        inspect_model(str(folder))
    except ValueError as exc:
        assert "\n" not in str(exc), str(exc)
        return str(exc)
    return ""


def make_cfg(*overrides: str):
    from harness.config.schema import register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def with_defaults(defaults: dict[str, str], overrides: tuple[str, ...] | list[str]) -> list[str]:
    """``defaults`` as overrides, less the keys ``overrides`` sets, then ``overrides``."""
    keys = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    return [f"{k}={v}" for k, v in defaults.items() if k not in keys] + list(overrides)


VALIDATE_DEFAULTS = {"device": "cpu", "eval": "smoke", "data_root": "null", "eval.tasks": "[]",
                     "eval.mean_of": "[]"}  # fmt: skip


def validate(*overrides: str, target=None):
    """``harness.run.execute.validate_cell`` of a composed cell (the runner's validation)."""
    from harness.run.execute import validate_cell

    cfg = make_cfg(*with_defaults(VALIDATE_DEFAULTS, overrides))
    return validate_cell(cfg) if target is None else validate_cell(cfg, target)


def refused_by_validation(*overrides: str, target=None) -> str:
    from harness.config.schema import ConfigError

    with pytest.raises(ConfigError) as err:
        validate(*overrides, target=target)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def kbit_run(args: list[str], tmp_path: Path, env: dict | None = None) -> tuple[int, str]:
    """The real ``kbit-run`` in a subprocess: (exit code, stderr)."""
    defaults = {"device": "cpu", "eval": "smoke", "eval.limit": "4"}
    proc = subprocess.run(
        [str(KBIT_RUN), *with_defaults(defaults, args)], capture_output=True, text=True,
        cwd=tmp_path, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )  # fmt: skip
    return proc.returncode, proc.stderr


def assert_refused_line(code: int, err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("kbit-run: "), err[-2000:]
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


# ----------------------------------------------------------------------------- 1. tensors
TIES = {  # (family, config changes): tied and untied output heads
    "gpt2 (tied head)": ("gpt2", {}),
    "gpt_neox (untied)": ("gpt_neox", {}),
    "llama tie_word_embeddings=true": ("llama", {"tie_word_embeddings": True}),
    "llama tie_word_embeddings=false": ("llama", {"tie_word_embeddings": False}),
    "opt (tied)": ("opt", {}),
    "bloom (tied)": ("bloom", {}),
}


@pytest.mark.parametrize("case", list(TIES))
def test_an_intact_folder_passes_and_transformers_agrees(case, tmp_path):
    family, changes = TIES[case]
    folder = save_model(family, tmp_path / "m", **changes)
    stored = set(load_file(folder / "model.safetensors"))
    tied = changes.get("tie_word_embeddings", family in ("gpt2", "opt", "bloom"))
    head = {"gpt2": "lm_head.weight", "gpt_neox": "embed_out.weight", "llama": "lm_head.weight",
            "opt": "lm_head.weight", "bloom": "lm_head.weight"}[family]  # fmt: skip
    assert (head in stored) == (not tied)  # the fixture really covers both head layouts
    assert refusal(folder) == ""
    report = transformers_report(folder)
    assert not report["missing_keys"] and not report["mismatched_keys"]


@pytest.mark.parametrize("case", ["gpt2 (tied head)", "gpt_neox (untied)",
                                  "llama tie_word_embeddings=true",
                                  "llama tie_word_embeddings=false"])  # fmt: skip
def test_deleting_any_one_tensor_is_refused_exactly_when_transformers_would_randomise_it(
    case, tmp_path
):
    """Every tensor of the checkpoint in turn: the pre-load check refuses, naming the tensor,
    exactly the deletions after which transformers' own report lists it missing."""
    family, changes = TIES[case]
    intact = save_model(family, tmp_path / "intact", **changes)
    keys = sorted(load_file(intact / "model.safetensors"))
    disagreements = []
    for i, key in enumerate(keys):
        folder = tmp_path / f"d{i}"
        shutil.copytree(intact, folder)
        drop_tensor(folder, key)
        missing = transformers_report(folder)["missing_keys"]
        msg = refusal(folder)
        if bool(missing) != bool(msg) or any(k not in msg for k in sorted(missing)[:3]):
            disagreements.append((key, sorted(missing), msg))
        shutil.rmtree(folder)
    assert not disagreements, disagreements
    assert len(keys) > 10


def test_a_sharded_checkpoint_missing_a_tensor_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_model("gpt_neox", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="50KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert refusal(folder) == ""  # intact shards pass
    key = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    shard = folder / index["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert key in transformers_report(folder)["missing_keys"]
    msg = refusal(folder)
    assert key in msg and "random values" in msg and "shards" in msg


CONFIG_CHANGES = {  # config.json edit -> (what transformers reports, words of the refusal)
    "intermediate_size 64 -> 96": (
        {"intermediate_size": 96},
        "mismatched_keys",
        ["differ in shape"],
    ),
    "vocab_size + 8": ("vocab+8", "mismatched_keys", ["differ in shape"]),
    "num_hidden_layers 2 -> 3": ({"num_hidden_layers": 3}, "missing_keys", ["random values"]),
    "num_hidden_layers 2 -> 1": ({"num_hidden_layers": 1}, "unexpected_keys", ["no place for"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CHANGES))
def test_config_json_shapes_that_differ_from_the_weights_are_refused(case, tmp_path):
    """Refused before loading, with the count transformers' own report gives after loading
    and one of its keys (with both shapes, for a shape mismatch)."""
    change, reported, words = CONFIG_CHANGES[case]
    folder = save_model("gpt_neox", tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    if change == "vocab+8":
        change = {"vocab_size": config["vocab_size"] + 8}
    edit_json(folder / "config.json", **change)
    report = transformers_report(folder)[reported]
    msg = refusal(folder)
    if reported == "unexpected_keys":  # matrices only: 1-D norms and biases are not counted
        report = {k for k in report if k.endswith(".weight") and "layernorm" not in k}
        assert report and f"{len(report)} weight matrices" in msg, (sorted(report), msg)
    else:
        assert report and f"{len(report)} tensor(s)" in msg, (sorted(report), msg)
    assert str(folder / "config.json") in msg and "refused before loading" in msg, msg
    if reported == "mismatched_keys":
        assert any(
            f"{key!r} is {list(ckpt)}" in msg and f"makes it {list(model)}" in msg
            for key, ckpt, model in report
        ), (sorted(report), msg)
    else:
        assert any(repr(key) in msg for key in report), (sorted(report), msg)
    for word in words:
        assert word in msg, (word, msg)


def test_stray_buffers_of_old_checkpoints_are_not_refused(tmp_path):
    """Old hub checkpoints carry buffers the current classes do not have (GPT-2's
    ``attn.masked_bias`` scalar, GPT-NeoX's ``attention.bias`` masks, rotary ``inv_freq``):
    transformers drops them and loads every weight, so they must not be refused."""
    folder = save_model("gpt_neox", tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    tensors["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    tensors["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    tensors["gpt_neox.layers.1.attention.some_scalar"] = torch.tensor(0.5)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    report = transformers_report(folder)
    assert not report["missing_keys"] and not report["mismatched_keys"]
    assert refusal(folder) == ""


def test_a_pickle_checkpoint_is_checked_the_same_way(tmp_path):
    folder = save_model("llama", tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    assert refusal(folder) == ""
    del tensors["model.norm.weight"]
    torch.save(tensors, folder / "pytorch_model.bin")
    assert "model.norm.weight" in transformers_report(folder)["missing_keys"]
    assert "'model.norm.weight'" in refusal(folder)


def test_after_loading_missing_weights_fail_the_load(tmp_path, monkeypatch):
    """Second line of defence: with the pre-load check out of the way, the loader itself
    refuses a model transformers completed with random weights (CheckpointMismatch)."""
    folder = save_model("llama", tmp_path / "m")
    drop_tensor(folder, "model.layers.0.mlp.down_proj.weight")
    monkeypatch.setattr(model_weights, "config_weights_problem", lambda *a: "")
    with pytest.raises(CheckpointMismatch, match=r"model\.layers\.0\.mlp\.down_proj\.weight"):
        load_model(str(folder), device="cpu")


def test_after_loading_a_missing_weight_is_a_failed_record_never_ok(tmp_path, monkeypatch, capsys):
    """The whole cell (kbit-run in-process): the load-time check makes it ``failed``, exit 1."""
    from hydra.core.global_hydra import GlobalHydra

    from harness.records import read_store
    from harness.run import execute as run

    folder = save_model("gpt_neox", tmp_path / "m")
    drop_tensor(folder, "gpt_neox.layers.1.attention.dense.weight")
    monkeypatch.setattr(model_weights, "config_weights_problem", lambda *a: "")
    results = tmp_path / "results"
    argv = ["kbit-run", f"model={folder}", "eval=smoke", "eval.tasks=[]", "eval.mean_of=[]",
            "device=cpu", "data_root=null", f"eval.perplexity.0.path={REPO_ROOT / 'README.md'}",
            "eval.perplexity.0.max_tokens=512", f"results_dir={results}"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    try:
        with pytest.raises(SystemExit) as exit_:
            run.main()
    finally:
        GlobalHydra.instance().clear()
    assert exit_.value.code == 1
    rows = read_store(results).to_pylist()
    assert [r["status"] for r in rows] == ["failed"]
    assert "CheckpointMismatch" in rows[0]["error"] and "attention.dense.weight" in rows[0]["error"]


def test_the_check_is_done_once_per_model_folder(tmp_path, monkeypatch):
    folder = save_model("gpt_neox", tmp_path / "m")
    calls = []
    real = model_weights.weights_problem
    monkeypatch.setattr(model_weights, "weights_problem",
                        lambda *a, **k: calls.append(1) or real(*a, **k))  # fmt: skip
    for _ in range(50):
        inspect_model(str(folder))
    assert len(calls) == 1


def test_kbit_run_refuses_a_missing_tensor_before_loading(tmp_path):
    folder = save_model("gpt_neox", tmp_path / "m")
    drop_tensor(folder, "gpt_neox.final_layer_norm.weight")
    results = tmp_path / "results"
    code, err = kbit_run([f"model={folder}", f"results_dir={results}"], tmp_path)
    assert_refused_line(code, err, "gpt_neox.final_layer_norm.weight", "random values")
    assert not results.exists()


# ----------------------------------------------------------------------------- 2. shard paths
@pytest.mark.parametrize("index_name", ["model.safetensors.index.json",
                                        "pytorch_model.bin.index.json"])  # fmt: skip
@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd",
                                   "sub/../../outside.bin"])  # fmt: skip
def test_a_shard_path_outside_the_model_folder_is_refused(index_name, shard, tmp_path):
    folder = save_model("gpt2", tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (tmp_path / "outside.safetensors").write_bytes(b"")  # it exists: presence is not the test
    weight_map = {"transformer.wte.weight": shard, "transformer.h.0.ln_1.weight": "ok.bin"}
    (folder / index_name).write_text(json.dumps({"weight_map": weight_map}))
    msg = refusal(folder)
    assert index_name in msg and repr(shard) in msg and "outside the model folder" in msg, msg


# ----------------------------------------------------------------------------- 3. pickles
class _RunsCode:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_malicious_pickle_is_refused_at_validation_without_running(tmp_path):
    folder = save_model("gpt2", tmp_path / "m")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({"transformer.wte.weight": _RunsCode(f"touch {marker}")},
               folder / "pytorch_model.bin")  # fmt: skip
    msg = refused_by_validation(f"model={folder}", f"results_dir={tmp_path / 'r'}")
    assert "pytorch_model.bin" in msg and "weights_only" in msg
    assert not marker.exists()
    code, err = kbit_run([f"model={folder}", f"results_dir={tmp_path / 'r'}"], tmp_path)
    assert_refused_line(code, err, "pytorch_model.bin", "weights_only")
    assert not marker.exists() and not (tmp_path / "r").exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # control: the payload is live
    assert marker.exists()


def test_a_corrupt_pickle_is_refused_naming_the_file(tmp_path):
    folder = save_model("gpt2", tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a torch archive")
    msg = refusal(folder)
    assert "pytorch_model.bin" in msg and "does not load as a torch checkpoint" in msg


# ----------------------------------------------------------------------------- 4. devices
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_model("gpt_neox", tmp_path_factory.mktemp("tiny") / "m")


def text_file(folder: Path, name: str, words: int) -> Path:
    path = folder / name
    path.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * (words // 9 + 1)))
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_device_cuda_on_a_host_without_cuda_is_refused_for_a_local_run(tiny, tmp_path):
    long = text_file(tmp_path, "long.txt", 3000)
    common = [f"model={tiny}", f"eval.perplexity.0.path={long}", f"results_dir={tmp_path}/r"]
    for device in ("cuda", "cuda:0", "cuda:3"):
        msg = refused_by_validation(*common, f"device={device}")
        assert f"device={device!r}: this host has no CUDA device; allowed: auto, cpu" in msg
    from harness.config.identity import Target

    # planned for a Slurm job on a GPU node: the device is the job host's, not refused here
    resolved = validate(*common, "device=cuda", target=Target(cuda_available=True))
    assert resolved.device_class == "cuda"
    from harness.config.identity import cell_id

    assert cell_id(make_cfg(*common, "device=cuda"))  # an id can still be computed anywhere
    code, err = kbit_run([*common, "device=cuda"], tmp_path)
    assert_refused_line(code, err, "device='cuda'", "no CUDA device", "allowed: auto, cpu")
    assert not (tmp_path / "r").exists()


def test_a_cuda_index_beyond_the_host_gpus_is_refused(monkeypatch):
    from harness.config.identity import device_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_problem("cuda:1") == device_problem("cuda") == device_problem("cpu") == ""
    msg = device_problem("cuda:2")
    assert "device='cuda:2'" in msg and "2 CUDA device(s)" in msg
    assert "allowed: auto, cpu, cuda, cuda:0, cuda:1" in msg


def test_mps_on_a_host_without_it_is_refused(monkeypatch):
    from harness.config.identity import device_problem

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert "device='mps': this host has no MPS" in device_problem("mps")


# ----------------------------------------------------------------------------- 5. windows
def test_a_text_shorter_than_one_window_is_refused_at_the_runtime_boundary(tiny, tmp_path):
    """Validation refuses exactly the texts for which the runtime's ``windows`` would raise
    (fewer tokens than ``seqlen``), naming the set, its token count and the window; the
    window is set to the token count of a middle text, so both sides of the boundary occur."""
    from harness.evaluate.datasets import token_ids
    from harness.evaluate.perplexity import windows

    tok = tiny_tokenizer()
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "it",
        "was",
        "the",
        "best",
        "of",
        "times",
    ]
    texts = [" ".join(words[:k]) for k in range(2, len(words) + 1)]
    seqlen = len(token_ids(tok, texts[len(texts) // 2], disk_cache=False))
    outcomes = []
    for k, text in enumerate(texts):
        path = tmp_path / f"t{k}.txt"
        path.write_text(text)
        ids = token_ids(tok, text, disk_cache=False)
        try:
            windows(ids, seqlen)
            runtime_ok = True
        except ValueError:
            runtime_ok = False
        overrides = [f"model={tiny}", f"eval.perplexity.0.path={path}",
                     f"eval.perplexity.0.seqlen={seqlen}", "eval.perplexity.0.max_tokens=null",
                     f"results_dir={tmp_path}/r"]  # fmt: skip
        if runtime_ok:
            validate(*overrides)
        else:
            msg = refused_by_validation(*overrides)
            assert f"has {len(ids)} tokens" in msg and f"seqlen={seqlen}" in msg, msg
            assert "'wikitext2'" in msg and str(path) in msg
        outcomes.append(runtime_ok)
    assert outcomes == sorted(outcomes) and True in outcomes and False in outcomes, outcomes


def test_max_tokens_below_one_window_is_refused(tiny, tmp_path):
    long = text_file(tmp_path, "long.txt", 3000)
    msg = refused_by_validation(f"model={tiny}", f"eval.perplexity.0.path={long}",
                                "eval.perplexity.0.seqlen=128", "eval.perplexity.0.max_tokens=100",
                                f"results_dir={tmp_path}/r")  # fmt: skip
    assert "max_tokens=100" in msg and "seqlen=128" in msg


def test_a_long_text_is_counted_on_a_prefix_and_the_prefix_is_conclusive(tmp_path):
    from harness.evaluate.perplexity import count_tokens

    tok = tiny_tokenizer()
    text = (REPO_ROOT / "README.md").read_text() * 4
    full = len(tok(text).input_ids)
    counted = count_tokens(tok, text, 100)
    assert counted >= 164 and full >= 100  # conclusive: the whole text holds a window
    assert count_tokens(tok, text[:500], 100) == len(tok(text[:500]).input_ids)  # short: exact


def test_kbit_run_refuses_a_short_text(tiny, tmp_path):
    short = text_file(tmp_path, "short.txt", 5)
    code, err = kbit_run([f"model={tiny}", f"eval.perplexity.0.path={short}",
                          "eval.tasks=[]", "eval.mean_of=[]", f"results_dir={tmp_path}/r",
                          "data_root=null"], tmp_path)  # fmt: skip
    assert_refused_line(code, err, "'wikitext2'", "tokens, fewer than one window", "seqlen=128")
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- 6. labels
def data_copy(data_root: Path, tmp_path: Path, rel: str, edit) -> Path:
    """A data root linking the shared files, with ``rel`` replaced by ``edit(lines)``."""
    root = tmp_path / "data"
    shutil.copytree(data_root / "eval", root / "eval", symlinks=True)
    lines = (data_root / rel).read_text().splitlines()
    (root / rel).unlink()
    (root / rel).write_text("\n".join(edit(lines)) + "\n")
    return root


def _set(lines: list[str], i: int, field: str, value) -> list[str]:
    doc = json.loads(lines[i])
    doc[field] = value
    return [*lines[:i], json.dumps(doc), *lines[i + 1 :]]


LABELS = {  # task: (file, edit, words of the refusal)
    "piqa label file": ("piqa", "eval/piqa/valid-labels.lst",
                        lambda ls: [*ls[:2], "7", *ls[3:]], ["valid-labels.lst:3", "7", "allowed: 0, 1"]),
    "piqa jsonl label": ("piqa", "eval/piqa/valid.jsonl", lambda ls: _set(ls, 4, "label", "7"),
                         ["valid.jsonl:5", "'7'", "allowed: 0, 1"]),
    "hellaswag": ("hellaswag", "eval/hellaswag/validation.jsonl",
                  lambda ls: _set(ls, 0, "label", "9"), ["validation.jsonl:1", "'9'", "allowed: 0, 1, 2, 3"]),
    "arc": ("arc_easy", "eval/arc/arc_easy_test.jsonl", lambda ls: _set(ls, 1, "gold", -1),
            ["arc_easy_test.jsonl:2", "-1", "allowed: 0"]),
    "winogrande": ("winogrande", "eval/winogrande/dev.jsonl", lambda ls: _set(ls, 2, "gold", 2),
                   ["dev.jsonl:3", "label 2", "allowed: 0, 1"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LABELS))
def test_a_gold_label_outside_the_choices_is_refused(case, data_root, tmp_path):
    from harness.evaluate.tasks import check_files

    task, rel, edit, words = LABELS[case]
    check_files([task], data_root, None)  # the shared data passes
    root = data_copy(data_root, tmp_path, rel, edit)
    with pytest.raises(ValueError) as err:
        check_files([task], root, None)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_kbit_run_refuses_a_piqa_label_7(tiny, data_root, tmp_path):
    root = data_copy(data_root, tmp_path, "eval/piqa/valid-labels.lst",
                     lambda ls: [*ls[:2], "7", *ls[3:]])  # fmt: skip
    code, err = kbit_run([f"model={tiny}", f"data_root={root}", f"results_dir={tmp_path}/r"],
                         tmp_path)  # fmt: skip
    assert_refused_line(code, err, "valid-labels.lst:3", "label 7", "allowed: 0, 1")


# ----------------------------------------------------------------------------- 7. model: paths
@pytest.mark.parametrize("path", ["model:../outside.txt", "model:kbit_eval/../../outside.txt",
                                  "model:/etc/hostname", "model:"])  # fmt: skip
def test_a_model_path_must_stay_inside_the_model_folder(path, tiny, tmp_path):
    (tiny.parent / "outside.txt").write_text("a text outside the model folder " * 400)
    msg = refused_by_validation(f"model={tiny}", f"eval.perplexity.0.path={path}",
                                f"results_dir={tmp_path}/r")  # fmt: skip
    assert repr(path) in msg and "leaves the model folder" in msg, msg


def test_a_model_path_inside_the_folder_works(tiny, tmp_path):
    (tiny / "kbit_eval").mkdir(exist_ok=True)
    text_file(tiny / "kbit_eval", "heldout.txt", 2000)
    validate(f"model={tiny}", "eval.perplexity.0.path=model:kbit_eval/heldout.txt",
             f"results_dir={tmp_path}/r")  # fmt: skip


# ----------------------------------------------------------------------------- 8. user paths
def test_model_folder_specs_expand_home_and_variables(tiny, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(tiny, home / "m")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KBIT_TEST_MODELS", str(home))
    for spec in ("~/m", "$HOME/m", "${KBIT_TEST_MODELS}/m"):
        assert inspect_model(spec).path == home / "m"
    loaded = load_model("$KBIT_TEST_MODELS/m", device="cpu")
    assert loaded.path == home / "m"  # the checked folder is the loaded folder
    with pytest.raises(ValueError, match="KBIT_UNSET_VARIABLE") as err:
        inspect_model("$KBIT_UNSET_VARIABLE/m")
    assert "\n" not in str(err.value)


def test_perplexity_and_calibration_paths_expand_home_and_variables(tiny, tmp_path, monkeypatch):
    from harness.evaluate.calibration import calibration_source
    from harness.evaluate.datasets import resolve_text_path

    home = tmp_path / "home"
    home.mkdir()
    text_file(home, "t.txt", 2000)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KBIT_TEST_TEXTS", str(home))
    assert resolve_text_path("mine", "~/t.txt") == home / "t.txt"
    assert resolve_text_path("mine", "$KBIT_TEST_TEXTS/t.txt") == home / "t.txt"
    assert str(home / "t.txt") in calibration_source("~/t.txt").source
    resolved = validate(f"model={tiny}", "eval.perplexity.0.path=$KBIT_TEST_TEXTS/t.txt",
                        f"results_dir={tmp_path}/r")  # fmt: skip
    assert str(home / "t.txt") in resolved.sources["ppl:wikitext2"][0]


def test_kbit_run_checks_the_expanded_model_folder(tmp_path):
    """``model='~/m'`` (quoted for Hydra) is checked at $HOME/m: a broken copy there is
    refused naming the expanded folder; nothing is read from a literal ``./~``."""
    home = tmp_path / "home"
    folder = save_model("gpt_neox", home / "m")
    drop_tensor(folder, "gpt_neox.layers.0.mlp.dense_4h_to_h.weight")
    save_model("gpt_neox", tmp_path / "~" / "m")  # a decoy where the literal path would point
    code, err = kbit_run(["model='~/m'", "eval.tasks=[]", "eval.mean_of=[]", "data_root=null",
                          f"results_dir={tmp_path}/r"], tmp_path,
                         env={"HOME": str(home)})  # fmt: skip
    assert_refused_line(code, err, "model='~/m'", str(folder / "config.json"), "dense_4h_to_h")
    assert not (tmp_path / "r").exists()
