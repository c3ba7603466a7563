"""Loading safety: model code never runs unless asked, pickles never run, bad models refused early.

Every refusal is checked for being one line that names the file (or field) at fault. The
malicious fixtures are live: a control in each test shows that the code *does* run when the
guard is bypassed, so a passing test means the guard held, not that the fixture was inert.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_models_tiny import FAMILIES, save_tiny, tiny_model

from harness.models import files as model_files
from harness.models import loading as models
from harness.models.loading import (
    ModelInfo,
    count_params,
    inspect_model,
    load_model,
    resolve_compute_dtype,
    resolve_device,
    resolve_numerics,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
def refused(call, *fragments: str) -> str:
    """Run ``call``; it must raise ONE line of ValueError containing every fragment."""
    with pytest.raises(ValueError) as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """A complete tiny GPT-2 folder (safetensors, tokenizer.json)."""
    return save_tiny("gpt2", tmp_path / "good")


def with_custom_code(folder: Path, marker: Path, model_type: str = "evil_lm") -> Path:
    """Make ``folder`` ship Python that writes ``marker`` when imported (the attack)."""
    code = f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("custom code ran")
        from transformers import GPT2Config, GPT2LMHeadModel
        class EvilConfig(GPT2Config):
            model_type = {model_type!r}
        class EvilModel(GPT2LMHeadModel):
            config_class = EvilConfig
    """
    (folder / "modeling_evil.py").write_text(textwrap.dedent(code))
    auto_map = {"AutoConfig": "modeling_evil.EvilConfig",
                "AutoModelForCausalLM": "modeling_evil.EvilModel"}  # fmt: skip
    edit_json(folder / "config.json", model_type=model_type, auto_map=auto_map)
    return folder


