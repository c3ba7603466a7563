"""The method registry: built-in methods, a new method as one YAML + one registered function."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_models_tiny import save_tiny

from harness.records import read_cell

CONF = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class HalfSettings:
    """The toy method's settings: its value rule lives in __post_init__, like the real ones."""

    name: str = "toy_half"
    factor: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.factor <= 1:
            raise ValueError(f"method.factor={self.factor!r}; allowed: 0 < factor <= 1")


def _register_toy():
    from harness.quantize.methods import register_method
    from harness.quantize.model import new_report, quantize_each, selected_modules

    @register_method("toy_half", HalfSettings)
    def toy_half(model, request):
        """Round to nearest, then scale every quantized weight by ``factor``."""
        report = quantize_each(model, request, new_report(request, "toy_half"))
        with torch.no_grad():
            for module in selected_modules(model, request).values():
                module.weight.mul_(request.settings.factor)
        return report

    return toy_half


def test_builtin_methods_have_a_yaml_and_a_schema():
    from harness.quantize.methods import methods

    builtin = {n: e for n, e in methods().items() if e.apply.__module__.startswith("harness.")}
    assert {"blockwise", "proxy"} <= set(builtin)
    for name, entry in builtin.items():
        assert (CONF / "method" / f"{name}.yaml").is_file(), name
        assert dataclasses.is_dataclass(entry.settings) and entry.settings().name == name


def test_unknown_method_names_the_closest():
    from harness.quantize.methods import get_method

    with pytest.raises(ValueError, match="did you mean 'proxy'"):
        get_method("proxi")


def test_a_new_method_is_one_yaml_and_one_function(tmp_path, data_root):
    """A toy method plugged in from outside the package runs as a cell and lands in records."""
    from harness.config.identity import cell_id
    from harness.config.schema import register_schema
    from harness.run.execute import run_and_record

    _register_toy()
    extra = tmp_path / "extra_conf"
    (extra / "method").mkdir(parents=True)
    (extra / "method" / "toy_half.yaml").write_text(
        "defaults: [toy_half_schema, _self_]\nname: toy_half\nfactor: 0.25\n"
    )
    model = save_tiny("gpt_neox", tmp_path / "tiny")
    register_schema()
    GlobalHydra.instance().clear()
    overrides = [f"model={model}", "method=toy_half", f"hydra.searchpath=[file://{extra}]",
                 "eval=smoke", "eval.limit=4", "eval.perplexity.0.max_tokens=512",
                 "device=cpu", f"results_dir={tmp_path / 'results'}", f"data_root={data_root}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        with pytest.raises(Exception, match="factor"):
            compose("config", overrides=[*overrides, "method.factor=abc"])
    GlobalHydra.instance().clear()
    assert run_and_record(cfg) == "ok"
    rows = read_cell(tmp_path / "results" / "adhoc" / f"{cell_id(cfg)}.parquet").to_pylist()
    assert {r["method"] for r in rows} == {"toy_half"}
    assert {json.loads(r["method_settings"])["factor"] for r in rows} == {0.25}
    with pytest.raises(ValueError, match="0 < factor <= 1"):
        from harness.quantize.methods import make_settings

        make_settings("toy_half", {"factor": 2.0})


def test_quantize_model_dispatches_and_proxy_keeps_its_setting():
    from test_models_tiny import tiny_config
    from transformers import AutoModelForCausalLM

    from harness.quantize import quantize_model, restore_model

    model = AutoModelForCausalLM.from_config(tiny_config("gpt_neox", 320))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = quantize_model(model, "int", 4, 16, method="proxy", settings={"outlier_fraction": 0.1},
                            progress=False)  # fmt: skip
    assert report.method == "proxy" and report.settings == {"outlier_fraction": 0.1}
    assert report.outlier_fraction == 0.1 and any(t.outlier_columns for t in report.tensors)
    restore_model(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="outlier_fraction"):
        quantize_model(model, "int", 4, 16, method="proxy", settings={"outlier_fraction": 1.5})


def _compose(*overrides: str):
    from harness.config.schema import register_schema

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def test_hqq_cell_runs_and_counts_its_zero_points(tmp_path, data_root):
    """HQQ from its library as a cell: recorded, and its bits are k + (scale + zero) per group."""
    from harness.config.identity import cell_id
    from harness.quantize.hqq import hqq_bits
    from harness.run.execute import run_and_record

    model = save_tiny("gpt_neox", tmp_path / "tiny")
    cfg = _compose(f"model={model}", "method=hqq", "dtype=int", "bits=4", "block_size=32",
                   "eval=smoke", "eval.limit=4", "eval.perplexity.0.max_tokens=512", "device=cpu",
                   f"results_dir={tmp_path / 'results'}", f"data_root={data_root}")  # fmt: skip
    assert run_and_record(cfg) == "ok"
    row = read_cell(tmp_path / "results" / "adhoc" / f"{cell_id(cfg)}.parquet").to_pylist()[0]
    assert row["method"] == "hqq" and row["status"] == "ok"
    quantized = row["n_quantized_params"]
    unquantized_bits = 16 * (row["n_params"] - quantized)
    assert row["total_model_bits"] == pytest.approx(
        unquantized_bits + hqq_bits(quantized, 4, 32, 16, 16)
    )


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["dtype=float"], ["method=hqq", "dtype='float'", "dtype=int"]),
        (["bits=7"], ["method=hqq", "bits=7"]),
        (["block_size=12"], ["method=hqq", "block_size=12", "multiple of 8"]),
        (["centering=true"], ["method=hqq", "centering"]),
    ],
)
def test_hqq_refuses_what_it_cannot_do_before_loading(overrides, words, tmp_path, monkeypatch):
    from harness.run import execute as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    model = save_tiny("gpt_neox", tmp_path / "tiny")
    cfg = _compose(f"model={model}", "method=hqq", "dtype=int", "bits=4", "block_size=32",
                   "eval=ppl", "eval.perplexity.0.path=" + str(model / "config.json"),
                   f"results_dir={tmp_path / 'r'}", *overrides)  # fmt: skip
    with pytest.raises(run.ConfigError) as err:
        run.validate_cell(cfg)
    assert all(w in str(err.value) for w in words), err.value


