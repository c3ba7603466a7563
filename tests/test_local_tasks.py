"""Local tasks are one YAML file each, in lm-eval's task format (plus a ``kbit:`` block).

A task added as one file (and its data) is listed, validated before any model loads, and asks
lm-eval exactly what lm-eval's own loader makes of the same definition; a broken file fails in
one line naming the file and the field; kbit's reader of lm-eval's task files agrees with
lm-eval's own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from harness.evaluate import task_definitions
from harness.evaluate.tasks import (
    TaskDefinitionError,
    check_files,
    check_task_names,
    definitions_dir,
    lm_eval_tasks_dir,
    load_definition,
    local_task,
    local_task_names,
    materialize,
    task_cost,
    yaml_config,
)

QUESTIONS = [
    {"query": "The sky on a clear day is", "choices": ["blue", "green", "loud"], "gold": 0},
    {"query": "Ice is water that is", "choices": ["boiling", "frozen"], "gold": 1},
    {"query": "A week has seven", "choices": ["days", "years", "cats", "hours"], "gold": 0},
]
# The lm-eval part of the new task: lm-eval's own format, nothing kbit-specific.
MY_MC = {
    "task": "my_mc",
    "dataset_path": "json",
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_target": "gold",
    "doc_to_choice": "choices",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}
MY_MC_YAML = """\
task: my_mc
dataset_path: json
test_split: test
output_type: multiple_choice
doc_to_text: !function test_local_tasks.question_text
doc_to_target: gold
doc_to_choice: choices
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
kbit:
  root: data
  files: [eval/my_mc/test.jsonl]
  schema: {query: str, choices: list, gold: int}
  label: {field: gold, choices: choices}
  pairs: harness.evaluate.task_formats.query_pairs
  cost: {examples: 3, tokens_per_example: 40}
"""


def question_text(doc: dict) -> str:
    """The new task's prompt, a function named by ``!function`` (lm-eval imports it)."""
    return f"Q: {doc['query']}\nA:"


@pytest.fixture
def with_my_mc(tmp_path, monkeypatch):
    """(definitions folder, data root): kbit's shipped definitions plus ``my_mc.yaml``."""
    folder = tmp_path / "defs"
    shutil.copytree(definitions_dir(), folder)
    (folder / "my_mc.yaml").write_text(MY_MC_YAML, encoding="utf-8")
    root = tmp_path / "data"
    (root / "eval/my_mc").mkdir(parents=True)
    lines = "".join(json.dumps(q) + "\n" for q in QUESTIONS)
    (root / "eval/my_mc/test.jsonl").write_text(lines, encoding="utf-8")
    monkeypatch.setattr(task_definitions, "definitions_dir", lambda: folder)
    monkeypatch.setenv("KBIT_CACHE_DIR", str(tmp_path / "cache"))
    return folder, root


def _requests(task) -> list[tuple]:
    task.build_all_requests()
    out = [(i.doc_id, i.idx, i.arguments) for i in task.instances]
    return out + [("gold", k, task.doc_to_target(d)) for k, d in enumerate(task.eval_docs)]


def _lm_eval_task(folder: Path, config: dict):
    """lm-eval's own reading of ``config`` (its TaskManager on a folder holding it)."""
    from lm_eval.tasks import TaskManager

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{config['task']}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return manager.load([config["task"]])["tasks"][config["task"]]


def test_a_task_added_as_one_file_asks_what_lm_eval_asks(with_my_mc, tmp_path):
    _, root = with_my_mc
    assert "my_mc" in local_task_names() and "piqa" in local_task_names()
    check_task_names(["my_mc", "piqa"], root, None)  # known without any code change
    check_files(["my_mc"], root, None)
    assert task_cost("my_mc") == (3, 40) and local_task("my_mc").split == "test"

    from lm_eval.tasks import TaskManager

    out = materialize(["my_mc"], root, out_dir=tmp_path / "tasks")
    ours = TaskManager(include_path=str(out), include_defaults=False).load(["my_mc"])
    ours = ours["tasks"]["my_mc"]
    # The reference: the same definition written by hand, its prompt as a template.
    data = str((root / "eval/my_mc/test.jsonl").resolve())
    reference = _lm_eval_task(tmp_path / "ref", {**MY_MC, "doc_to_text": "Q: {{query}}\nA:",
                                                 "dataset_kwargs": {"data_files": {"test": data}}})  # fmt: skip
    assert _requests(ours) == _requests(reference)
    assert len(ours.eval_docs) == 3 and ours.doc_to_text(QUESTIONS[1]) == question_text(
        QUESTIONS[1]
    )