class _RunsCode:
    """A pickle payload: unpickling it runs ``exec(code)`` (what a malicious .bin does)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def with_malicious_pickle(folder: Path, marker: Path) -> Path:
    payload = _RunsCode(f"open({str(marker)!r}, 'w').write('pickle ran')")
    torch.save({"transformer.wte.weight": payload}, folder / "pytorch_model.bin")
    return folder


# ----------------------------------------------------------------------------- inspection: good
@pytest.mark.parametrize("family", FAMILIES)
def test_inspection_of_a_good_folder_matches_the_model(family, tmp_path):
    model, _ = tiny_model(family)
    folder = save_tiny(family, tmp_path / family)
    info = inspect_model(str(folder))
    assert info == ModelInfo(
        path=folder, architecture=family, checkpoint_dtype="float32",
        n_params=count_params(model)[0], needs_remote_code=False, weights="safetensors",
    )  # fmt: skip


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_checkpoint_dtype_comes_from_config_json(dtype, tmp_path):
    model, tok = tiny_model("llama")
    model.to(getattr(torch, dtype)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == dtype
    assert inspect_model(str(tmp_path)).checkpoint_dtype == dtype


def test_checkpoint_dtype_falls_back_to_the_safetensors_headers(tmp_path):
    model, tok = tiny_model("gpt2")
    model.half().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    edit_json(tmp_path / "config.json", dtype=None, torch_dtype=None)  # older configs lack it
    assert inspect_model(str(tmp_path)).checkpoint_dtype == "float16"
    edit_json(tmp_path / "config.json", torch_dtype="bfloat16")  # transformers 4.x key
    assert inspect_model(str(tmp_path)).checkpoint_dtype == "bfloat16"


def test_sharded_checkpoint_counts_every_shard_and_refuses_a_missing_one(tmp_path):
    model, tok = tiny_model("gpt_neox")
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    tok.save_pretrained(tmp_path)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert inspect_model(str(tmp_path)).n_params == count_params(model)[0]
    shards[-1].unlink()
    refused(lambda: inspect_model(str(tmp_path)),
            "model.safetensors.index.json", "missing", shards[-1].name)  # fmt: skip


# ----------------------------------------------------------------------------- inspection: bad
def _truncate(file: Path, n: int = 10) -> None:
    file.write_bytes(file.read_bytes()[:-n])


def _header_of(payload: bytes) -> bytes:
    return len(payload).to_bytes(8, "little") + payload


BREAKERS = {
    "config not JSON": (lambda f: (f / "config.json").write_text("{"),
                        ["config.json", "not valid JSON"]),
    "config not an object": (lambda f: (f / "config.json").write_text("[1, 2]"),
                             ["config.json", "not an object"]),
    "config lacks model_type": (lambda f: edit_json(f / "config.json", model_type=None),
                                ["config.json", "no model_type"]),
    "unknown model_type": (lambda f: edit_json(f / "config.json", model_type="mystery_lm"),
                           ["config.json", "model_type='mystery_lm'", "known to transformers"]),
    "no weights": (lambda f: (f / "model.safetensors").unlink(),
                   ["no weight files", "model.safetensors", "pytorch_model.bin"]),
    "weights are not safetensors": (
        lambda f: (f / "model.safetensors").write_bytes(b"PK\x03\x04 a zip, not safetensors"),
        ["model.safetensors", "header does not parse"]),
    "weights shorter than 8 bytes": (lambda f: (f / "model.safetensors").write_bytes(b"abc"),
                                     ["model.safetensors", "header does not parse"]),
    "header not JSON": (lambda f: (f / "model.safetensors").write_bytes(_header_of(b"{nope")),
                        ["model.safetensors", "not valid JSON"]),
    "header entry broken": (
        lambda f: (f / "model.safetensors").write_bytes(_header_of(b'{"w": {"dtype": "F32"}}')),
        ["model.safetensors", "'w'", "data_offsets"]),
    "weights truncated": (lambda f: _truncate(f / "model.safetensors"),
                          ["model.safetensors", "truncated"]),
    "weights with trailing bytes": (
        lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes() + b"junk"),
        ["model.safetensors", "longer than its header says"]),
    "index without weight_map": (
        lambda f: ((f / "model.safetensors").unlink(),
                   (f / "model.safetensors.index.json").write_text("{}")),
        ["model.safetensors.index.json", "no weight_map"]),
    "pickle index names a missing shard": (
        lambda f: ((f / "model.safetensors").unlink(),
                   (f / "pytorch_model.bin.index.json").write_text(json.dumps(
                       {"weight_map": {"w": "pytorch_model-00001-of-00002.bin"}}))),
        ["pytorch_model.bin.index.json", "missing", "pytorch_model-00001-of-00002.bin"]),
    "no tokenizer": (lambda f: (f / "tokenizer.json").unlink(),
                     ["no tokenizer files", "tokenizer.json", "vocab.json + merges.txt"]),
    "tokenizer.json not JSON": (lambda f: _truncate(f / "tokenizer.json", 100),
                                ["tokenizer.json", "not valid JSON"]),
    "tokenizer_config.json not JSON": (lambda f: (f / "tokenizer_config.json").write_text("{"),
                                       ["tokenizer_config.json", "not valid JSON"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BREAKERS))
def test_a_broken_folder_is_refused_naming_the_file(case, good):
    inspect_model(str(good))  # fine before, and cached: the cache must notice the change
    breaker, fragments = BREAKERS[case]
    breaker(good)
    refused(lambda: inspect_model(str(good)), f"model={str(good)!r}", *fragments)
    refused(lambda: load_model(str(good), device="cpu"), *fragments)  # load checks first


def test_missing_empty_and_configless_folders_are_refused(tmp_path):
    refused(lambda: inspect_model(str(tmp_path / "nope" / "model")), "no such folder")
    (tmp_path / "file").write_text("x")
    refused(lambda: inspect_model(str(tmp_path / "file")), "is a file, not a folder")
    (tmp_path / "empty").mkdir()
    refused(lambda: inspect_model(str(tmp_path / "empty")), "empty", "no config.json")
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "model.safetensors").write_bytes(b"")
    refused(lambda: inspect_model(str(tmp_path / "weights_only")), "has no config.json")


def test_inspection_is_cached_until_a_file_changes(good, monkeypatch):
    calls = []
    real = model_files._inspect_folder
    monkeypatch.setattr(
        model_files, "_inspect_folder", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    first = inspect_model(str(good))
    for _ in range(100):
        assert inspect_model(str(good)) == first
    assert len(calls) == 1
    edit_json(good / "config.json", dtype="float16")
    assert inspect_model(str(good)).checkpoint_dtype == "float16"
    assert len(calls) == 2


# ----------------------------------------------------------------------------- remote code
REMOTE_CODE_CASES = {
    "unknown model_type with auto_map": ("evil_lm", "config.json"),
    "known model_type with auto_map": ("gpt2", "config.json"),
    "tokenizer auto_map": (None, "tokenizer_config.json"),
}


@pytest.mark.parametrize("case", list(REMOTE_CODE_CASES))
def test_custom_code_is_refused_unless_trusted(case, good, tmp_path):
    model_type, file = REMOTE_CODE_CASES[case]
    marker = tmp_path / "MARKER"
    if model_type is not None:
        with_custom_code(good, marker, model_type)
    else:
        edit_json(good / file, auto_map={"AutoTokenizer": ["tok_evil.Tok", None]})
    msg = refused(lambda: inspect_model(str(good)),
                  str(good / file), "auto_map", "trust_remote_code=true")  # fmt: skip
    assert ("delete auto_map" in msg) == (model_type != "evil_lm")  # a built-in class exists
    info = inspect_model(str(good), trust_remote_code=True)
    assert info.needs_remote_code and info.n_params is not None
    refused(lambda: load_model(str(good), device="cpu"), "auto_map", "trust_remote_code=true")
    assert not marker.exists()


def test_remote_code_refusal_wins_over_other_problems(good, tmp_path):
    with_custom_code(good, tmp_path / "MARKER")
    (good / "model.safetensors").unlink()
    refused(lambda: inspect_model(str(good)), "auto_map", "trust_remote_code=true")
    refused(lambda: inspect_model(str(good), trust_remote_code=True), "no weight files")


def test_transformers_calls_refuse_custom_code_without_prompting(good, tmp_path, monkeypatch):
    """Below our own pre-check: transformers itself is told trust_remote_code=False."""
    marker = tmp_path / "MARKER"
    with_custom_code(good, marker)
    prompts = []
    monkeypatch.setattr(builtins, "input", lambda *a: prompts.append(a) or "y")  # worst case
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        models._from_pretrained(str(good), local=True, use_safetensors=True,
                                dtype=torch.float32, trust_remote_code=False)  # fmt: skip
    assert prompts == [] and not marker.exists()


def test_every_transformers_call_passes_the_safety_arguments(good, monkeypatch):
    import transformers as tf

    calls: list[tuple[str, dict]] = []
    for cls in (tf.AutoConfig, tf.AutoModelForCausalLM, tf.AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model(str(good), device="cpu")
    assert {name for name, _ in calls} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(kw.get("trust_remote_code") is False for _, kw in calls), calls
    assert all(kw.get("local_files_only") is True for _, kw in calls), calls
    model_kw = next(kw for name, kw in calls if name == "AutoModelForCausalLM")
    assert model_kw["weights_only"] is True and model_kw["use_safetensors"] is True


_CHILD = """
import json, sys
from harness.models import loading as models
folder, marker, control = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if sys.argv[4] == "closed":
    sys.stdin.close(); import os; os.close(0)