def test_gptq_cell_runs_on_the_packaged_corpus(tmp_path, data_root):
    """GPTQ as a cell: calibration from kbit's packaged corpus, offline; its identity recorded."""
    from harness.config.identity import cell_id, resolve
    from harness.run.execute import run_and_record

    model = save_tiny("gpt_neox", tmp_path / "tiny")
    base = [f"model={model}", "dtype=quantile", "bits=3", "block_size=32", "eval=smoke",
            "eval.limit=4", "eval.perplexity.0.max_tokens=512", "device=cpu",
            f"results_dir={tmp_path / 'results'}", f"data_root={data_root}"]  # fmt: skip
    cfg = _compose(*base, "method=gptq", "method.n_samples=8", "method.seqlen=64")
    assert run_and_record(cfg) == "ok"
    rows = read_cell(tmp_path / "results" / "adhoc" / f"{cell_id(cfg)}.parquet").to_pylist()
    settings = json.loads(rows[0]["method_settings"])
    assert rows[0]["method"] == "gptq" and settings["n_samples"] == 8
    resolved = resolve(cfg)
    assert resolved.calibration is not None and "calibration" not in resolved.sources
    # the evaluation data digest is the baseline's: GPTQ curves join the 16-bit baseline
    baseline = _compose(*[o for o in base if not o.startswith(("dtype=", "bits="))], "bits=16")
    assert resolve(baseline).data_digest == resolved.data_digest
    other = _compose(*base, "method=gptq", "method.n_samples=8", "method.seqlen=64",
                     "method.seed=1")  # fmt: skip
    assert cell_id(other) != cell_id(cfg)  # another calibration draw is another cell


def test_gptq_without_calibration_offline_is_refused(tmp_path, monkeypatch):
    from harness.run import execute as run

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    model = save_tiny("gpt_neox", tmp_path / "tiny")
    common = [f"model={model}", "method=gptq", "eval=ppl",
              "eval.perplexity.0.path=" + str(model / "config.json"), f"results_dir={tmp_path}"]  # fmt: skip
    for calibration, words in [("hub:allenai/c4", ["offline", "corpus"]),
                               ("/nonexistent/calib.txt", ["no such file", "corpus"])]:  # fmt: skip
        cfg = _compose(*common, f"method.calibration={calibration}")
        with pytest.raises(run.ConfigError) as err:
            run.validate_cell(cfg)
        assert all(w in str(err.value) for w in words), err.value


def test_hqq_groups_are_kbit_blocks_when_a_block_spans_rows():
    """in_features 32 with blocks of 64: each HQQ group is one flattened kbit block."""
    from harness.quantize.hqq import hqq_fake_quantize
    from harness.quantize.methods.hqq import kbit_blocks

    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    rows = kbit_blocks(w, 64)
    assert rows.shape == (4, 64) and torch.equal(rows.reshape(8, 32), w)
    q = hqq_fake_quantize(rows, 4, 64).reshape(8, 32)
    flat = w.reshape(-1)
    for b in range(4):  # each block's values depend only on that block
        alone = hqq_fake_quantize(flat[b * 64 : (b + 1) * 64].reshape(1, 64).repeat(2, 1), 4, 64)
        assert torch.allclose(q.reshape(-1)[b * 64 : (b + 1) * 64], alone[0], atol=1e-6)
