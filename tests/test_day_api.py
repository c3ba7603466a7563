# ruff: noqa: F811  (the session fixture nano_zoo is imported, then requested by name)
"""The notebook API (harness.api.run, analysis.api.load_store) and ``kbit-run --help``.

The API is held to the command line: the same nano cell run by ``kbit-run`` (a subprocess)
and by ``harness.api.run`` gives the same cell file, record for record and column for column,
but for the fields that measure this run rather than the cell (:data:`RUN_ONLY`). A refused
input raises the very line ``kbit-run`` prints, and writes nothing.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from zoo_fixtures import nano_zoo, point_env_at_zoo  # noqa: F401  (session fixture)

from harness.config.schema import ConfigError
from harness.records import Record, cell_path, read_cell, write_cell

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "zoo:nano/l2d64"

# Fields two runs of one cell may differ in, and why: seconds measured by this run (loading,
# quantizing, evaluating, forward passes, the whole cell) and the time the record was made.
# Everything else (identity, config YAML, values, per-example lists, data sources, host,
# versions, git commit, job id, device) is the cell's, so it must be equal.
RUN_ONLY = {"load_s", "quantize_s", "eval_s", "forward_s", "wall_s", "created_at"}


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    """``kbit-run <args>`` as a user runs it (installed beside this interpreter)."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([str(BIN / "kbit-run"), *args], env=full, cwd=cwd,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def plain(value):
    """A cell value comparable with ``==`` (arrays as lists, NaN/None as None)."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [plain(v) for v in value]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def rows(frame: pd.DataFrame, drop: set[str] = frozenset()) -> list[dict]:
    return [{k: plain(v) for k, v in r.items() if k not in drop} for r in frame.to_dict("records")]


# ----------------------------------------------------------------------------- override text
@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("bits", 4, "bits=4"),
        ("quantize_head", True, "quantize_head=true"),
        ("block_size", None, "block_size=null"),
        ("eval.limit", 0.5, "eval.limit=0.5"),
        ("eval.tasks", ["zoo_mc", "zoo_lastword"], "eval.tasks=[zoo_mc,zoo_lastword]"),
        ("model", "zoo:nano/l2d64", "model=zoo:nano/l2d64"),
        ("model_family", "4", "model_family='4'"),  # a string, never the int 4
        ("sweep", "true", "sweep='true'"),
        ("results_dir", "~/a b", "results_dir='~/a b'"),
        ("results_dir", Path("/tmp/x"), "results_dir=/tmp/x"),
        ("model", "a,b", "model='a,b'"),  # never a sweep
        ("~model_family", None, "~model_family"),
    ],
)  # fmt: skip
def test_override_text_reads_back_as_the_python_value(key, value, text):
    from harness.api import override_text
    from harness.config.overrides import parse

    assert override_text(key, value) == text
    if not key.startswith("~"):  # Hydra's own grammar reads back the value given
        parsed = parse([text])[0]
        expected = os.fspath(value) if isinstance(value, Path) else value
        assert not parsed.is_sweep_override()
        assert parsed.value() == expected and type(parsed.value()) is type(expected)


def test_override_text_refuses_what_is_not_a_key_or_value():
    from harness.api import command_line, override_text

    with pytest.raises(ConfigError, match="not a config key"):
        override_text("--multirun", True)
    with pytest.raises(TypeError, match="cannot be an override value"):
        override_text("seed", object())
    with pytest.raises(TypeError, match="both in the mapping and as keyword"):
        command_line({"bits": 4}, {"bits": 3})


# ----------------------------------------------------------------------------- refusals
REFUSED = [
    {"bits": 2},  # a value rule (validation callback)
    {"bits": "abc"},  # a type (composition)
    {"dtype": "nope"},  # a group option (composition)
    {"quantize_head": 2},  # a boolean (command line)
    {"format": "nvfp4", "block_size": 32},  # beside a format (command line)
    {"+hydra.callbacks.x._target_": "os.system"},  # an import path (entry point)
]


@pytest.mark.parametrize("extra", REFUSED, ids=lambda e: ",".join(e))
def test_a_refused_run_raises_the_cli_line_and_writes_nothing(tmp_path, monkeypatch, extra):
    from hydra.core.global_hydra import GlobalHydra

    from harness.api import override_text, run

    zoo = tmp_path / "no_zoo"  # refused before the model is looked at
    given = {"model": MODEL, "eval": "zoo", "zoo_dir": str(zoo), **extra}
    proc = cli(*(override_text(k, v) for k, v in given.items()),
               f"results_dir={tmp_path / 'cli'}")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert line.startswith("kbit-run: ") and "\n" not in line, line

    monkeypatch.setenv("KBIT_RESULTS_DIR", "~/kbit_api_results_never_written")
    env_before = dict(os.environ)
    root = logging.getLogger()
    handlers = list(root.handlers)
    with pytest.raises(ConfigError) as err:
        run({**given, "results_dir": str(tmp_path / "api")})
    assert f"kbit-run: {err.value}" == line
    assert not (tmp_path / "cli").exists() and not (tmp_path / "api").exists()
    assert dict(os.environ) == env_before  # the KBIT_* path rewrite is undone
    assert not GlobalHydra.instance().is_initialized()
    assert root.handlers == handlers


def test_a_refusal_keeps_a_notebooks_own_hydra_session(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.api import run
    from harness.config.overrides import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        mine = GlobalHydra.instance().hydra
        with pytest.raises(ConfigError, match="bits=2"):
            run(model=MODEL, bits=2, results_dir=str(tmp_path))
        assert GlobalHydra.instance().hydra is mine
        assert compose("zoo_build", overrides=["zoo=micro"]).zoo.name == "micro"  # still usable


# ----------------------------------------------------------------------------- a cell, both ways
@pytest.mark.slow  # the nano_zoo fixture trains 3 models (~20-60 s) unless KBIT_ZOO_DIR has them
def test_a_cell_from_python_equals_the_same_cell_from_the_cli(nano_zoo, tmp_path, monkeypatch):
    import torch

    from harness.api import run

    zoo_dir = next(iter(nano_zoo.values())).parents[1]
    point_env_at_zoo(monkeypatch, zoo_dir)
    results = tmp_path / "results"
    args = {"model": MODEL, "dtype": "quantile", "bits": 4, "eval": "zoo", "eval.limit": 12,
            "results_dir": str(results)}  # fmt: skip
    threads = str(torch.get_num_threads())  # the same torch threads: the same float sums
    proc = cli(*(f"{k}={v}" for k, v in args.items()), env={"OMP_NUM_THREADS": threads,
                                                            "KBIT_ZOO_DIR": str(zoo_dir)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [cli_file] = (results / "adhoc").glob("*.parquet")
    cli_yaml = cli_file.with_suffix(".yaml").read_text()
    cli_frame = read_cell(cli_file).to_pandas()
    results.rename(tmp_path / "cli_results")  # the API writes the same path afresh

    frame = run(args)
    api_file = Path(frame.attrs["cell_file"])
    assert frame.attrs["outcome"] == "ok"
    assert api_file.relative_to(results) == cli_file.relative_to(results)  # same cell id
    assert api_file.with_suffix(".yaml").read_text() == cli_yaml
    assert list(frame.columns) == list(cli_frame.columns)
    assert set(Record.__dataclass_fields__) <= set(frame.columns)
    assert rows(frame, RUN_ONLY) == rows(cli_frame, RUN_ONLY)
    assert (frame["created_at"] > cli_frame["created_at"]).all()  # run anew, not copied
    assert len(frame) >= 5 and set(frame["status"]) == {"ok"}
    assert frame["per_sample"].notna().any()  # per-example lists compared too
    for col in RUN_ONLY - {"created_at"}:  # measured by each run, never copied from the other
        assert (frame[col] >= 0).all()
    assert rows(read_cell(api_file).to_pandas()) == rows(frame)  # what the store holds

    # the same call again: read back from the store, not run
    again = run(args)
    assert again.attrs["outcome"] == "skipped"
    assert rows(again) == rows(frame)


@pytest.mark.slow  # nano_zoo (see above)
def test_a_cell_that_fails_after_validation_returns_its_failed_records(
    nano_zoo, tmp_path, monkeypatch
):
    import harness.run.execute
    from harness.api import CellFailedWarning, run

    zoo_dir = next(iter(nano_zoo.values())).parents[1]
    point_env_at_zoo(monkeypatch, zoo_dir)  # the corpus the fixture built with

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(harness.run.execute, "run_cell", broken)
    with pytest.warns(CellFailedWarning, match="out of memory"):
        frame = run(model=MODEL, bits=4, eval="zoo", zoo_dir=str(zoo_dir),
                    results_dir=str(tmp_path))  # fmt: skip
    assert frame.attrs["outcome"] == "failed"
    assert list(frame["status"]) == ["failed"]
    assert frame["error"].iloc[0].startswith("RuntimeError: out of memory (simulated)")
    assert Path(frame.attrs["cell_file"]).is_file()


# ----------------------------------------------------------------------------- load_store
def _cell(sweep: str, cid: str, dtype: str, bits: int, ppl: float, acc: float,
          status: str = "ok") -> list[Record]:  # fmt: skip
    common = dict(sweep=sweep, cell_id=cid, model="zoo:nano/l2d64", model_family="nano",
                  method="blockwise", dtype=dtype, dtype_family=dtype, bits=bits, block_size=64,
                  n_params=1000, total_model_bits=1000.0 * bits, bits_per_param=float(bits),
                  device_class="cpu", compute_dtype="float32", data_digest="d1")  # fmt: skip
    if status != "ok":
        return [Record(**common, status="failed", error="RuntimeError: boom")]
    return [
        Record(**common, task="heldout", metric="ppl", value=ppl, n_samples=100),
        Record(**common, task="zoo_mc", metric="acc", value=acc, stderr=0.05, n_samples=40),
        Record(**common, task="zeroshot_mean", metric="acc", value=acc, stderr=0.04, n_samples=40),
    ]


def test_load_store_gives_the_ok_cells_with_the_columns_the_figures_read(tmp_path, caplog):
    from analysis.api import load_store
    from analysis.load import CONFIG_COLUMNS

    store = tmp_path / "results"
    cells = [_cell("a", "c1", "int", 4, 30.0, 0.50), _cell("a", "c2", "nf4", 3, 45.0, 0.40),
             _cell("b", "c3", "float", 4, 0.0, 0.0, status="failed")]  # fmt: skip
    for records in cells:
        write_cell(records, cell_path(store, records[0].sweep, records[0].cell_id))

    with caplog.at_level(logging.WARNING):
        frame = load_store(store)
    assert "b/c3" in caplog.text and "boom" in caplog.text  # the failed cell, named
    assert sorted(frame["key"]) == ["a/c1", "a/c2"]
    assert set(CONFIG_COLUMNS) <= set(frame.columns)
    got = frame.set_index("key")
    assert got.loc["a/c1", "heldout:ppl"] == 30.0 and got.loc["a/c2", "heldout:ppl"] == 45.0
    assert got.loc["a/c1", "zeroshot_mean:acc"] == 0.50
    assert got.loc["a/c2", "zoo_mc:acc:stderr"] == 0.05
    assert "heldout:ppl:stderr" not in frame.columns  # perplexity has no standard error
    assert got.loc["a/c2", "dtype"] == "nf4" and got.loc["a/c2", "bits"] == 3

    assert list(load_store(store, "a")["key"].sort_values()) == ["a/c1", "a/c2"]
    assert load_store(store, ["b"]).empty  # only the failed cell
    with pytest.raises(FileNotFoundError, match="not in the store"):
        load_store(store, "c")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_store(tmp_path / "nope")


# ----------------------------------------------------------------------------- README
def readme_notebook_block() -> str:
    text = (REPO / "README.md").read_text()
    library = text.split("## Library", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", library, flags=re.S)
              if "harness.api" in b]  # fmt: skip
    assert len(blocks) == 1, blocks
    return blocks[0]


@pytest.mark.slow  # nano_zoo (see above), and two cells
def test_readme_library_snippet_runs(nano_zoo, tmp_path, monkeypatch, capsys):
    zoo_dir = next(iter(nano_zoo.values())).parents[1]
    point_env_at_zoo(monkeypatch, zoo_dir)
    monkeypatch.delenv("KBIT_RESULTS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # the snippet's store: ./results
    code = readme_notebook_block()
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=RuntimeWarning)  # a failed cell would warn
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
    cells = namespace["cells"]
    assert sorted(cells["dtype"]) == ["nf4", "quantile"]
    assert cells["zeroshot_mean:acc"].between(0, 1).all()
    assert (cells["heldout:ppl"] > 1).all()
    assert len(list((tmp_path / "results" / "adhoc").glob("*.parquet"))) == 2
    assert "zeroshot_mean" in capsys.readouterr().out


# ----------------------------------------------------------------------------- --help
def test_kbit_run_help_lists_only_what_a_user_sets():
    from harness.config.overrides import conf_dir

    proc = cli("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "_schema" not in out
    groups = dict(re.findall(r"^([a-z_/]+): (.+)$", out, flags=re.M))
    assert "zoo" not in groups  # kbit-zoo's families
    # every option on disk is listed, found by the help itself (nothing kept by hand)
    for group in ("dtype", "eval", "method", "format", "sweeps"):
        on_disk = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
        assert groups[group].split(", ") == on_disk, group
    assert "model: ???" in out  # the settings, as before

    hydra_help = cli("--hydra-help")
    assert hydra_help.returncode == 0 and "== Flags ==" in hydra_help.stdout


def test_kbit_run_help_follows_the_config_search_path(tmp_path):
    """A data type folder ($KBIT_DTYPE_DIR) adds its entries to the help: derived, not listed."""
    (tmp_path / "my_dtype.yaml").write_text(
        "defaults: [dtype_schema, _self_]\nname: my_dtype\nfamily: int\nasymmetric: true\n"
    )
    proc = cli("--help", env={"KBIT_DTYPE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    dtypes = re.search(r"^dtype: (.+)$", proc.stdout, flags=re.M).group(1).split(", ")
    assert "my_dtype" in dtypes and "int" in dtypes


def test_kbit_zoo_help_is_unchanged():
    proc = subprocess.run([str(BIN / "kbit-zoo"), "--help"], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "zoo: " in proc.stdout and "Configuration groups" in proc.stdout
