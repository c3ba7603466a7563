"""kbit's local lm-eval tasks: lm-eval's own task definitions, reading local files.

Each local task is one YAML file in ``harness/evaluate/local_tasks/``, in lm-eval's task format
(:mod:`harness.evaluate.task_definitions`). Each of the paper's tasks (lambada_openai, piqa,
hellaswag, winogrande, arc_easy, arc_challenge) is lm-eval's built-in task *itself*: its file
``include``-s the built-in from the installed ``lm_eval/tasks/`` (with its ``process_docs`` /
``doc_to_*`` functions) and only the data source changes (``dataset_path: json`` + the local
file as the evaluation split). Where the shared files differ from the hub's document format
(PIQA's separate label file, WinoGrande's partial-scoring form, ARC's ``{query, choices,
gold}``) they are converted into the hub format, and the conversion is checked by round trip:
lm-eval's own task object, applied to each converted document, must give back the stored
strings exactly.

:func:`materialize` writes the task YAMLs (and the converted jsonl) into a cache folder; that
folder is what kbit passes to ``TaskManager(include_path=...)`` and what the ``lm_eval`` command
line takes as ``--include_path``::

    python -m harness.evaluate --data-root ../shared/data --out /tmp/kbit_tasks [--plain]

Two forms. ``plain=True``: the definition with only the data source filled in. The default
(fast) form also precomputes the prompts of tasks whose ``doc_to_*`` are Jinja templates
(``kbit.precompute``) into columns, computed once per folder by lm-eval's own task object on
the plain form: lm-eval compiles a template per document on every evaluation, which cost more
than the forward passes of a small model. tests/test_tasks_equal.py requires both forms to give
lm-eval's requests exactly.

The zoo tasks (``zoo_mc``, ``zoo_lastword``) are kbit's own, defined whole in their files, and
read the model folder.

The task catalogue (names, files, lm-eval built-ins) is :mod:`harness.evaluate.task_catalog`;
checking the files and their provenance is :mod:`harness.evaluate.task_data`. Their public
names are importable from here too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from harness.evaluate.task_catalog import (
    ADAPTER_VERSION,
    LOCAL_TASKS,
    TASKS_VERSION,
    LocalTask,
    TaskDefinitionError,
    builtin_config,
    builtin_task_names,
    cache_root,
    check_task_names,
    definitions_dir,
    dump_yaml,
    is_local,
    lm_eval_tasks_dir,
    lm_eval_version,
    load_definition,
    local_task,
    local_task_names,
    read_jsonl,
    register_task_dir,
    task_cost,
    task_dirs,
    task_files,
    task_root,
    task_version,
    unknown_task_error,
    yaml_config,
)
from harness.evaluate.task_data import (
    ContextFit,
    TaskSource,
    check_context,
    check_files,
    context_fit,
    file_sha256,
    file_stamp,
    hub_source,
    local_source,
    model_max_length,
    task_sources,
)
from harness.files import atomic_write

__all__ = [
    "ADAPTER_VERSION",
    "LOCAL_TASKS",
    "PROMPT_COLUMNS",
    "TASKS_VERSION",
    "ContextFit",
    "LocalTask",
    "TaskDefinitionError",
    "TaskSource",
    "builtin_config",
    "builtin_task_names",
    "check_context",
    "check_files",
    "check_task_names",
    "context_fit",
    "definitions_dir",
    "dump_yaml",
    "file_sha256",
    "hub_docs",
    "hub_source",
    "is_local",
    "lm_eval_tasks_dir",
    "load_definition",
    "local_source",
    "local_task",
    "local_task_names",
    "main",
    "materialize",
    "model_max_length",
    "register_task_dir",
    "task_cost",
    "task_dirs",
    "task_files",
    "task_root",
    "task_sources",
    "task_version",
    "unknown_task_error",
    "yaml_config",
]

log = logging.getLogger(__name__)
PROMPT_COLUMNS = {"doc_to_text": "kbit_text", "doc_to_target": "kbit_target",
                  "doc_to_choice": "kbit_choices"}  # fmt: skip


# ---------------------------------------------------------------------------- materializing
def _check_round_trip(task: LocalTask, source: Path, stored: list[dict], docs: list[dict]) -> None:
    """lm-eval's own doc_to_* on each converted document must give the stored strings back.

    The functions are those of lm-eval's task object, built by its ``TaskManager`` from the
    plain form over the converted documents: its templates, ``!function``s and conversions.
    """
    if task.expect is None:
        return
    with tempfile.TemporaryDirectory(prefix="kbit-check-") as tmp:
        data_file = Path(tmp) / f"{task.name}.hub.jsonl"
        atomic_write(data_file, _jsonl_text(docs))
        lm_task = _lm_eval_task(Path(tmp), task, _plain_yaml(task, data_file))
        with _templates_compiled_once():
            for number, (row, doc) in enumerate(zip(stored, docs, strict=True), 1):
                for key, want in task.expect(row).items():
                    got = getattr(lm_task, key)(doc)
                    if got != want:
                        raise ValueError(f"{source} document {number}: converted {key} gives "
                                         f"{got!r}, stored {want!r}")  # fmt: skip


def hub_docs(
    name: str, data_root: str | os.PathLike | None, model_dir: str | os.PathLike | None = None
) -> list[dict]:
    """The local documents of a built-in-based task in the hub's format (round-trip checked)."""
    files = [f.resolve() for f in task_files([name], data_root, model_dir)]
    return _hub_docs(local_task(name), files)


