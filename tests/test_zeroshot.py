"""Zero-shot through lm-eval on the in-memory model, and kbit's local task definitions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_models_tiny import tiny_model

from harness.evaluate.tasks import LOCAL_TASKS, materialize
from harness.evaluate.zeroshot import evaluate_zeroshot, mean_accuracy


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_materialized_tasks_join_labels_and_resolve_paths(data_root, tmp_path):
    out = materialize(["piqa", "hellaswag", "winogrande"], data_root, out_dir=tmp_path, plain=True)
    piqa = yaml.safe_load((out / "piqa.yaml").read_text())
    assert piqa["task"] == "piqa" and piqa["dataset_path"] == "json"
    docs = _jsonl(piqa["dataset_kwargs"]["data_files"]["validation"])
    labels = (data_root / "eval/piqa/valid-labels.lst").read_text().split()
    assert len(docs) == len(labels) == 1838
    assert [d["label"] for d in docs] == [int(x) for x in labels]
    hs = yaml.safe_load((out / "hellaswag.yaml").read_text())
    assert hs["dataset_kwargs"]["data_files"]["validation"] == str(
        (data_root / "eval/hellaswag/validation.jsonl").resolve()
    )  # already in the hub's format: read as it is
    wino = _jsonl(out / "winogrande.hub.jsonl")
    assert len(wino) == 1267 and set(wino[0]) == {"sentence", "option1", "option2", "answer"}


def test_unknown_task_and_missing_files_fail_clearly(data_root, tmp_path):
    with pytest.raises(ValueError, match="did you mean 'winogrande'"):
        materialize(["winogrand"], data_root, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"piqa.*does not exist"):
        materialize(["piqa"], tmp_path, out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match=r"zoo_mc.*needs a local model folder"):
        materialize(["zoo_mc"], data_root, out_dir=tmp_path / "o")


def _loglik(model, tok, context: str, continuation: str) -> float:
    """Sum log p(continuation tokens | context), the way lm-eval splits the pair."""
    ctx = tok(context).input_ids
    whole = tok(context + continuation).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_piqa_matches_a_brute_force_loglikelihood_argmax(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("KBIT_CACHE_DIR", str(tmp_path))
    model, tok = tiny_model("llama")
    res = evaluate_zeroshot(model, tok, ["piqa"], data_root=data_root, limit=8, batch_size=4)
    piqa = res.tasks["piqa"]
    docs = _jsonl(data_root / "eval/piqa/valid.jsonl")[:8]
    labels = (data_root / "eval/piqa/valid-labels.lst").read_text().split()[:8]
    want = []
    for doc, label in zip(docs, labels, strict=True):
        context = f"Question: {doc['goal']}\nAnswer:"
        scores = [_loglik(model, tok, context, " " + doc[s]) for s in ("sol1", "sol2")]
        want.append(float(max(range(2), key=lambda i: scores[i]) == int(label)))
    assert piqa.n == 8
    assert piqa.per_sample["acc"] == want
    assert piqa.values["acc"] == pytest.approx(sum(want) / 8)
    assert piqa.stderr["acc"] is not None and res.forward_s > 0


def test_mean_accuracy_is_the_plain_mean():
    from harness.evaluate.zeroshot import TaskResult

    results = {
        "a": TaskResult("a", 10, {"acc": 0.5}, {"acc": 0.1}),
        "b": TaskResult("b", 30, {"acc": 0.8}, {"acc": 0.2}),
    }
    mean, stderr, n = mean_accuracy(results, ["a", "b"])
    assert mean == pytest.approx(0.65) and n == 40
    assert stderr == pytest.approx((0.1**2 + 0.2**2) ** 0.5 / 2)
    with pytest.raises(ValueError, match="not evaluated"):
        mean_accuracy(results, ["a", "c"])


def test_every_local_task_has_lm_eval_name_or_zoo_prefix():
    from harness.evaluate.tasks import builtin_task_names

    builtin = builtin_task_names()
    for name in LOCAL_TASKS:
        assert name in builtin or name.startswith("zoo_"), name


def test_reused_task_objects_give_the_results_of_a_fresh_build(data_root, tmp_path, monkeypatch):
    """Tasks are built once per process (speed); a later model must score as if built afresh."""
    from harness.evaluate import zeroshot

    monkeypatch.setenv("KBIT_CACHE_DIR", str(tmp_path))
    names = ["piqa", "lambada_openai", "winogrande"]
    first, tok = tiny_model("llama", seed=1)
    second, _ = tiny_model("llama", seed=2)
    kw = dict(data_root=data_root, limit=6, batch_size=4)
    zeroshot._TASK_CACHE.clear()
    evaluate_zeroshot(first, tok, names, **kw)
    _, objects = zeroshot.task_objects(names, data_root, None, 0)
    reused = evaluate_zeroshot(second, tok, names, **kw)
    assert zeroshot.task_objects(names, data_root, None, 0)[1] is objects  # really reused
    zeroshot._TASK_CACHE.clear()
    fresh = evaluate_zeroshot(second, tok, names, **kw)
    assert zeroshot.task_objects(names, data_root, None, 0)[1] is not objects
    for name in names:
        a, b = reused.tasks[name], fresh.tasks[name]
        assert (a.n, a.values, a.per_sample) == (b.n, b.values, b.per_sample), name
    assert evaluate_zeroshot(second, tok, ["piqa"], **{**kw, "limit": 3}).tasks["piqa"].n == 3


def test_a_changed_task_file_is_not_served_from_the_task_cache(data_root, tmp_path, monkeypatch):
    import shutil

    from harness.evaluate import zeroshot

    monkeypatch.setenv("KBIT_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "data"
    (root / "eval/winogrande").mkdir(parents=True)
    src = data_root / "eval/winogrande/dev.jsonl"
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    shutil.copy(src, root / "eval/winogrande/dev.jsonl")
    _, before = zeroshot.task_objects(["winogrande"], root, None, 0)
    (root / "eval/winogrande/dev.jsonl").write_text("".join(lines[:5]), encoding="utf-8")
    _, after = zeroshot.task_objects(["winogrande"], root, None, 0)
    assert after is not before
    assert len(after[0].eval_docs) == 5 < len(before[0].eval_docs)


# ---------------------------------------------------------------- non-finite and fp32 softmax
def nan_model():
    """A tiny GPT-NeoX whose final LayerNorm weight holds one NaN: every log-likelihood is NaN."""
    model, tok = tiny_model("gpt_neox")
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight[0] = float("nan")
    return model, tok


PAPER_TASKS = ["lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge"]


def test_nan_log_likelihoods_are_counted_for_every_task(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("KBIT_CACHE_DIR", str(tmp_path))
    kw = dict(data_root=data_root, limit=3, batch_size=4)
    broken = evaluate_zeroshot(*nan_model(), PAPER_TASKS, **kw)
    normal = evaluate_zeroshot(*tiny_model("gpt_neox"), PAPER_TASKS, **kw)
    for name in PAPER_TASKS:
        assert broken.tasks[name].n == 3
        assert broken.tasks[name].nonfinite > 0, name
        assert normal.tasks[name].nonfinite == 0, name


def test_count_nonfinite_reads_logged_responses():
    from harness.evaluate.zeroshot import count_nonfinite

    samples = [
        {"filtered_resps": [(-1.0, False), (float("nan"), False)]},
        {"filtered_resps": [(float("-inf"), True)], "resps": [[(float("-inf"), True)]]},
        {"resps": [[(-2.0, False)], [("nan", False)]]},
        {"filtered_resps": ["a generated answer"]},
    ]
    assert count_nonfinite(samples) == 3


def test_bfloat16_model_runs_log_softmax_in_float32(data_root, tmp_path, monkeypatch):
    from lm_eval.models import huggingface

    from harness.evaluate import zeroshot

    monkeypatch.setenv("KBIT_CACHE_DIR", str(tmp_path))
    model, tok = tiny_model("llama")
    model = model.to(torch.bfloat16)
    seen = []
    original = huggingface.HFLM._loglikelihood_tokens

    def spy(self, *args, **kwargs):
        seen.append(self.softmax_dtype)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(huggingface.HFLM, "_loglikelihood_tokens", spy)
    assert zeroshot.make_lm(model, tok).softmax_dtype == torch.float32
    res = evaluate_zeroshot(model, tok, ["piqa"], data_root=data_root, limit=2, batch_size=2)
    assert seen and set(seen) == {torch.float32}
    assert res.tasks["piqa"].nonfinite == 0


def test_in_process_bootstrap_equals_lm_evals_pool(monkeypatch):
    """kbit runs lm-eval's bootstrap in process (a forked pool hangs in submitit jobs); the
    stderr must be the one lm-eval's multiprocessing path gives."""
    import os
    import random

    from lm_eval.api.metrics import bootstrap_stderr, perplexity

    from harness.evaluate.zeroshot import _bootstrap_in_process

    rng = random.Random(3)
    xs = [rng.uniform(-4.0, -0.1) for _ in range(300)]
    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    pooled = bootstrap_stderr(perplexity, xs, 2000)
    with _bootstrap_in_process():
        in_process = bootstrap_stderr(perplexity, xs, 2000)
    assert "DISABLE_MULTIPROC" not in os.environ
    assert in_process == pooled
