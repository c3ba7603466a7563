"""``kbit-zoo`` refuses bad input like ``kbit-run``: one line, exit 2, before any work, nothing
written (issue 21: tracebacks for ``sizes=[l9d9]``, ``device=tpu``, ``zoo_dir=<file>``,
``zoo.context=-1``, a missing corpus and ``threads=abc``; 11 lines for ``zoo=unknown``;
``+blocksize=3`` silently ignored; a ``_target_`` in an override value).

Each refusal runs the installed ``kbit-zoo`` in a subprocess with its cwd, ``HOME`` and
``KBIT_ZOO_DIR`` in a temporary folder, and checks that none of them gained a file. What a
line must name is read from the shipped YAML and the file system, not from the code under
test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KBIT_ZOO = Path(sys.executable).parent / "kbit-zoo"
NANO = yaml.safe_load((REPO / "conf" / "zoo" / "nano.yaml").read_text())
NANO_SIZES = [s["name"] for s in NANO["sizes"]]
FAMILIES = sorted(p.stem for p in (REPO / "conf" / "zoo").glob("*.yaml"))


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def _run(tmp: Path, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    cwd, home = tmp / "cwd", tmp / "home"
    cwd.mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    full = {k: v for k, v in os.environ.items() if k not in ("KBIT_CORPUS_DIR", "HYDRA_FULL_ERROR")}
    full.update({"HOME": str(home), "KBIT_ZOO_DIR": str(tmp / "zoo"), "HF_HUB_OFFLINE": "1",
                 "KBIT_ZOO_THREADS": "1", **(env or {})})  # fmt: skip
    return subprocess.run([str(KBIT_ZOO), *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip


def refused(tmp: Path, args: list[str], env: dict | None = None) -> str:
    """Run ``kbit-zoo args``; assert the contract of a refusal and return its one line."""
    before = {p: _tree(p) for p in (tmp / "cwd", tmp / "home")}
    out = _run(tmp, args, env)
    lines = out.stderr.splitlines()
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("kbit-zoo: "), out.stderr[-3000:]
    assert out.stdout == "", out.stdout
    assert not (tmp / "zoo").exists(), _tree(tmp / "zoo")  # not the zoo folder, no log folder
    for folder, tree in before.items():
        assert _tree(folder) == tree, f"{folder} gained {set(_tree(folder)) - set(tree)}"
    return lines[0]


def _can_create_in(folder: Path) -> bool:
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _no_corpus_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KBIT_CORPUS_DIR", raising=False)


# ----------------------------------------------------------------------------- the cases of #21
def test_unknown_size_names_the_sizes_of_the_family(tmp_path: Path) -> None:
    line = refused(tmp_path, ["zoo=nano", "sizes=[l9d9]"])
    assert "sizes" in line and "'l9d9'" in line
    assert all(name in line for name in NANO_SIZES), line


def test_unknown_device_lists_what_kbit_run_accepts(tmp_path: Path) -> None:
    line = refused(tmp_path, ["device=tpu"])
    assert "device='tpu'" in line
    for device in ("auto", "cpu", "cuda", "cuda:N", "mps"):  # kbit-run's list (README)
        assert device in line, line


def test_cuda_on_a_machine_without_it_is_refused_before_work(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = refused(tmp_path, ["device=cuda"])
    assert "device='cuda'" in line and "cpu" in line


def test_zoo_dir_that_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    line = refused(tmp_path, [f"zoo_dir={blocker}"])
    assert "zoo_dir=" in line and str(blocker) in line
    assert blocker.read_text() == "keep me"
    line = refused(tmp_path, [f"zoo_dir={blocker}/zoo"])  # below a file: not even root can
    assert str(blocker) in line


def test_unwritable_zoo_dir(tmp_path: Path) -> None:
    """``/sys`` refuses new files even to root; a read-only folder is checked when not root."""
    targets = []
    if Path("/sys").is_dir() and not _can_create_in(Path("/sys")):
        targets.append(Path("/sys/kbit-zoo-test"))
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        targets.append(locked / "zoo")
    if not targets:
        pytest.skip("no unwritable folder on this machine")
    for target in targets:
        line = refused(tmp_path, [f"zoo_dir={target}"])
        assert "zoo_dir=" in line and "not writable" in line, line
        assert not target.exists()


def test_zoo_dir_tilde_and_variable_expand(tmp_path: Path) -> None:
    """``~`` and ``$HOME`` mean the home folder (here a regular file, so the build is refused
    naming it): the path checked is the expanded one, never a literal ``./~`` folder."""
    home_file = tmp_path / "home_file"
    home_file.write_text("x")
    for value in ("'~/z'", "'$HOME/z'"):  # ${HOME} is OmegaConf's interpolation syntax
        line = refused(tmp_path, [f"zoo_dir={value}"], {"HOME": str(home_file)})
        assert f"{home_file}' is not a folder" in line, line
    assert not (tmp_path / "cwd" / "~").exists() and not (tmp_path / "cwd" / "$HOME").exists()
    line = refused(tmp_path, [], {"KBIT_ZOO_DIR": "~/z", "HOME": str(home_file)})
    assert str(home_file) in line


def test_unset_variable_in_zoo_dir(tmp_path: Path) -> None:
    line = refused(tmp_path, ["zoo_dir='$KBIT_NO_SUCH_VARIABLE/z'"])
    assert "KBIT_NO_SUCH_VARIABLE" in line and "not set" in line


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("zoo.context=-1", "context=-1"),
        ("zoo.sizes.0.layers=0", "sizes[0].layers=0"),
        ("zoo.batch_size=0", "batch_size=0"),
        ("zoo.optimizer.lr=-0.1", "optimizer.lr=-0.1"),
    ],
)
def test_non_positive_family_value(tmp_path: Path, override: str, field: str) -> None:
    line = refused(tmp_path, [override])
    assert field in line and "allowed" in line, line


def test_missing_corpus_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_corpus"
    line = refused(tmp_path, [f"zoo.corpus={missing}"])
    assert "corpus=" in line and str(missing) in line
    line = refused(tmp_path, [], {"KBIT_CORPUS_DIR": str(missing)})  # the family's env default
    assert str(missing) in line


def test_corpus_with_too_few_documents(tmp_path: Path) -> None:
    corpus = tmp_path / "one_doc"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Only one document here.")
    line = refused(tmp_path, [f"zoo.corpus={corpus}"])
    assert "corpus=" in line and "1 non-empty" in line


def test_threads_not_an_integer(tmp_path: Path) -> None:
    assert "an integer" in refused(tmp_path, ["threads=abc"])
    assert "an integer" in refused(tmp_path, [], {"KBIT_ZOO_THREADS": "abc"})
    assert "threads=0" in refused(tmp_path, ["threads=0"])


def test_unknown_family_is_one_line_with_a_suggestion(tmp_path: Path) -> None:
    line = refused(tmp_path, ["zoo=unknown"])
    assert all(f"'{name}'" in line for name in FAMILIES), line
    assert "did you mean 'nano'" in refused(tmp_path, ["zoo=nanoo"])


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("+blocksize=3", "blocksize", "zoo_dir"),
        ("blocksize=3", "blocksize", "zoo_dir"),
        ("+zoo.contxt=64", "contxt", "did you mean 'context'"),
        ("zoo.optimizer.lrr=0.1", "lrr", "did you mean 'lr'"),
    ],
)
def test_unknown_key_is_refused_naming_the_closest(tmp_path, override, key, hint) -> None:
    line = refused(tmp_path, [override])
    assert key in line and hint in line, line
    assert len(line) < 200, (len(line), line)


def test_every_job_of_a_multirun_is_checked_first(tmp_path: Path) -> None:
    """A sweep whose second job is bad is refused before the first one starts."""
    line = refused(tmp_path, ["-m", "device=cpu,tpu"])
    assert "device='tpu'" in line
    assert "'l9d9'" in refused(tmp_path, ["--multirun", "sizes=[l1d32],[l9d9]"])


def test_target_in_an_override_value_is_refused(tmp_path: Path) -> None:
    line = refused(tmp_path, ["+hydra.callbacks.x={_target_:logging.FileHandler,filename:x.log}"])
    assert "_target_" in line
    assert not (tmp_path / "cwd" / "x.log").exists()


# ----------------------------------------------------------------------------- the library API
def test_build_family_refuses_before_writing(tmp_path: Path) -> None:
    """The Python API runs the same checks first: nothing is created for a bad input."""
    from harness.zoo import ZooConfigError, build_family

    zoo = tmp_path / "zoo"
    bad = [{"sizes": ["l9d9"]}, {"device": "tpu"}, {"threads": "abc"}, {"sizes": []},
           {"corpus": tmp_path / "missing"}]  # fmt: skip
    for kwargs in bad:
        with pytest.raises(ZooConfigError):
            build_family("nano", zoo_dir=zoo, **kwargs)
        assert not zoo.exists(), kwargs


@pytest.mark.parametrize(
    "change",
    [
        {"context": 0},
        {"eval_every": 0},
        {"min_heldout_docs": 0},
        {"max_train_chars": 0},
        {"budget": {"tokens": 0}},
        {"budget": {"kind": "proportional", "tokens_per_param": 0}},
        {"budget": {"min_tokens": -1}},
        {"optimizer": {"lr": 0.0}},
        {"optimizer": {"grad_clip": 0.0}},
        {"optimizer": {"warmup_frac": 1.0}},
        {"optimizer": {"min_lr_ratio": -0.1}},
        {"optimizer": {"weight_decay": -1.0}},
        {"optimizer": {"betas": [0.9]}},
        {"optimizer": {"lr": float("nan")}},
        {"eval_sets": {"mc_items": 0}},
        {"eval_sets": {"val_tokens": -1}},
        {"eval_sets": {"lastword_words": 0}},
        {"sizes": [{"name": "a", "width": 0, "heads": 1}]},
        {"sizes": [{"name": "a", "lr": 0.0}]},
        {"name": ""},
        {"name": "../x"},
    ],
    ids=repr,
)
def test_every_non_positive_count_or_rate_is_refused(change: dict) -> None:
    from harness.zoo import ZooConfigError, load_family_config

    raw = {**NANO, "corpus": None}
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ZooConfigError) as info:
        load_family_config(raw)
    line = str(info.value)
    assert "\n" not in line and "allowed" in line
    leaf = next(iter(change.values()))
    name = list(leaf)[-1] if isinstance(leaf, dict) else next(iter(change))
    assert name in line or "sizes[0]" in line, line


def test_a_valid_tiny_build_still_works(tmp_path: Path) -> None:
    """A real build through the CLI (2 optimizer steps), into ``'~/z'`` = ``$HOME/z``."""
    args = ["zoo=nano", "zoo_dir='~/z'", "sizes=[l1d32]", "device=cpu", "threads=1",
            "zoo.max_train_chars=100000", "zoo.budget.tokens=2048", "zoo.tokenizer.vocab_size=300",
            "zoo.eval_sets.heldout_chars=5000", "zoo.eval_sets.mc_items=20",
            "zoo.eval_sets.lastword_items=20", "zoo.eval_sets.val_tokens=512"]  # fmt: skip
    out = _run(tmp_path, args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _tree(tmp_path / "cwd") == []  # no literal ./~ folder, no log folder here
    built = list((tmp_path / "home" / "z").glob("nano-*/l1d32/config.json"))
    assert len(built) == 1, _tree(tmp_path / "home")
    shape = yaml.safe_load(built[0].read_text())  # JSON is YAML
    size = NANO["sizes"][0]
    assert (shape["num_hidden_layers"], shape["hidden_size"]) == (size["layers"], size["width"])
    assert (built[0].parent / "model.safetensors").stat().st_size > 0
    assert list((tmp_path / "home" / "z" / "logs").glob("nano-*"))  # Hydra's log, expanded too


def test_a_config_error_only_the_build_finds_is_one_line_exit_1(tmp_path: Path) -> None:
    """A BPE vocabulary larger than the corpus allows is known only once the tokenizer trains."""
    corpus = tmp_path / "tiny"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"d{i}.txt").write_text("the cat sat on the mat. " * 20)
    out = _run(tmp_path, ["zoo=nano", f"zoo.corpus={corpus}", "zoo.tokenizer.vocab_size=4000"])
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, out.stderr[-3000:]
    assert lines[-1].startswith("kbit-zoo: ") and "tokenizer.vocab_size=4000" in lines[-1]
    assert "Traceback" not in out.stderr


def test_resolve_model_expands_zoo_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kbit-run's ``zoo_dir='~/zoo'`` is looked up under $HOME, not in a literal ``./~``."""
    from harness.zoo import ZooModelNotBuiltError, resolve_model

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ZooModelNotBuiltError) as info:
        resolve_model("zoo:nano/l1d32", "~/zoo")
    assert f"zoo_dir='{tmp_path / 'zoo'}'" in str(info.value)