def _hub_docs(task: LocalTask, files: list[Path]) -> list[dict]:
    if task.convert is None:
        return read_jsonl(files[0])
    docs = task.convert(files)
    _check_round_trip(task, files[0], read_jsonl(files[0]), docs)
    return docs


def _jsonl_text(docs: Iterable[dict]) -> str:
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)


def _plain_yaml(task: LocalTask, data_file: Path) -> dict:
    """The task's definition as lm-eval reads it: its ``include`` resolved under lm-eval's
    tasks folder, the local file as the evaluation split, the ``kbit:`` block left out."""
    config = dict(task.config)
    if task.builtin is not None:
        config["include"] = str(lm_eval_tasks_dir() / task.builtin)
    kwargs = dict(config.get("dataset_kwargs") or {})
    config["dataset_kwargs"] = {**kwargs, "data_files": {task.split: str(data_file)}}
    if task.builtin is None:
        config["metadata"] = {**(config.get("metadata") or {}), "version": task_version(task)}
    return config


@contextlib.contextmanager
def _templates_compiled_once() -> Iterator[None]:
    """lm-eval's ``apply_template`` with each template compiled once, not once per document.

    The one place kbit replaces an lm-eval function. Why: lm-eval compiles a Jinja template
    per document and call (``lm_eval.utils.apply_template``, no cache, no setting to add one),
    which made precomputing a folder's prompts ~3x slower. Same environment
    (``lm_eval.utils.env``), same template text, so the same strings (tests/test_tasks_equal.py
    compares with lm-eval unpatched); the original comes back on exit. An lm-eval without
    these names is left as it is.
    """
    import lm_eval.utils as lm_utils

    original = getattr(lm_utils, "apply_template", None)
    env = getattr(lm_utils, "env", None)
    if original is None or env is None:
        yield
        return
    compiled = functools.lru_cache(maxsize=64)(env.from_string)
    lm_utils.apply_template = lambda template, doc: compiled(template).render(**doc)
    try:
        yield
    finally:
        lm_utils.apply_template = original


def _lm_eval_task(folder: Path, task: LocalTask, config: dict):
    """lm-eval's task object for ``config``, written into ``folder`` and loaded by its public
    ``TaskManager(include_path=...)``."""
    from lm_eval.tasks import TaskManager

    atomic_write(folder / f"{task.name}.yaml", dump_yaml(config))
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return manager.load([task.name])["tasks"][task.name]


def _precomputed_docs(task: LocalTask, plain_yaml: dict) -> list[dict]:
    """Each evaluation document (after lm-eval's process_docs) with lm-eval's prompts in columns.

    The values come from lm-eval's own task object built from the plain form, so they are its
    ``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` results exactly.
    """
    with tempfile.TemporaryDirectory(prefix="kbit-plain-") as tmp, _templates_compiled_once():
        lm_task = _lm_eval_task(Path(tmp), task, plain_yaml)
        multiple_choice = lm_task.config.output_type == "multiple_choice"
        out = []
        for doc in lm_task.eval_docs:
            row = {**doc, "kbit_text": lm_task.doc_to_text(doc),
                   "kbit_target": lm_task.doc_to_target(doc)}  # fmt: skip
            if multiple_choice:
                row["kbit_choices"] = lm_task.doc_to_choice(doc)
            out.append(row)
        return out


