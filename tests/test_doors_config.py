"""The cell config's last open doors (issue 21): user paths, override values, groups, formats.

Each refusal runs the real ``kbit-run`` as a subprocess with its own ``HOME`` and working
directory, and checks the README contract ("What a cell guarantees"): exit status 2, exactly one
stderr line starting ``kbit-run: `` that names the field, the value and what is allowed, and
nothing written in the results folder, the current directory or ``$HOME``. The accepted paths
(``~``, ``$HOME``) run one real cell and check where its files landed.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from test_models_tiny import save_tiny

BIN = Path(sys.executable).parent
# a cell that runs in seconds: one short perplexity set, no zero-shot task
FAST_EVAL = ["eval=smoke", "eval.tasks=[]", "eval.mean_of=[]", "device=cpu",
             "eval.perplexity=[{name:wikitext2,seqlen:64,max_tokens:256}]"]  # fmt: skip
_PATH_VARS = ("KBIT_RESULTS_DIR", "KBIT_DATA_ROOT", "KBIT_ZOO_DIR", "KBIT_DTYPE_DIR")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("gpt_neox", tmp_path_factory.mktemp("models") / "tiny")


def _tree(folder: Path) -> list[str]:
    """Every path under ``folder`` (what "nothing written" compares)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


class Sandbox:
    """A fresh HOME, working directory and results folder for one ``kbit-run``."""

    def __init__(self, root: Path, data_root: Path) -> None:
        self.home, self.cwd, self.results = root / "home", root / "cwd", root / "results"
        for folder in (self.home, self.cwd):
            folder.mkdir(parents=True)
        self.data_root = data_root

    def run(self, *args: str, env: dict[str, str] | None = None, pre: tuple[str, ...] = ()):
        """``kbit-run [pre] model-free args`` here; the completed process."""
        base = {k: v for k, v in os.environ.items() if k not in _PATH_VARS}
        base.update(HOME=str(self.home), KBIT_DATA_ROOT=str(self.data_root), OMP_NUM_THREADS="1")
        base.pop("HYDRA_FULL_ERROR", None)
        base.update(env or {})
        return subprocess.run([str(BIN / "kbit-run"), *pre, *args], cwd=self.cwd, env=base,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    def snapshot(self) -> tuple[list[str], ...]:
        return tuple(_tree(f) if f.exists() else [] for f in (self.home, self.cwd, self.results))


@pytest.fixture
def sandbox(tmp_path, data_root):
    return Sandbox(tmp_path, data_root)


def assert_refused(
    sandbox: Sandbox, args: list[str], words: list[str], env=None, results: bool = True
) -> str:
    """``kbit-run args`` exits 2 with one ``kbit-run: `` line holding ``words``, writing nothing
    (``results``: the sandbox's results folder is passed as ``results_dir``)."""
    before = sandbox.snapshot()
    own = [f"results_dir={sandbox.results}"] if results else []
    proc = sandbox.run(*args, *own, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("kbit-run: "), proc.stderr[-2000:]
    missing = [w for w in words if w not in lines[0]]
    assert not missing, (missing, lines[0])
    assert "Traceback" not in proc.stderr
    assert sandbox.snapshot() == before, "a refused run wrote files"
    return lines[0]


# ----------------------------------------------------------------------------- 1. user paths
@pytest.mark.parametrize(
    "args, env",
    [
        (["results_dir='~/x'", "data_root='~/d'"], {}),
        (["results_dir='$HOME/x'", "data_root='${HOME}/d'"], {}),
        ([], {"KBIT_RESULTS_DIR": "~/x", "KBIT_DATA_ROOT": "~/d"}),
    ],
    ids=["tilde", "variable", "environment"],
)
def test_home_paths_are_written_where_they_are_checked(model_dir, sandbox, args, env):
    """``~`` and ``$HOME`` mean the user's home for the cell files AND Hydra's own folders;
    ``data_root="~/d"`` (valid, refused before) reads the data there."""
    (sandbox.home / "d").symlink_to(sandbox.data_root, target_is_directory=True)
    proc = sandbox.run(f"model={model_dir}", "bits=4", *FAST_EVAL, *args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(sandbox.cwd.iterdir()), _tree(sandbox.cwd)  # no ./~ (nor ./$HOME) folder
    cells = list((sandbox.home / "x" / "adhoc").glob("*.parquet"))
    assert len(cells) == 1
    logs = list((sandbox.home / "x" / ".hydra").rglob("run.log"))
    assert len(logs) == 1  # Hydra's run folder follows the expanded results_dir too


def test_a_multirun_sweep_folder_follows_the_expanded_path(model_dir, sandbox):
    proc = sandbox.run(f"model={model_dir}", "bits=4", *FAST_EVAL, "results_dir='~/m'",
                       pre=("--multirun",))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(sandbox.cwd.iterdir()), _tree(sandbox.cwd)
    assert len(list((sandbox.home / "m" / "adhoc").glob("*.parquet"))) == 1
    assert any((sandbox.home / "m" / ".hydra").iterdir())


@pytest.mark.parametrize(
    "args, env, words",
    [
        (["results_dir='$KBIT_NOT_SET_ANYWHERE/x'"], {}, ["results_dir", "KBIT_NOT_SET_ANYWHERE"]),
        (["data_root='$KBIT_NOT_SET_ANYWHERE/d'"], {}, ["data_root", "KBIT_NOT_SET_ANYWHERE"]),
        ([], {"KBIT_ZOO_DIR": "$KBIT_NOT_SET_ANYWHERE/z"}, ["KBIT_ZOO_DIR", "not set"]),
        (["results_dir=~/x"], {}, ["results_dir=~/x", "results_dir='~/x'"]),  # unquoted: grammar
    ],
)
def test_a_path_that_cannot_be_expanded_is_refused(model_dir, sandbox, args, env, words):
    own = any(a.startswith("results_dir=") for a in args)
    assert_refused(sandbox, [f"model={model_dir}", *args], words, env=env, results=not own)


# --------------------------------------------------------------------- 2-6: override values
@pytest.mark.parametrize(
    "args, words",
    [
        # 2. a _target_ in an override VALUE (Hydra would instantiate a FileHandler: x.log)
        (["+hydra.callbacks.x={_target_:logging.FileHandler,filename:x.log}"], ["_target_"]),
        (["+eval.x={a:{_target_:os.getcwd}}"], ["_target_", "not allowed"]),
        # 3. config-group options that are paths
        (["+sweeps@_global_=../../../x"], ["sweeps", "../../../x", "allowed"]),
        (["dtype=/etc/kbit"], ["dtype", "/etc/kbit", "allowed"]),
        (["eval=../eval/smoke"], ["eval", "../eval/smoke", "allowed"]),
        (["dtype=int,../x"], ["dtype", "../x"]),
        # 4. booleans: only true or false
        (["quantize_head=2"], ["quantize_head=2", "true or false"]),
        (["quantize_embeddings=on"], ["quantize_embeddings=on", "true or false"]),
        (["centering=yes"], ["centering=yes", "true or false"]),
        (["trust_remote_code=1"], ["trust_remote_code=1", "true or false"]),
        (["dtype.signed=0"], ["dtype.signed=0", "true or false"]),
        # 5. the product's k: 3..8, or 16 for the baseline
        (["bits=2"], ["bits=2", "3..8, or 16 for the baseline"]),
        (["bits=9"], ["bits=9", "3..8, or 16 for the baseline"]),
        (["bits=1", "dtype=int"], ["bits=1", "3..8"]),
        # 6. a format fixes dtype, bits, block size and scale format
        (["format=nvfp4", "block_size=64"], ["format=nvfp4 fixes block_size=16", "block_size=64"]),
        (["format=mxfp4", "dtype=int"], ["format=mxfp4 fixes dtype=e2m1", "dtype=int"]),
        (["format=mxfp4", "scale_format=fp16"], ["scale_format=mx", "scale_format=fp16"]),
        (["format=mxfp8_e4m3", "bits=4"], ["bits=8", "bits=4"]),
        (["format=nvfp4", "dtype.exponent_bits=3"], ["format=nvfp4", "dtype.exponent_bits=3"]),
        (["format=nvfp4", "block_size=null"], ["block_size=16", "block_size=null"]),
    ],
)
def test_override_values_are_refused_in_one_line(model_dir, sandbox, args, words):
    assert_refused(sandbox, [f"model={model_dir}", *args], words)
    assert not list(sandbox.home.parent.rglob("x.log"))  # no handler was instantiated


def test_the_format_values_and_their_own_values_are_accepted():
    """Setting a field to the value its format fixes is the format itself: not refused."""
    from harness.config.overrides import check_overrides

    # OCP MX: blocks of 32, E8M0 scale; NVFP4: blocks of 16, E4M3 x FP32 scale (their specs)
    check_overrides(["format=mxfp4", "block_size=32", "bits=4", "dtype=e2m1"])
    check_overrides(["format=nvfp4", "block_size=16", "scale_format=nvfp4"])
    check_overrides(["block_size=64", "dtype=int", "quantize_head=true", "centering=false"])
    check_overrides(["quantize_head=true,false", "dtype=int,float", "+sweeps@_global_=demo"])


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 7, 8, 16])
def test_every_documented_k_passes_the_cell_rule(bits):
    from harness.config.schema import check_bits

    check_bits(bits)


# ------------------------------------------------------------------ 7-8: environment, folders
def test_a_missing_dtype_dir_is_one_line(model_dir, sandbox):
    assert_refused(sandbox, [f"model={model_dir}"], ["KBIT_DTYPE_DIR", "/nonexistent/kbit"],
                   env={"KBIT_DTYPE_DIR": "/nonexistent/kbit"})  # fmt: skip


def test_a_dtype_dir_under_home_is_read(model_dir, sandbox):
    """``KBIT_DTYPE_DIR='~/dt'`` is read as the home folder's ``dt`` (same rule as results)."""
    (sandbox.home / "dt").mkdir()
    (sandbox.home / "dt" / "myint.yaml").write_text("name: myint\nfamily: int\n")
    proc = sandbox.run(f"model={model_dir}", "dtype=myint", "bits=4", *FAST_EVAL,
                       f"results_dir={sandbox.results}", env={"KBIT_DTYPE_DIR": "~/dt"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((sandbox.results / "adhoc").glob("*.parquet"))) == 1


def test_a_dangling_symlink_results_dir_is_refused(model_dir, sandbox):
    link = sandbox.home.parent / "dangling"
    link.symlink_to(sandbox.home.parent / "gone")
    words = ["results_dir", "dangling", str(link)]
    assert_refused(sandbox, [f"model={model_dir}", f"results_dir={link}"], words, results=False)
    assert not (sandbox.home.parent / "gone").exists()


# ----------------------------------------------------------------------- 9. short messages
@pytest.mark.parametrize(
    "args, words",
    [
        (["+blocksize=3"], ["blocksize", "did you mean 'block_size'", "more: see"]),
        (["eval.limt=3"], ["limt", "did you mean 'limit'", "more: see"]),
        (["+dtype.exponent_bitz=3"], ["exponent_bitz", "did you mean 'exponent_bits'"]),
        (["method=gptq", "method.dmp=0.1"], ["dmp", "did you mean 'damp'", "more: see"]),
        (["+eval.batchsize=3"], ["batchsize", "batch_size"]),
    ],
)
def test_unknown_keys_are_short_lines(model_dir, sandbox, args, words):
    line = assert_refused(sandbox, [f"model={model_dir}", *args], words)
    assert len(line) < 200, line


# ------------------------------------------------------------------------ 10. write failure
def test_a_cell_file_that_cannot_be_written_is_one_line_exit_1(
    model_dir, data_root, tmp_path, monkeypatch, capsys
):
    """A full disk at the very end: one line naming the file and the reason, exit 1, no
    Hydra traceback (the write is replaced by one raising ENOSPC, in-process)."""
    from harness.run import execute as run

    def full_disk(records, path, config_yaml=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(run, "write_cell", full_disk)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["kbit-run", f"model={model_dir}", "bits=4", *FAST_EVAL,
                                      f"results_dir={tmp_path / 'r'}", f"data_root={data_root}"])  # fmt: skip
    GlobalHydra.instance().clear()
    try:
        with pytest.raises(SystemExit) as exit_:
            run.main()
    finally:
        GlobalHydra.instance().clear()
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("kbit-run: ")]
    assert exit_.value.code == 1
    assert len(ours) == 1, err[-3000:]
    assert ours[0].startswith("kbit-run: cannot write the cell file ")
    assert str(tmp_path / "r" / "adhoc") in ours[0] and os.strerror(errno.ENOSPC) in ours[0]
    assert "Traceback" not in err
    assert not list((tmp_path / "r" / "adhoc").glob("*.parquet"))


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "format").glob("*.yaml"))
)
def test_a_composed_format_is_checked_against_its_file(name):
    """Every format composes to exactly what it fixes; a value changed after composition (as a
    sweep file's grid would) is refused, naming the format and the field."""
    from hydra import compose, initialize_config_dir

    from harness.config.overrides import check_format_config, format_fixes
    from harness.config.schema import ConfigError, register_schema

    register_schema()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["model=x", f"format={name}"])
        other = compose("config", overrides=["model=x", f"format={name}", "dtype.bias=1"])
    check_format_config(cfg, name)
    fixed = format_fixes(name)
    assert fixed and {"dtype", "bits", "block_size", "scale_format"} <= set(fixed)
    cfg.block_size = 2 * int(fixed["block_size"])
    with pytest.raises(ConfigError, match=f"format={name} fixes block_size"):
        check_format_config(cfg, name)
    with pytest.raises(ConfigError, match=r"dtype\.bias=1"):
        check_format_config(other, name)
