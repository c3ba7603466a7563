"""Local task files: bad data caught before any model loads, provenance, unknown names."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from harness.evaluate import task_catalog, task_data, tasks
from harness.evaluate.tasks import (
    LOCAL_TASKS,
    TaskSource,
    builtin_task_names,
    check_files,
    check_task_names,
    hub_docs,
    task_sources,
)


@pytest.fixture
def wino_root(data_root, tmp_path):
    """A data root with a copy of WinoGrande's dev file, free to break."""
    (tmp_path / "eval/winogrande").mkdir(parents=True)
    shutil.copy(data_root / "eval/winogrande/dev.jsonl", tmp_path / "eval/winogrande/dev.jsonl")
    return tmp_path


def _set_line(path, number: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[number - 1] = text + "\n"
    path.write_text("".join(lines), encoding="utf-8")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a JSON list, not an object"),
        ('{"context_options": ["a", "b"], "gold": 0}', "field 'continuation' is missing"),
        ('{"context_options": ["a", "b"], "continuation": 3, "gold": 0}',
         "field 'continuation' is a int, not str"),
    ],
)  # fmt: skip
def test_an_invalid_line_is_named_with_file_and_line_number(wino_root, line, problem):
    path = wino_root / "eval/winogrande/dev.jsonl"
    _set_line(path, 17, line)
    with pytest.raises(ValueError) as err:
        check_files(["winogrande"], wino_root, None)
    message = str(err.value)
    assert message.startswith(f"{path}:17: {problem}") and "\n" not in message


def test_an_empty_file_and_a_label_count_mismatch_fail_clearly(data_root, tmp_path):
    (tmp_path / "eval/piqa").mkdir(parents=True)
    (tmp_path / "eval/piqa/valid.jsonl").write_text("")
    (tmp_path / "eval/piqa/valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match=r"valid\.jsonl: empty file"):
        check_files(["piqa"], tmp_path, None)
    shutil.copy(data_root / "eval/piqa/valid.jsonl", tmp_path / "eval/piqa/valid.jsonl")
    with pytest.raises(ValueError, match="disagree on the number of documents: 1838 in"):
        check_files(["piqa"], tmp_path, None)


def test_the_verdict_is_cached_per_file_version(wino_root, monkeypatch):
    calls = []
    original = task_data._check_jsonl
    monkeypatch.setattr(task_data, "_check_jsonl", lambda *a: calls.append(1) or original(*a))
    check_files(["winogrande"], wino_root, None)
    check_files(["winogrande"], wino_root, None)
    assert len(calls) == 1
    path = wino_root / "eval/winogrande/dev.jsonl"
    _set_line(path, 3, "oops")
    with pytest.raises(ValueError, match=r"dev\.jsonl:3: not valid JSON"):
        check_files(["winogrande"], wino_root, None)


def test_conversions_round_trip_through_lm_eval_functions(data_root):
    """hub_docs checks every converted document against the stored strings (raises if not)."""
    assert len(hub_docs("winogrande", data_root)) == 1267
    assert len(hub_docs("arc_easy", data_root)) == 2376
    assert len(hub_docs("arc_challenge", data_root)) == 1172


def test_a_conversion_that_does_not_round_trip_is_refused(wino_root):
    # A blank-like "_" before the option: lm-eval's doc_to_target would cut at the wrong "_".
    row = {"context_options": ["snake_case a", "snake_case b"], "continuation": "z", "gold": 0}
    _set_line(wino_root / "eval/winogrande/dev.jsonl", 2, json.dumps(row))
    with pytest.raises(ValueError, match=r"dev\.jsonl document 2: converted doc_to_target"):
        hub_docs("winogrande", wino_root)


def test_task_sources_hash_local_files_once(data_root, monkeypatch):
    task_data._HASHES.clear()
    opened = []
    real_sha = hashlib.sha256
    monkeypatch.setattr(tasks.hashlib, "sha256", lambda *a: opened.append(1) or real_sha(*a))
    names = ["piqa", "winogrande"]
    first = task_sources(names, data_root, None)
    for _ in range(3):
        assert task_sources(names, data_root, None) == first
    assert len(opened) == 3  # piqa's two files + winogrande's one, each hashed once
    piqa = first["piqa"]
    files = [(data_root / f).resolve() for f in LOCAL_TASKS["piqa"].files]
    want = "+".join(f"local:{f};sha256={real_sha(f.read_bytes()).hexdigest()}" for f in files)
    assert piqa == TaskSource(want, f"1.0+kbit{tasks.TASKS_VERSION}")


def test_task_sources_of_hub_tasks_name_dataset_and_revision():
    got = task_sources(["arc_easy", "lambada_openai", "hellaswag"], None, None)
    assert got["arc_easy"] == TaskSource("hub:allenai/ai2_arc/ARC-Easy@unpinned", "1.0")
    assert got["lambada_openai"].source == "hub:EleutherAI/lambada_openai/default@unpinned"
    assert got["hellaswag"].source == "hub:Rowan/hellaswag@unpinned"


def test_builtin_names_are_fast_and_match_lm_eval(monkeypatch, tmp_path):
    monkeypatch.setenv("KBIT_CACHE_DIR", str(tmp_path))
    task_catalog.builtin_index.cache_clear()
    scanned = builtin_task_names()  # a fresh cache: the regex scan of lm-eval's YAMLs
    assert list((tmp_path / "tasks").glob("builtin-*.json"))  # written to the disk cache
    task_catalog.builtin_index.cache_clear()

    def no_scan(root):
        raise AssertionError("scanned again although the disk cache holds the index")

    monkeypatch.setattr(task_catalog, "_scan_builtins", no_scan)
    names = builtin_task_names()  # a new process: the disk cache (speed: not a unit test's job)
    assert names == scanned and len(names) > 10000
    assert {"hellaswag", "arc_easy", "mmlu", "ai2_arc", "lambada", "winogrande"} <= names
    assert task_catalog.builtin_index()[0]["arc_easy"].name == "arc_easy.yaml"


def test_an_unknown_task_name_is_one_short_line_with_a_suggestion(data_root):
    task_catalog.builtin_index.cache_clear()
    with pytest.raises(ValueError) as err:
        check_task_names(["piqa", "helaswag"], data_root, None)
    message = str(err.value)
    assert "did you mean 'hellaswag'" in message
    assert len(message) < 500 and "\n" not in message
    check_task_names(["hellaswag", "mmlu", "piqa"], data_root, None)  # known names pass
    with pytest.raises(ValueError, match="needs a local model folder"):
        check_task_names(["zoo_mc"], data_root, None)
