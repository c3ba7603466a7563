"""kbit-run: cell identity, validation before any work, one cell end to end, failure records."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from test_models_tiny import save_tiny

from harness.records import MEAN_ZEROSHOT_TASK, cell_path, read_cell, records_from_table

CONF = Path(__file__).resolve().parents[1] / "conf"


def make_cfg(*overrides: str):
    from harness.config.schema import register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("gpt_neox", tmp_path_factory.mktemp("models") / "pythia-tiny")


def smoke(model_dir, results, *extra):
    return make_cfg(f"model={model_dir}", "eval=smoke", f"results_dir={results}",
                    "eval.limit=6", "eval.perplexity.0.max_tokens=1024", "device=cpu", *extra)  # fmt: skip


def test_cell_id_ignores_where_and_baseline_ignores_dtype(model_dir, tmp_path):
    from harness.config.identity import cell_id

    m = f"model={model_dir}"
    a = cell_id(make_cfg(m, "results_dir=/a", "sweep=s1", "device=cpu", "model_family=x"))
    assert a == cell_id(make_cfg(m, "results_dir=/b", "sweep=s2", "device=cpu", "zoo_dir=/z"))
    assert a != cell_id(make_cfg(m, "bits=3"))
    assert a != cell_id(make_cfg(m, "dtype=nf4"))
    base = cell_id(make_cfg(m, "bits=16", "dtype=int", "block_size=64"))
    assert base == cell_id(make_cfg(m, "bits=16", "dtype=float", "block_size=128"))
    assert len(a) == 16 and int(a, 16) >= 0


def test_cell_id_holds_resolved_numerics(model_dir):
    """A CPU/fp32 cell and a GPU/bf16 cell of one config are different measurements."""
    from harness.config.identity import Target, cell_id, resolve

    m, gpu = f"model={model_dir}", Target(cuda_available=True, bf16_supported=True)
    cpu = make_cfg(m, "device=cpu")
    auto = make_cfg(m, "device=auto")
    # on this CPU machine auto resolves to cpu/float32: the same measurement as explicit cpu
    assert cell_id(auto, resolve(auto, Target(cuda_available=False))) == cell_id(cpu)
    assert cell_id(auto, resolve(auto, gpu)) != cell_id(cpu)
    assert cell_id(make_cfg(m, "device=cuda")) == cell_id(make_cfg(m, "device=cuda:1"))
    assert cell_id(make_cfg(m, "device=cuda")) != cell_id(cpu)
    assert cell_id(make_cfg(m, "device=cpu", "compute_dtype=float32")) == cell_id(cpu)
    assert cell_id(make_cfg(m, "device=cpu", "compute_dtype=bfloat16")) != cell_id(cpu)
    # an fp32 checkpoint runs in bf16 on a GPU that supports it (the checkpoint's own 16-bit
    # dtype when it has one: tests/test_model_safety.py)
    assert (resolve(auto, gpu).device_class, resolve(auto, gpu).compute_dtype) == (
        "cuda",
        "bfloat16",
    )


def test_cell_id_holds_the_data_source(model_dir, data_root, tmp_path):
    """Other data is another cell; the same bytes in another folder are the same cell."""
    import shutil

    from harness.config.identity import cell_id

    def root_with(piqa: str) -> Path:
        root = tmp_path / f"data{len(list(tmp_path.iterdir()))}"
        shutil.copytree(data_root / "eval", root / "eval", symlinks=True)
        (root / "eval/piqa/valid.jsonl").unlink()
        (root / "eval/piqa/valid.jsonl").write_text(piqa)
        return root

    text = (data_root / "eval/piqa/valid.jsonl").read_text()
    same, other = root_with(text), root_with(text.replace("water", "Water", 1))
    ids = {
        name: cell_id(smoke(model_dir, tmp_path, f"data_root={root}"))
        for name, root in (("orig", data_root), ("same", same), ("other", other))
    }
    assert ids["orig"] == ids["same"] != ids["other"]


def test_nan_model_gives_failed_rows_for_every_task(tmp_path, data_root):
    """One NaN in the final LayerNorm: lm-eval would score choice 0 (a plausible accuracy)."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.run.execute import cell_id, run_and_record

    folder = save_tiny("gpt_neox", tmp_path / "nan-model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight[3] = float("nan")
    model.save_pretrained(folder)
    cfg = smoke(folder, tmp_path / "results", "bits=16")
    assert run_and_record(cfg) == "failed"
    rows = records_from_table(read_cell(cell_path(tmp_path / "results", "adhoc", cell_id(cfg))))
    tasks = {"wikitext2", "lambada_openai", "piqa", MEAN_ZEROSHOT_TASK}
    assert {r.task for r in rows} == tasks
    for r in rows:
        assert r.status == "failed" and r.value is None, (r.task, r.metric, r.value)
        assert r.error.startswith("NonFiniteError:") and r.task in r.error, r.error


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=/nonexistent/model/dir"], "nonexistent/model/dir"),
        (["eval.tasks=[piqa,hellasweg]", "eval.mean_of=[]"], "did you mean 'hellaswag'"),
        (["dtype=nf4", "bits=3"], "bits=3 is not allowed for dtype 'nf4'"),
        (["block_size=0"], "block_size=0"),
        (["method=proxy", "method.outlier_fraction=0"], "method.outlier_fraction=0"),
        (["eval.mean_of=[arc_easy]"], "not in eval.tasks"),
    ],
)
def test_bad_input_fails_before_loading(model_dir, tmp_path, overrides, message, monkeypatch):
    from harness.run import execute as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    cfg = smoke(model_dir, tmp_path, *overrides)
    with pytest.raises(ValueError, match=message):
        run.run_and_record(cfg)
    assert not list(tmp_path.rglob("*.parquet"))


