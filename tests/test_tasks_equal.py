"""kbit's local tasks ask exactly lm-eval's questions.

The reference is lm-eval's built-in task, loaded by its own ``TaskManager`` from its own YAML
(``process_docs`` and ``doc_to_*`` functions included), with only the dataset replaced by the
same documents in the hub's format (the hub is offline). Every request string (contexts and
continuations) and the gold index must be identical, for both materialized forms: ``plain``
(the built-in with only the data source changed) and the default one with precomputed prompts.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from harness.evaluate.tasks import LOCAL_TASKS, hub_docs, materialize

PAPER_TASKS = ["lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge"]
EVERY = 7  # a subset of the documents keeps this fast enough for CI


def builtin_task(name: str, docs: list[dict], monkeypatch: pytest.MonkeyPatch):
    """lm-eval's own task ``name``, its dataset replaced by ``docs`` (hub format), offline."""
    import datasets
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    folder = Path(lm_eval.tasks.__file__).parent / Path(LOCAL_TASKS[name].builtin).parent

    def load_dataset(path, name=None, **kwargs):
        rows = datasets.Dataset.from_list(docs)
        return datasets.DatasetDict({s: rows for s in ("train", "validation", "test")})

    with monkeypatch.context() as patch:
        patch.setattr(datasets, "load_dataset", load_dataset)
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        return manager.load([name])["tasks"][name]


def local_task(name: str, folder: Path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False).load([name])["tasks"][name]


def requests(task) -> list[tuple]:
    """(doc id, request index, request arguments) of every request, plus each doc's gold."""
    task.build_all_requests()
    out = [(i.doc_id, i.idx, i.arguments) for i in task.instances]
    if task.config.output_type == "multiple_choice":
        out += [("gold", k, task.doc_to_target(d)) for k, d in enumerate(task.eval_docs)]
    return out


@pytest.fixture(scope="module")
def subset_root(data_root, tmp_path_factory) -> Path:
    """A data root holding every EVERY-th line of each paper task's files (labels included)."""
    root = tmp_path_factory.mktemp("subset")
    for task in PAPER_TASKS:
        for rel in LOCAL_TASKS[task].files:
            lines = (data_root / rel).read_text(encoding="utf-8").splitlines(keepends=True)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("".join(lines[::EVERY]), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def folders(subset_root, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tasks")
    return {
        "fast": materialize(PAPER_TASKS, subset_root, out_dir=out / "fast"),
        "plain": materialize(PAPER_TASKS, subset_root, out_dir=out / "plain", plain=True),
    }


@pytest.mark.parametrize("form", ["fast", "plain"])
@pytest.mark.parametrize("name", PAPER_TASKS)
def test_local_task_requests_equal_lm_eval_builtin(name, form, folders, subset_root, monkeypatch):
    ours = local_task(name, folders[form])
    reference = builtin_task(name, hub_docs(name, subset_root), monkeypatch)
    assert len(ours.eval_docs) == len(reference.eval_docs) > 150
    got, want = requests(ours), requests(reference)
    assert got == want


def test_hellaswag_prompts_capitalise_ctx_b_like_lm_eval(folders):
    """The old local prompt kept ctx_b lower case (~3,200 of 10,042 prompts differed)."""
    rows = [json.loads(x) for x in (folders["fast"] / "hellaswag.prompts.jsonl").open()]
    with_b = [r for r in rows if r["ctx_b"]]
    assert len(with_b) > 3000 // EVERY
    assert all(r["ctx_b"].capitalize() in r["kbit_text"] for r in with_b)


def test_plain_yaml_is_the_builtin_with_only_the_data_source_changed(folders):
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    for name in PAPER_TASKS:
        plain = yaml.safe_load((folders["plain"] / f"{name}.yaml").read_text())
        changed = set(plain) - {"include", "task"}
        assert changed <= {"dataset_path", "dataset_name", "dataset_kwargs", "training_split",
                           "validation_split", "test_split", "tag"}, name  # fmt: skip
        assert load_yaml(plain["include"], resolve_func=False)["task"] == name


# ------------------------------------------------------------------- a model, both ways (slow)
def _tiny_neox(folder: Path, data_root: Path) -> Path:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(data_root / "tokenizers/gpt-neox-20b.json"),
                                  bos_token="<|endoftext|>", eos_token="<|endoftext|>")  # fmt: skip
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=2048, bos_token_id=0, eos_token_id=0)  # fmt: skip
    GPTNeoXForCausalLM(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _cli_samples(output: Path, name: str) -> list[dict]:
    files = sorted(output.rglob(f"samples_{name}_*.jsonl"))
    assert files, f"no samples for {name} under {output}"
    rows = [json.loads(line) for line in files[-1].read_text(encoding="utf-8").splitlines()]
    return sorted(rows, key=lambda r: r["doc_id"])


def _arguments(sample: dict) -> list[list[str]]:
    """Request arguments, in process (tuples) or as lm-eval's logger writes them (dicts)."""
    args = sample["arguments"]
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}}
        return [[a[f"arg_{j}"] for j in range(len(a))] for a in args.values()]
    return [list(a) for a in args]


def _loglikelihoods(sample: dict) -> list[float]:
    return [float(r[0]) for r in sample["filtered_resps"]]


@pytest.mark.slow
def test_evaluate_zeroshot_equals_the_lm_eval_command_line(data_root, tmp_path, monkeypatch):
    """Same model, same documents: kbit in process vs ``python -m lm_eval`` on lm-eval's own
    task definitions with only the data source changed; per-sample results must be equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.evaluate import zeroshot

    monkeypatch.setenv("KBIT_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = _tiny_neox(tmp_path / "model", data_root)
    plain = materialize(PAPER_TASKS, data_root, out_dir=tmp_path / "plain", plain=True)
    limit = 20
    output = tmp_path / "out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={model_dir},dtype=float32,softmax_dtype=float32", "--device", "cpu",
           "--tasks", ",".join(PAPER_TASKS), "--include_path", str(plain), "--limit", str(limit),
           "--batch_size", "4", "--log_samples", "--output_path", str(output)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    captured = {}
    original = zeroshot._task_result

    def keep_samples(name, results):
        captured[name] = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        return original(name, results)

    monkeypatch.setattr(zeroshot, "_task_result", keep_samples)
    ours = zeroshot.evaluate_zeroshot(model, tok, PAPER_TASKS, data_root=data_root,
                                      limit=limit, batch_size=4)  # fmt: skip
    for name in PAPER_TASKS:
        cli = _cli_samples(output, name)
        assert len(cli) == len(captured[name]) == limit == ours.tasks[name].n, name
        assert ours.tasks[name].nonfinite == 0
        for theirs, mine in zip(cli, captured[name], strict=True):
            assert _arguments(mine) == _arguments(theirs)
            assert str(mine["target"]) == str(theirs["target"])
            for metric in ("acc", "acc_norm"):
                if metric in theirs:
                    assert float(mine[metric]) == float(theirs[metric]), (name, metric)
            a, b = _loglikelihoods(mine), _loglikelihoods(theirs)
            assert all(
                math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-4) for x, y in zip(a, b, strict=True)
            )
