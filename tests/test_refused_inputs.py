"""Every malformed input is refused before any model loads: one line, exit 2, nothing written.

The list below is the contract of issue "numbers you can trust": wrong types and ranges, unknown
names with a close match, bad data type entries, missing/corrupt model folders and data files,
unusable results folders, hostile sweep names, ``_target_`` overrides. Each runs the real
``kbit-run`` entry point in-process (``harness.run.execute.main`` with ``sys.argv``), with model loading
replaced by a failure, so a check that only fires after loading fails this test.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from test_models_tiny import save_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A good tiny model and broken copies of it."""
    root = tmp_path_factory.mktemp("models")
    good = save_tiny("gpt_neox", root / "good")
    out = {"good": good}
    empty = root / "empty"
    empty.mkdir()
    out["empty"] = empty
    bad_json = root / "bad_json"
    shutil.copytree(good, bad_json)
    (bad_json / "config.json").write_text("{ not json")
    out["bad_json"] = bad_json
    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    weights = next(truncated.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out["truncated"] = truncated
    remote = root / "remote"
    shutil.copytree(good, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    out["remote"] = remote
    return out


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory, data_root):
    """Data roots with one broken file each (the rest linked to the real shared data)."""
    root = tmp_path_factory.mktemp("data")

    def copy_with(name: str, rel: str, content: str) -> Path:
        target = root / name
        shutil.copytree(data_root / "eval", target / "eval", symlinks=True)
        (target / rel).unlink()
        (target / rel).write_text(content)
        return target

    bad_line = (data_root / "eval/piqa/valid.jsonl").read_text().splitlines()
    bad_line[3] = "{this is not json"
    return {
        "bad_jsonl": copy_with("bad_jsonl", "eval/piqa/valid.jsonl", "\n".join(bad_line) + "\n"),
        "empty_text": copy_with("empty_text", "eval/wikitext2/test.txt", ""),
    }


def _cases(models, data_roots, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    m = f"model={models['good']}"
    return [
        # (overrides, words the one line must contain)
        ([m, "centering=maybe"], ["centering", "maybe"]),
        ([m, "seed=abc"], ["seed", "abc"]),
        ([m, "seed=-1"], ["seed=-1", ">= 0"]),
        ([m, "bits=abc"], ["bits", "abc"]),
        ([m, "dtype=nf4", "bits=3"], ["bits=3", "nf4"]),
        ([m, "dtype=int", "bits=12"], ["bits=12", "allowed"]),
        ([m, "block_size=0"], ["block_size=0", ">= 1"]),
        ([m, "block_size=-64"], ["block_size=-64", ">= 1"]),
        ([m, "+blocksize=32"], ["blocksize", "did you mean 'block_size'"]),
        ([m, "scale_format=fp17"], ["scale_format", "fp17", "fp16"]),
        ([m, "method=proxi"], ["method", "proxi", "proxy"]),
        ([m, "method=proxy", "method.outlier_fraction=0"], ["outlier_fraction=0", "0 < f < 1"]),
        ([m, "method=proxy", "method.outlier_fraction=1.5"], ["outlier_fraction=1.5", "0 < f < 1"]),
        ([m, "method.outlier_fraction=0.1"], ["outlier_fraction", "blockwise"]),
        ([m, "outlier_fraction=0.02"], ["outlier_fraction", "method.outlier_fraction"]),
        ([m, "method=gptq", "method.calibration=hub:allenai/c4"], ["calibration", "offline"]),
        ([m, "method=gptq", "method.damp=0"], ["method.damp=0", "0 < damp < 1"]),
        ([m, "method=hqq", "dtype=float"], ["method=hqq", "dtype=int"]),
        ([m, "format=mxfp5"], ["format", "mxfp5", "mxfp4"]),
        ([m, "compute_dtype=fp8"], ["compute_dtype", "fp8", "bfloat16"]),
        ([m, "device=gpu"], ["device='gpu'", "cuda"]),
        ([m, "trust_remote_code=maybe"], ["trust_remote_code", "maybe"]),
        ([m, "eval.limit=0"], ["eval.limit=0", "fraction"]),
        ([m, "eval.limit=2.5"], ["eval.limit=2.5", "integer"]),
        ([m, "eval.limit=abc"], ["eval.limit", "abc"]),
        ([m, "eval.batch_size=0"], ["eval.batch_size=0", ">= 1"]),
        ([m, "eval.num_fewshot=-1"], ["eval.num_fewshot=-1", ">= 0"]),
        ([m, "eval.perplexity.0.seqlen=1"], ["eval.perplexity.0.seqlen=1", ">= 2"]),
        ([m, "eval.tasks=[piqa,hellasweg]", "eval.mean_of=[]"], ["hellasweg", "hellaswag"]),
        ([m, "eval.mean_of=[arc_easy]"], ["eval.mean_of", "arc_easy", "eval.tasks"]),
        ([m, "eval=pap"], ["eval", "pap", "paper"]),
        ([m, "dtype=flaot"], ["dtype", "flaot", "float"]),
        ([m, "dtype=float", "dtype.exponent_bits=abc"], ["dtype.exponent_bits", "abc"]),
        ([m, "+dtype.exponent_bitz=3"], ["exponent_bitz", "exponent_bits"]),
        (["model=/nonexistent/kbit/model"], ["model=", "/nonexistent/kbit/model", "allowed"]),
        ([f"model={models['empty']}"], ["config.json", str(models["empty"])]),
        ([f"model={models['bad_json']}"], ["config.json", "JSON"]),
        ([f"model={models['truncated']}"], [".safetensors", "truncated"]),
        ([f"model={models['remote']}"], ["trust_remote_code"]),
        ([m, "data_root=/nonexistent/kbit/data"], ["data_root", "/nonexistent/kbit/data"]),
        ([m, f"data_root={data_roots['bad_jsonl']}"], ["valid.jsonl", "4"]),
        ([m, f"data_root={data_roots['empty_text']}"], ["test.txt", "empty"]),
        ([m, f"results_dir={a_file}/results"], ["results_dir", "not a folder"]),
        ([m, "results_dir=/proc/kbit-results"], ["results_dir", "/proc"]),
        ([m, "sweep=../../x"], ["sweep='../../x'", "plain name"]),
        ([m, "sweep=/tmp/x"], ["sweep='/tmp/x'", "plain name"]),
        ([m, "model_family=../x"], ["model_family", "plain name"]),
        ([m, "hydra.callbacks.validate._target_=builtins.print"], ["_target_", "not allowed"]),
        ([m, "+_target_=os.system"], ["_target_", "not allowed"]),
        # issue 21: values Hydra would act on, or OmegaConf would convert, before any check
        ([m, "+hydra.callbacks.x={_target_:logging.FileHandler,filename:x.log}"], ["_target_"]),
        ([m, "+sweeps@_global_=../../../x"], ["sweeps", "../../../x", "no '..'"]),
        ([m, "quantize_head=2"], ["quantize_head=2", "true or false"]),
        ([m, "bits=2"], ["bits=2", "3..8, or 16 for the baseline"]),
        ([m, "format=nvfp4", "block_size=64"], ["fixes block_size=16", "block_size=64"]),
        ([m, "format=mxfp4", "dtype=int"], ["fixes dtype=e2m1", "dtype=int"]),
    ]


def run_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``kbit-run ARGV`` in-process; (exit code, stderr)."""
    from harness.run import execute as run

    monkeypatch.setattr(sys, "argv", ["kbit-run", *argv])
    GlobalHydra.instance().clear()
    try:
        run.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        GlobalHydra.instance().clear()
    return code, capsys.readouterr().err


def test_at_least_thirty_refusals_listed(models, data_roots, tmp_path):
    assert len(_cases(models, data_roots, tmp_path)) >= 30


def test_every_malformed_input_is_one_line_before_loading(
    models, data_roots, data_root, tmp_path, monkeypatch, capsys
):
    from harness.run import execute as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    failures = []
    for i, (overrides, words) in enumerate(_cases(models, data_roots, tmp_path)):
        results = tmp_path / f"results{i}"
        defaults = {"eval": "smoke", "eval.limit": "4", "device": "cpu",
                    "results_dir": str(results), "data_root": str(data_root)}  # fmt: skip
        keys = {o.split("=", 1)[0].lstrip("+") for o in overrides}
        argv = [f"{k}={v}" for k, v in defaults.items() if k not in keys] + overrides
        code, err = run_main(argv, monkeypatch, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        problems = []
        if code != 2:
            problems.append(f"exit {code}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines")
        if "Traceback" in err:
            problems.append("traceback")
        missing = [w for w in words if w not in err]
        if missing:
            problems.append(f"missing {missing}")
        if results.exists() and any(results.rglob("*")):
            problems.append(f"wrote {sorted(results.rglob('*'))[:3]}")
        if problems:
            failures.append(f"{overrides}: {problems}: {err.strip()[:300]}")
    assert not failures, "\n".join(failures)


def test_full_error_gives_the_traceback(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    from harness.run import execute as run

    monkeypatch.setattr(sys, "argv", ["kbit-run", f"model={models['good']}", "block_size=0",
                                      f"results_dir={tmp_path}", "data_root=null"])  # fmt: skip
    GlobalHydra.instance().clear()
    with pytest.raises(run.ConfigError, match="block_size=0"):
        run.main()
    GlobalHydra.instance().clear()


def test_safetensors_header_is_read_not_the_weights(models):
    """The truncated file still has a parseable header: the size check is what catches it."""
    weights = next(Path(models["truncated"]).glob("*.safetensors"))
    n = struct.unpack("<Q", weights.read_bytes()[:8])[0]
    header = json.loads(weights.read_bytes()[8 : 8 + n])
    assert header  # so the refusal above is the size check, not a parse failure


def test_a_failed_cell_exits_1_and_is_recorded(models, data_root, tmp_path, monkeypatch, capsys):
    """A cell that fails after validation writes its failed record and exits non-zero."""
    from harness.records import read_store
    from harness.run import execute as run

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure mid-evaluation")

    monkeypatch.setattr(run, "evaluate_rows", boom)
    argv = [f"model={models['good']}", "eval=smoke", "eval.limit=4", "device=cpu",
            f"results_dir={tmp_path}", f"data_root={data_root}"]  # fmt: skip
    code, _ = run_main(argv, monkeypatch, capsys)
    rows = read_store(tmp_path).to_pylist()
    assert code == 1
    assert [r["status"] for r in rows] == ["failed"] and "simulated failure" in rows[0]["error"]


BAD_DTYPE_ENTRIES = {
    "wrongtype": (
        "name: wrongtype\nfamily: float\nexponent_bits: three\n",
        ["exponent_bits", "three"],
    ),
    "typo": ("name: typo\nfamly: float\n", ["famly", "did you mean 'family'"]),
    "nofamily": ("name: nofamily\nfamily: floaty\n", ["floaty", "float"]),
    "misnamed": ("name: other\nfamily: int\n", ["misnamed", "other"]),
}


@pytest.mark.parametrize("entry", sorted(BAD_DTYPE_ENTRIES))
def test_bad_dtype_yaml_is_one_line_and_blocks_nothing_else(
    entry, models, data_root, tmp_path, monkeypatch, capsys
):
    from harness.run import execute as run

    folder = tmp_path / "dtypes"
    folder.mkdir()
    for name, (text, _) in BAD_DTYPE_ENTRIES.items():
        (folder / f"{name}.yaml").write_text(text)
    (folder / "good6.yaml").write_text("name: good6\nfamily: float\nbits: 6\nexponent_bits: 3\n")
    monkeypatch.setenv("KBIT_DTYPE_DIR", str(folder))
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    base = [f"model={models['good']}", "eval=smoke", "device=cpu", f"data_root={data_root}",
            f"results_dir={tmp_path / 'results'}"]  # fmt: skip
    code, err = run_main([*base, f"dtype={entry}"], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert all(word in err for word in BAD_DTYPE_ENTRIES[entry][1]), err
    assert not (tmp_path / "results").exists()
    # a good entry beside the bad ones still composes (its k is refused here: nothing loads)
    code, err = run_main([*base, "dtype=good6", "bits=5"], monkeypatch, capsys)
    assert code == 2 and "only exists at bits=6" in err, err


@pytest.mark.parametrize(
    ("budget", "words"),
    [("4Gb", ["ambiguous"]), ("4 parsecs", ["unknown unit"]), ("-1GiB", ["-1GiB"]),
     ("GiB", ["GiB"]), ("4", ["no unit"])],
)  # fmt: skip
def test_bad_budget_units_are_one_line(budget, words, tmp_path, capsys):
    from analysis.cli import advise_main

    (tmp_path / "store").mkdir()
    code = advise_main([str(tmp_path / "store"), f"--budget={budget}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words) and "--budget" in err, err