def _fast_yaml(task: LocalTask, data_file: Path, choices: bool) -> dict:
    base = builtin_config(task)
    columns = {k: v for k, v in PROMPT_COLUMNS.items() if choices or k != "doc_to_choice"}
    return {
        **_plain_yaml(task, data_file),
        "process_docs": None,  # the documents are already processed
        **columns,
        "metadata": {**(base.get("metadata") or {}), "version": task_version(task)},
    }


def _write_task(task: LocalTask, files: list[Path], out: Path, plain: bool) -> None:
    """Write one task's YAML (and its converted documents) into ``out``."""
    data_file = files[0]
    if task.convert is not None:
        suffix = ".hub.jsonl" if task.builtin is not None else ".jsonl"
        data_file = out / f"{task.name}{suffix}"
        atomic_write(data_file, _jsonl_text(_hub_docs(task, files)), skip_same=True)
    config = _plain_yaml(task, data_file)
    if task.builtin is not None and task.precompute and not plain:
        docs = _precomputed_docs(task, config)
        fast_file = out / f"{task.name}.prompts.jsonl"
        atomic_write(fast_file, _jsonl_text(docs), skip_same=True)
        config = _fast_yaml(task, fast_file, "kbit_choices" in docs[0])
    atomic_write(out / f"{task.name}.yaml", dump_yaml(config), skip_same=True)


_MANIFEST = "kbit_manifest.json"


def _manifest(out: Path) -> dict:
    try:
        return json.loads((out / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def materialize(
    names: list[str],
    data_root: str | os.PathLike | None = None,
    model_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    plain: bool = False,
) -> Path:
    """Write task YAMLs (+ converted data) for ``names``; returns the folder (an include_path).

    ``plain``: lm-eval's definitions with only the data source changed (no precomputed
    prompts). The default folder is a cache keyed by the task version, lm-eval's version, the
    roots, the form and the names, so concurrent cells of a sweep share it; a task whose source
    files (path, size, mtime) are unchanged since it was written is not written again. A zoo
    task (files in the model folder) with an example longer than the context of the model in
    ``model_dir`` is refused (:func:`check_context`; the runner's validation checks every local
    task, under ``eval.limit``): never scored cut.
    """
    check_files(names, data_root, model_dir)
    check_context(names, data_root, model_dir, roots=("model",))
    if out_dir is None:
        key = json.dumps([TASKS_VERSION, lm_eval_version(), str(lm_eval_tasks_dir()),
                          str(data_root), str(model_dir), plain, sorted(names)])  # fmt: skip
        out_dir = cache_root() / hashlib.sha256(key.encode()).hexdigest()[:16]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(out)
    for name in names:
        task = local_task(name)
        files = [f.resolve() for f in task_files([name], data_root, model_dir)]
        stamp = [[*file_stamp(f)] for f in files] + [[TASKS_VERSION, lm_eval_version(), plain]]
        if task.path is not None:  # an edited definition is written again
            stamp.append([*file_stamp(task.path)])
        if manifest.get(name) == stamp and (out / f"{name}.yaml").is_file():
            continue
        _write_task(task, files, out, plain)
        manifest = {**_manifest(out), name: stamp}
        atomic_write(out / _MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: materialize local tasks into a folder for ``lm_eval --include_path``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("KBIT_DATA_ROOT"))
    parser.add_argument("--model-dir", default=None, help="model folder, for zoo_* tasks")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tasks", default=None, help="comma-separated; default: all available")
    parser.add_argument("--plain", action="store_true",
                        help="lm-eval's definitions with only the data source changed")  # fmt: skip
    args = parser.parse_args(argv)
    if args.tasks:
        names = args.tasks.split(",")
    else:
        names = [
            n
            for n, t in LOCAL_TASKS.items()
            if (args.model_dir if t.root == "model" else args.data_root)
        ]
    logging.basicConfig(level=logging.INFO)
    out = materialize(names, args.data_root, args.model_dir, args.out, plain=args.plain)
    log.info("wrote %d task(s) to %s", len(names), out)


if __name__ == "__main__":
    main()