out = {}
for name, call in [
    ("load_model", lambda: models.load_model(folder, device="cpu")),
    ("inspect_model", lambda: models.inspect_model(folder)),
    ("transformers", lambda: models._from_pretrained(folder, local=True, use_safetensors=True,
                                                     dtype=None, trust_remote_code=False)),
]:
    try:
        call(); out[name] = "loaded"
    except ValueError as exc:
        out[name] = "refused"
import os
out["marker_after_ours"] = os.path.exists(marker)
print("RESULT " + json.dumps(out), flush=True)
if control:  # the attack works when the guard is bypassed: bare transformers, stdin "y"
    from transformers import AutoConfig
    AutoConfig.from_pretrained(folder)
"""


@pytest.mark.parametrize("stdin", ["closed", "y"])
def test_no_prompt_and_no_code_with_a_real_terminal_answer(stdin, good, tmp_path):
    marker = tmp_path / "MARKER"
    with_custom_code(good, marker)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    control = "1" if stdin == "y" else "0"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(good), str(marker), control, stdin],
        input="y\ny\ny\ny\n" if stdin == "y" else None, capture_output=True, text=True,
        env=env, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    ours = proc.stdout.split("RESULT ")[0] + proc.stderr.split("Do you wish")[0]
    assert "RESULT " in proc.stdout, proc.stderr[-2000:]
    result = json.loads(proc.stdout.split("RESULT ")[1].splitlines()[0])
    assert result == {"load_model": "refused", "inspect_model": "refused",
                      "transformers": "refused", "marker_after_ours": False}  # fmt: skip
    assert "[y/N]" not in proc.stdout.split("RESULT ")[0], ours
    assert marker.exists() == (stdin == "y")  # the control: a bare "y" does run the code


# ----------------------------------------------------------------------------- weights policy
def test_a_malicious_pickle_never_executes(good, tmp_path):
    marker = tmp_path / "MARKER"
    (good / "model.safetensors").unlink()
    with_malicious_pickle(good, marker)
    # issue 21: refused by the inspection (validation), no longer only at load time
    refused(lambda: inspect_model(str(good)), "pytorch_model.bin", "weights_only",
            "refused before loading")  # fmt: skip
    refused(lambda: load_model(str(good), device="cpu"), "pytorch_model.bin", "weights_only")
    assert not marker.exists()
    torch.load(good / "pytorch_model.bin", weights_only=False)  # the control: unsafe load runs it
    assert marker.exists()


def test_safetensors_are_preferred_over_a_pickle_next_to_them(good, tmp_path):
    marker = tmp_path / "MARKER"
    with_malicious_pickle(good, marker)
    loaded = load_model(str(good), device="cpu")
    assert loaded.info.weights == "safetensors" and not marker.exists()


def test_a_plain_pickle_checkpoint_loads_through_weights_only(tmp_path):
    model, _ = tiny_model("gpt_neox")
    folder = save_tiny("gpt_neox", tmp_path / "m")
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    loaded = load_model(str(folder), device="cpu")
    assert loaded.info.weights == "pytorch"
    for (name, p), (_, q) in zip(
        model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name


# ----------------------------------------------------------------------------- hub ids
@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF hub cache; :func:`cache_snapshot` puts a repo's files in it."""
    import huggingface_hub.constants as hf_constants

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root))
    return root