def test_missing_data_file_fails_before_loading(model_dir, tmp_path):
    from harness.run.execute import validate_cell

    (tmp_path / "eval" / "wikitext2").mkdir(parents=True)
    (tmp_path / "eval" / "wikitext2" / "test.txt").write_text("x")
    with pytest.raises(ValueError, match=r"lambada_openai.*test.jsonl.*does not exist"):
        validate_cell(smoke(model_dir, tmp_path, f"data_root={tmp_path}"))
    with pytest.raises(ValueError, match=r"heldout.*kbit_eval/heldout.txt.*does not exist"):
        validate_cell(smoke(model_dir, tmp_path, "eval=zoo"))
    with pytest.raises(ValueError, match=r"zoo_mc.*kbit_eval/mc.jsonl.*does not exist"):
        validate_cell(smoke(model_dir, tmp_path, "eval=zoo", "eval.perplexity=[]"))


def test_unknown_dtype_fails_at_compose():
    with pytest.raises(Exception, match="nf5"):
        make_cfg("model=m/x", "dtype=nf5")


def test_one_cell_end_to_end_and_baseline(model_dir, tmp_path, data_root):
    from harness.evaluate import load_text, perplexity
    from harness.models.loading import load_model, quantizable_modules
    from harness.run.execute import ModelCache, cell_id, run_and_record

    cache = ModelCache()
    cfg = smoke(model_dir, tmp_path, "dtype=int", "bits=4", "block_size=32")
    assert run_and_record(cfg, cache) == "ok"
    rows = records_from_table(read_cell(cell_path(tmp_path, "adhoc", cell_id(cfg))))
    by = {(r.task, r.metric): r for r in rows}
    assert {r.status for r in rows} == {"ok"} and {r.cell_id for r in rows} == {cell_id(cfg)}
    row = rows[0]
    loaded = load_model(str(model_dir), device="cpu")
    assert row.quantized_modules == list(quantizable_modules(loaded.model))
    assert row.n_quantized_params == sum(
        m.weight.numel() for m in quantizable_modules(loaded.model).values()
    )
    assert (row.method, row.dtype, row.dtype_family, row.bits) == ("blockwise", "int", "int", 4)
    assert row.model_family == "pythia" and row.architecture == "gpt_neox"
    assert row.bits_per_param < 16 and row.total_model_bits == pytest.approx(
        row.bits_per_param * row.n_params
    )
    assert 0 < row.forward_s <= row.eval_s <= row.wall_s
    assert row.version_torch and row.hostname and row.created_at and "bits: 4" in row.config
    accs = [by[(t, "acc")].value for t in ("lambada_openai", "piqa")]
    assert by[(MEAN_ZEROSHOT_TASK, "acc")].value == pytest.approx(sum(accs) / 2)
    piqa = by[("piqa", "acc_norm")]
    assert piqa.n_samples == 6 and len(piqa.per_sample) == 6
    assert piqa.value == pytest.approx(sum(piqa.per_sample) / 6)
    ppl = by[("wikitext2", "ppl")]
    assert math.log(ppl.value) == pytest.approx(by[("wikitext2", "nll")].value)
    assert ppl.n_samples == 6 * 127  # eval.limit=6: the first 6 of the 8 windows (issue 22)

    base = smoke(model_dir, tmp_path, "bits=16")
    assert run_and_record(base, cache) == "ok"  # reuses the cached, restored model
    rows16 = records_from_table(read_cell(cell_path(tmp_path, "adhoc", cell_id(base))))
    r16 = {(r.task, r.metric): r for r in rows16}
    assert (rows16[0].method, rows16[0].dtype_family, rows16[0].quantized_modules) == (
        "none",
        "none",
        [],
    )
    assert rows16[0].bits_per_param == 16.0 and rows16[0].load_s == 0.0
    text = load_text("wikitext2", data_root=data_root)
    want = perplexity(loaded.model, loaded.tokenizer, text, seqlen=128, max_tokens=6 * 128)
    assert r16[("wikitext2", "ppl")].value == pytest.approx(want, rel=1e-6)
    assert r16[("wikitext2", "ppl")].value != ppl.value
    assert run_and_record(base, cache) == "skipped"


def test_failure_mid_cell_writes_one_failed_record(model_dir, tmp_path, monkeypatch):
    from harness.run import execute as run

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(run, "evaluate_rows", boom)
    cfg = smoke(model_dir, tmp_path, "bits=3")
    assert run.run_and_record(cfg) == "failed"
    rows = records_from_table(read_cell(cell_path(tmp_path, "adhoc", run.cell_id(cfg))))
    assert len(rows) == 1
    assert rows[0].status == "failed" and "RuntimeError: CUDA out of memory" in rows[0].error
    assert rows[0].task is None and rows[0].bits == 3