def test_a_new_task_file_is_validated_before_a_model_loads(with_my_mc):
    _, root = with_my_mc
    data = root / "eval/my_mc/test.jsonl"
    data.write_text(data.read_text() + json.dumps({**QUESTIONS[0], "gold": 3}) + "\n")
    with pytest.raises(ValueError) as err:
        check_files(["my_mc"], root, None)
    assert str(err.value).startswith(f"{data}:4: field 'gold': label 3 is not one of the 3")


def test_an_edited_or_removed_definition_is_read_again(with_my_mc):
    folder, _ = with_my_mc
    assert task_cost("my_mc") == (3, 40)
    text = MY_MC_YAML.replace("examples: 3,", "examples: 30,")
    (folder / "my_mc.yaml").write_text(text, encoding="utf-8")
    assert task_cost("my_mc") == (30, 40)
    (folder / "my_mc.yaml").unlink()
    assert "my_mc" not in local_task_names() and task_cost("my_mc") is None


def test_a_users_task_folder_adds_tasks_and_a_name_defined_twice_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "my_mc.yaml").write_text(MY_MC_YAML, encoding="utf-8")
    monkeypatch.setenv("KBIT_TASK_DIR", str(folder))
    assert "my_mc" in local_task_names() and local_task("my_mc").path == folder / "my_mc.yaml"
    monkeypatch.delenv("KBIT_TASK_DIR")
    assert "my_mc" not in local_task_names()
    monkeypatch.setattr(task_definitions, "_PLUGIN_DIRS", [])
    task_definitions.register_task_dir(folder)  # a plugin's folder
    assert "my_mc" in local_task_names()
    shutil.copy(definitions_dir() / "piqa.yaml", folder / "piqa.yaml")
    with pytest.raises(TaskDefinitionError) as err:
        local_task("piqa")
    message = str(err.value)
    assert "task 'piqa' is also defined in" in message
    assert str(folder / "piqa.yaml") in message and str(definitions_dir() / "piqa.yaml") in message


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (("  root: data\n", "  root: data\n  colour: red\n"), "kbit.colour: unknown; allowed"),
        (("  files: [eval/my_mc/test.jsonl]\n", ""), "kbit.files: missing; allowed"),
        (("root: data", "root: disk"), "kbit.root='disk': allowed: data, model"),
        (("gold: int}", "gold: integer}"), "kbit.schema.gold='integer': allowed: one of"),
        (("task_formats.query_pairs", "task_formats.no_such"), "kbit.pairs='harness.evaluate"),
        (("test_split: test\n", ""), "none of ['test_split', 'validation_split'] is set"),
        (("cost: {examples: 3,", "cost: {examples: -3,"), "kbit.cost={'examples': -3"),
        (("label: {field: gold, ", "label: {name: gold, "), "kbit.label={'name': 'gold'"),
    ],
)  # fmt: skip
def test_a_broken_definition_is_one_line_naming_file_and_field(tmp_path, edit, problem):
    path = tmp_path / "my_mc.yaml"
    assert edit[0] in MY_MC_YAML
    path.write_text(MY_MC_YAML.replace(*edit), encoding="utf-8")
    with pytest.raises(TaskDefinitionError) as err:
        load_definition(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def test_the_shipped_definitions_declare_what_their_data_holds(data_root):
    """``kbit.cost``'s examples are the documents in the files (counted here, independently)."""
    for name in local_task_names():
        task = local_task(name)
        assert task.path is not None and task.path.name == f"{name}.yaml"
        if task.cost is None:
            continue
        lines = (data_root / task.files[0]).read_text(encoding="utf-8").splitlines()
        assert task.cost[0] == sum(1 for line in lines if line.strip()), name


def test_yaml_config_reads_lm_evals_task_files_as_lm_eval_does():
    """kbit's reader (includes merged, functions unresolved) against lm-eval's own, on every
    built-in the local tasks include and every 25th task file of lm-eval."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # the reference, private to lm-eval
    except ImportError:
        pytest.skip("this lm-eval has no lm_eval.tasks._yaml_loader to compare with")
    root = lm_eval_tasks_dir()
    files = {root / local_task(n).builtin for n in local_task_names() if local_task(n).builtin}
    files |= set(sorted(root.rglob("*.yaml"))[::25])
    compared = 0
    for path in sorted(files):
        try:
            want = load_yaml(path, resolve_func=False)
        except Exception:  # lm-eval cannot read it on its own either (a template fragment)
            continue
        assert yaml_config(path) == want, path
        compared += 1
    assert compared > 100