def cache_snapshot(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot.parents[1] / "refs").mkdir(exist_ok=True)
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    for name, src in files.items():
        shutil.copy(src, snapshot / name)
    return snapshot


def test_a_cached_hub_id_is_inspected_without_its_weights(good, hub_cache):
    snapshot = cache_snapshot(hub_cache, "org/tiny", {"config.json": good / "config.json"})
    info = inspect_model("org/tiny")
    assert (info.path, info.architecture, info.n_params, info.weights) == (
        None, "gpt2", None, None)  # fmt: skip
    shutil.copy(good / "model.safetensors", snapshot)  # downloaded later: now counted
    assert inspect_model("org/tiny").n_params == inspect_model(str(good)).n_params
    _truncate(snapshot / "model.safetensors")  # what is there is still checked
    refused(lambda: inspect_model("org/tiny"), "model.safetensors", "truncated")


def test_hub_id_offline_without_cache_and_with_custom_code(good, hub_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(lambda: inspect_model("org/absent"), "HF_HUB_OFFLINE", "not in the local cache")
    with_custom_code(good, tmp_path / "MARKER", "gpt2")
    cache_snapshot(hub_cache, "org/evil", {"config.json": good / "config.json"})
    refused(lambda: inspect_model("org/evil"), "auto_map", "trust_remote_code=true")
    assert inspect_model("org/evil", trust_remote_code=True).needs_remote_code


def test_hub_id_online_fetches_only_config_json(good, hub_cache, monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    fetched = []

    def fake_download(repo, filename, **kwargs):
        fetched.append((repo, filename))
        if repo == "org/missing":
            raise OSError("404 Client Error: repository not found\nmore text")
        return str(
            cache_snapshot(hub_cache, repo, {"config.json": good / "config.json"}) / filename
        )

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert inspect_model("org/online").architecture == "gpt2"
    refused(lambda: inspect_model("org/missing"), "OSError: 404", "config.json")
    assert fetched == [("org/online", "config.json"), ("org/missing", "config.json")]


# ----------------------------------------------------------------------------- numerics
NUMERICS = [  # (device, compute, checkpoint, cuda_available, bf16) -> (device class, dtype)
    (("auto", "auto", "float16", False, None), ("cpu", "float32")),
    (("auto", "auto", "float16", True, True), ("cuda", "float16")),  # fp16 stays fp16
    (("auto", "auto", "bfloat16", True, False), ("cuda", "bfloat16")),
    (("auto", "auto", "float32", True, True), ("cuda", "bfloat16")),
    (("auto", "auto", None, True, False), ("cuda", "float16")),
    (("cuda:3", "auto", "float32", None, True), ("cuda", "bfloat16")),
    (("cuda", "auto", None, False, None), ("cuda", "bfloat16")),  # login node: assume bf16
    (("cpu", "auto", "bfloat16", True, True), ("cpu", "float32")),
    (("mps", "auto", "float16", None, None), ("mps", "float32")),
    (("cpu", "float16", "float32", None, None), ("cpu", "float16")),  # explicit stays
    (("cuda:0", "float32", "float16", None, None), ("cuda", "float32")),
]


@pytest.mark.parametrize(("args", "expected"), NUMERICS)
def test_resolve_numerics(args, expected):
    device, compute, checkpoint, cuda, bf16 = args
    got = resolve_numerics(device, compute, checkpoint, cuda_available=cuda, bf16_supported=bf16)
    assert got == expected


def test_bad_device_or_compute_dtype_is_refused_with_the_allowed_values():
    refused(lambda: resolve_numerics("gpu", "auto", None), "device='gpu'", "cuda:N", "auto")
    refused(lambda: resolve_numerics("cuda:x", "auto", None), "device='cuda:x'")
    refused(lambda: resolve_numerics("cpu", "fp8", None), "compute_dtype='fp8'", "bfloat16")
    refused(lambda: resolve_device("tpu"), "device='tpu'")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_compute_dtype("auto", torch.device("cpu")) == torch.float32


def test_load_model_uses_resolve_numerics_with_the_checkpoint_dtype(tmp_path, monkeypatch):
    model, tok = tiny_model("gpt_neox")
    model.half().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert load_model(str(tmp_path), device="cpu").compute_dtype == torch.float32  # auto on cpu
    seen = []

    def as_on_a_gpu(device, compute_dtype, checkpoint_dtype, **kw):
        seen.append(checkpoint_dtype)
        return "cpu", resolve_numerics("cuda", compute_dtype, checkpoint_dtype)[1]

    monkeypatch.setattr(models, "resolve_numerics", as_on_a_gpu)
    loaded = load_model(str(tmp_path), device="cpu")
    assert seen == ["float16"]
    assert loaded.compute_dtype == torch.float16 and loaded.device_class == "cpu"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float16}
