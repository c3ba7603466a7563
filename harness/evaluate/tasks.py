"""kbit's local lm-eval tasks: lm-eval's own task definitions, reading local files.

Each of the paper's tasks (lambada_openai, piqa, hellaswag, winogrande, arc_easy,
arc_challenge) is lm-eval's built-in task *itself*: its YAML is ``include``-d from the installed
``lm_eval/tasks/`` (with its ``process_docs`` / ``doc_to_*`` functions) and only the data source
changes (``dataset_path: json`` + ``data_files`` pointing at a local jsonl, and the splits). Where
the shared files differ from the hub's document format (PIQA's separate label file,
WinoGrande's partial-scoring form, ARC's ``{query, choices, gold}``) they are converted into the
hub format, and the conversion is checked by round trip: lm-eval's own functions applied to each
converted document must give back the stored strings exactly.

:func:`materialize` writes the task YAMLs (and the converted jsonl) into a cache folder; that
folder is what kbit passes to ``TaskManager(include_path=...)`` and what the ``lm_eval`` command
line takes as ``--include_path``::

    python -m harness.evaluate --data-root ../shared/data --out /tmp/kbit_tasks [--plain]

Two forms. ``plain=True``: the built-in definition with only the data source changed. The
default (fast) form also precomputes the prompts of tasks whose ``doc_to_*`` are Jinja templates
into columns, computed once per folder by lm-eval's own task object on the plain form: lm-eval
compiles a template per document on every evaluation, which cost more than the forward passes of
a small model. tests/test_tasks_equal.py requires both forms to give lm-eval's requests exactly.

The zoo tasks (``zoo_mc``, ``zoo_lastword``) are kbit's own and read the model folder.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.files import atomic_write
from harness.names import unknown_name

log = logging.getLogger(__name__)
TASKS_VERSION = "3"  # bump when a definition changes: the cache folder name includes it
ADAPTER_VERSION = f"kbit{TASKS_VERSION}"
PROMPT_COLUMNS = {"doc_to_text": "kbit_text", "doc_to_target": "kbit_target",
                  "doc_to_choice": "kbit_choices"}  # fmt: skip

_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_ACC_NORM = [*_ACC, {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
_LASTWORD = {
    "output_type": "loglikelihood",
    "doc_to_text": "context",
    "doc_to_target": "target",
    "metric_list": [
        {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        *_ACC,
    ],
}
_MC = {"output_type": "multiple_choice", "doc_to_target": "gold", "doc_to_choice": "choices"}


# ------------------------------------------------------------------------------ reading files
def _jsonl_lines(path: Path) -> Iterable[tuple[int, str]]:
    """(1-based line number, line) of the non-blank lines of a jsonl file."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                yield number, line


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for _, line in _jsonl_lines(path)]


def _read_labels(path: Path) -> list[int]:
    return [int(x) for x in path.read_text(encoding="utf-8").split()]


# --------------------------------------------------------------- conversions to the hub format
def _convert_piqa(files: list[Path]) -> list[dict]:
    """PIQA's AI2 files (documents + a label file) as ``baber/piqa`` rows."""
    docs, labels = _read_jsonl(files[0]), _read_labels(files[1])
    if len(labels) != len(docs):
        raise ValueError(
            f"piqa: {len(docs)} docs in {files[0]} but {len(labels)} labels in {files[1]}"
        )
    return [{**d, "label": lab} for d, lab in zip(docs, labels, strict=True)]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _winogrande_doc(doc: dict) -> dict:
    """One partial-scoring row ``{context_options, continuation, gold}`` as a hub row.

    The options are the two contexts minus their common prefix, cut back to a word boundary
    (the blank usually follows a space); the blank ``_`` goes between the prefix and the
    continuation. Any split that round-trips gives lm-eval's requests (see ``_check_round_trip``).
    """
    first, second = doc["context_options"]
    prefix = _common_prefix(first, second)
    if " " in prefix and prefix != first and prefix != second:
        prefix = prefix[: prefix.rfind(" ") + 1]
    return {
        "sentence": f"{prefix}_ {doc['continuation']}",
        "option1": first[len(prefix) :],
        "option2": second[len(prefix) :],
        "answer": str(int(doc["gold"]) + 1),
    }


def _convert_winogrande(files: list[Path]) -> list[dict]:
    return [_winogrande_doc(d) for d in _read_jsonl(files[0])]


_ARC_PREFIX = "Question: "


def _arc_doc(doc: dict) -> dict:
    """``{query: "Question: ...", choices, gold}`` as an ``allenai/ai2_arc`` row."""
    if not doc["query"].startswith(_ARC_PREFIX):
        raise ValueError(f"query does not start with {_ARC_PREFIX!r}: {doc['query'][:60]!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {
        "question": doc["query"][len(_ARC_PREFIX) :],
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[int(doc["gold"])],
    }


def _convert_arc(files: list[Path]) -> list[dict]:
    return [_arc_doc(d) for d in _read_jsonl(files[0])]


def _convert_lastword(files: list[Path]) -> list[dict]:
    """Zoo last-word format: everything before the last space-separated word, then " " + it."""
    out = []
    for d in _read_jsonl(files[0]):
        words = d["text"].split(" ")
        out.append({**d, "context": " ".join(words[:-1]), "target": " " + words[-1]})
    return out


# What lm-eval's functions must give back on a converted document: (field, stored value).
def _expect_winogrande(stored: dict) -> dict:
    return {"doc_to_text": int(stored["gold"]), "doc_to_target": stored["continuation"],
            "doc_to_choice": list(stored["context_options"])}  # fmt: skip


def _expect_arc(stored: dict) -> dict:
    # The shared file stores lm-eval's prompt without its "\nAnswer:" suffix (data/README.md).
    return {"doc_to_text": stored["query"] + "\nAnswer:", "doc_to_target": int(stored["gold"]),
            "doc_to_choice": list(stored["choices"])}  # fmt: skip


# ------------------------------------------------------------------------------ task catalogue
@dataclass(frozen=True)
class LocalTask:
    """One local task: its source files (relative to its root) and how lm-eval reads them.

    ``builtin``: the lm-eval YAML (relative to ``lm_eval/tasks``) that defines the task; None
    for kbit's own zoo tasks, whose whole lm-eval config is ``config``. ``convert`` turns the
    source files into hub-format documents (None: the first file already is); ``expect`` gives,
    for a stored row, what lm-eval's ``doc_to_*`` must return on its converted document.
    ``schema``: the fields (and types) every line of the first file needs.
    """

    name: str
    files: tuple[str, ...]
    schema: Mapping[str, type | tuple[type, ...]]
    builtin: str | None = None
    split: str = "test"  # the built-in's evaluation split, which the local documents fill
    convert: Callable[[list[Path]], list[dict]] | None = None
    expect: Callable[[dict], dict] | None = None
    precompute: bool = False  # prompts into columns (the built-in uses Jinja templates)
    config: dict = field(default_factory=dict)
    root: str = "data"  # "data": under data_root; "model": under the model folder


_HS_FIELDS = {"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": list,
              "label": (int, str)}  # fmt: skip
_MC_FIELDS = {"query": str, "choices": list, "gold": int}

LOCAL_TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in [
        LocalTask("lambada_openai", ("eval/lambada_openai/test.jsonl",), {"text": str},
                  "lambada/lambada_openai.yaml", precompute=True),
        LocalTask("piqa", ("eval/piqa/valid.jsonl", "eval/piqa/valid-labels.lst"),
                  {"goal": str, "sol1": str, "sol2": str}, "piqa/piqa.yaml", "validation",
                  _convert_piqa, precompute=True),
        LocalTask("hellaswag", ("eval/hellaswag/validation.jsonl",), _HS_FIELDS,
                  "hellaswag/hellaswag.yaml", "validation", precompute=True),
        LocalTask("winogrande", ("eval/winogrande/dev.jsonl",),
                  {"context_options": list, "continuation": str, "gold": int},
                  "winogrande/default.yaml", "validation", _convert_winogrande,
                  _expect_winogrande),
        LocalTask("arc_easy", ("eval/arc/arc_easy_test.jsonl",), _MC_FIELDS, "arc/arc_easy.yaml",
                  "test", _convert_arc, _expect_arc, precompute=True),
        LocalTask("arc_challenge", ("eval/arc/arc_challenge_test.jsonl",), _MC_FIELDS,
                  "arc/arc_challenge.yaml", "test", _convert_arc, _expect_arc, precompute=True),
        LocalTask("zoo_mc", ("kbit_eval/mc.jsonl",), _MC_FIELDS,
                  config={**_MC, "doc_to_text": "query", "metric_list": _ACC_NORM},
                  root="model"),
        LocalTask("zoo_lastword", ("kbit_eval/lastword.jsonl",), {"text": str},
                  convert=_convert_lastword, config=_LASTWORD, root="model"),
    ]
}  # fmt: skip


# --------------------------------------------------------------------------- lm-eval built-ins
def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


_KEY = rb"""^["']?(task|group|tag)["']?[ \t]*:[ \t]*"""
_SCALAR = re.compile(_KEY + rb"""["']?([\w.()-]+)""", re.MULTILINE)
_FLOW = re.compile(_KEY + rb"\[([^\]\n]*)\]", re.MULTILINE)
_BLOCK = re.compile(_KEY + rb"(?:#[^\n]*)?\n((?:[ \t]*-[ \t]+[^\n]*(?:\n|$))+)", re.MULTILINE)
_ITEM = re.compile(rb"""["']?([\w.()-]+)""")


def _scan(text: bytes) -> tuple[list[str], set[str]]:
    """(task names, group and tag names) declared in one lm-eval YAML file's text."""
    tasks, others = [], set()
    for key, value in _SCALAR.findall(text):
        (tasks.append if key == b"task" else others.add)(value.decode())
    for key, value in _FLOW.findall(text):
        if key == b"tag":
            others.update(m.decode() for m in _ITEM.findall(value))
    for key, value in _BLOCK.findall(text):
        if key == b"tag":
            items = (_ITEM.match(line.strip()[1:].strip()) for line in value.splitlines())
            others.update(m.group(1).decode() for m in items if m)
    return tasks, others - {"null"}


def _scan_builtins(root: Path) -> tuple[dict[str, str], list[str]]:
    """({task name: its YAML relative to ``root``}, group and tag names), by regex."""
    tasks: dict[str, str] = {}
    others: set[str] = set()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if not (name.endswith("yaml") or "." not in name):
                continue
            path = Path(folder) / name
            found, tags = _scan(path.read_bytes())
            others |= tags
            if name.endswith(".yaml"):
                for task in found:
                    tasks.setdefault(task, str(path.relative_to(root)))
    return tasks, sorted(others)


@functools.lru_cache(maxsize=1)
def _builtin_index() -> tuple[dict[str, Path], frozenset[str]]:
    """({task name: its YAML}, group and tag names) of lm-eval's built-in tasks.

    A regex over the YAML files (~0.25 s on an idle machine) instead of a ``TaskManager``
    (~4-10 s): names are all a validation needs. Templates without a ``.yaml`` suffix are
    scanned for the tags they give the tasks including them. Matches
    ``TaskManager().all_tasks`` up to a handful of names. Cached in memory and on disk (keyed
    by lm-eval's version, folder and the folder's mtime), so a process pays a file read.
    """
    root = _lm_eval_tasks_dir()
    key = json.dumps([_lm_eval_version(), str(root), root.stat().st_mtime_ns, TASKS_VERSION])
    file = _cache_root() / f"builtin-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    try:
        tasks, others = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tasks, others = _scan_builtins(root)
        with contextlib.suppress(OSError):  # a read-only home must not fail a validation
            atomic_write(file, json.dumps([tasks, others]), skip_same=True)
    return {k: root / v for k, v in tasks.items()}, frozenset(others)


def builtin_task_names() -> frozenset[str]:
    """lm-eval's built-in task, group and tag names (cached; from its YAML files, fast)."""
    tasks, others = _builtin_index()
    return frozenset(tasks) | others


def _yaml_config(path: Path, resolve_functions: bool = False) -> dict:
    """A lm-eval YAML with its includes merged, as lm-eval's own loader reads it."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=resolve_functions)


def builtin_config(task: LocalTask, resolve_functions: bool = False) -> dict:
    """The lm-eval built-in config a local task is built from (functions resolved on request)."""
    return _yaml_config(_lm_eval_tasks_dir() / task.builtin, resolve_functions)


# ---------------------------------------------------------------------------- names and errors
def unknown_task_error(name: str, known: Iterable[str]) -> ValueError:
    """The one-line "unknown task" error (only the closest names when the list is long)."""
    return unknown_name("task", name, known)


def is_local(name: str, data_root: str | os.PathLike | None) -> bool:
    """Whether kbit's local definition serves ``name`` (zoo tasks always; others with data)."""
    task = LOCAL_TASKS.get(name)
    return task is not None and (task.root == "model" or data_root is not None)


def check_task_names(
    names: Iterable[str],
    data_root: str | os.PathLike | None,
    model_dir: str | os.PathLike | None,
) -> None:
    """Raise one line for a name that is neither a local task nor an lm-eval built-in.

    Fast (no ``TaskManager``): a typo must not cost seconds nor print 12,000 names.
    """
    for name in names:
        if name in LOCAL_TASKS:
            task_root(LOCAL_TASKS[name], data_root, model_dir)  # a zoo task needs its folder
        elif name not in builtin_task_names():
            raise unknown_task_error(name, builtin_task_names() | set(LOCAL_TASKS))


def task_root(
    task: LocalTask, data_root: str | os.PathLike | None, model_dir: str | os.PathLike | None
) -> Path:
    """The folder a task's files live under, or a clear error naming what is missing."""
    root = model_dir if task.root == "model" else data_root
    what = (
        "a local model folder (zoo model)" if task.root == "model" else "data_root / KBIT_DATA_ROOT"
    )
    if root is None:
        raise ValueError(f"task={task.name!r} reads local files and needs {what}; none given")
    return Path(root)


def task_files(
    names: Iterable[str],
    data_root: str | os.PathLike | None,
    model_dir: str | os.PathLike | None,
) -> list[Path]:
    """The data files of local tasks ``names``; raises if a name or a file is unknown."""
    files = []
    for name in names:
        if name not in LOCAL_TASKS:
            raise unknown_task_error(name, LOCAL_TASKS)
        task = LOCAL_TASKS[name]
        root = task_root(task, data_root, model_dir)
        for rel in task.files:
            if not (root / rel).is_file():
                raise ValueError(f"task={name!r}: data file {str(root / rel)!r} does not exist")
            files.append(root / rel)
    return files


# ------------------------------------------------------------------------------ file checking
def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _check_jsonl(path: Path, schema: Mapping[str, type | tuple[type, ...]]) -> int:
    """Number of documents in ``path``; raises one line naming the file, line and problem."""
    count = 0
    try:
        for number, line in _jsonl_lines(path):
            where = f"{path}:{number}"
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(doc, dict):
                raise ValueError(f"{where}: a JSON {type(doc).__name__}, not an object")
            for key, kind in schema.items():
                if key not in doc:
                    raise ValueError(f"{where}: field {key!r} is missing; needed: {sorted(schema)}")
                if not isinstance(doc[key], kind):
                    raise ValueError(f"{where}: field {key!r} is a {type(doc[key]).__name__}, "
                                     f"not {_type_name(kind)}")  # fmt: skip
            count += 1
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if count == 0:
        raise ValueError(f"{path}: empty file (no documents)")
    return count


def _check_labels(path: Path) -> int:
    """Number of integer labels in a ``.lst`` file (one a line)."""
    count = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                if not re.fullmatch(r"-?\d+", line.strip()):
                    raise ValueError(f"{path}:{number}: label {line.strip()[:40]!r} is not an int")
                count += 1
    if count == 0:
        raise ValueError(f"{path}: empty file (no labels)")
    return count


_VERDICTS: dict[tuple, int] = {}  # (path, size, mtime_ns, schema) -> number of records


def _check_file(path: Path, schema: Mapping[str, type | tuple[type, ...]]) -> int:
    """Records in a task file, checked once per (path, size, mtime) in this process."""
    key = (*_stamp(path), tuple(sorted(schema)))
    if key not in _VERDICTS:
        _VERDICTS[key] = (
            _check_labels(path) if path.suffix == ".lst" else _check_jsonl(path, schema)
        )
    return _VERDICTS[key]


def check_files(
    names: Iterable[str],
    data_root: str | os.PathLike | None,
    model_dir: str | os.PathLike | None,
) -> None:
    """Raise one line if a local task's files are missing, empty or hold an invalid line.

    Called by the runner's validation, before any model loads. Each file is read once per
    (path, size, mtime) in a process; later calls cost a ``stat``.
    """
    for name in names:
        task = LOCAL_TASKS.get(name)
        if task is None:
            raise unknown_task_error(name, LOCAL_TASKS)
        counts = {f: _check_file(f, task.schema) for f in task_files([name], data_root, model_dir)}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{n} in {f}" for f, n in counts.items())
            raise ValueError(f"task={name!r}: files disagree on the number of documents: {listed}")


# ----------------------------------------------------------------------------- provenance
@dataclass(frozen=True)
class TaskSource:
    """Where a task's (or a text's) documents come from, and the definition's version.

    ``source``: ``local:<resolved path>;sha256=<hex>`` (several files joined with ``+``) or
    ``hub:<dataset_path>[/<dataset_name>]@<revision or 'unpinned'>``.
    """

    source: str
    version: str


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per (path, size, mtime_ns) in this process."""
    key = _stamp(Path(path))
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(key[0], "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def local_source(files: Iterable[Path]) -> str:
    """``local:<path>;sha256=<hex>`` per file, joined with ``+``."""
    return "+".join(f"local:{Path(f).resolve()};sha256={file_sha256(f)}" for f in files)


def hub_source(dataset_path: str, dataset_name: str | None, revision: str | None) -> str:
    name = f"/{dataset_name}" if dataset_name else ""
    return f"hub:{dataset_path}{name}@{revision or 'unpinned'}"


def _version(config: dict) -> str:
    version = (config.get("metadata") or {}).get("version")
    return "unknown" if version is None else str(version)


def _builtin_source(name: str) -> TaskSource:
    """The hub source of a built-in task; groups and tags name lm-eval's release."""
    tasks, others = _builtin_index()
    if name not in tasks:
        if name not in others:
            raise unknown_task_error(name, builtin_task_names() | set(LOCAL_TASKS))
        return TaskSource(f"hub:lm-eval-group/{name}@unpinned", f"lm-eval-{_lm_eval_version()}")
    cfg = _yaml_config(tasks[name])
    revision = (cfg.get("dataset_kwargs") or {}).get("revision")
    return TaskSource(
        hub_source(str(cfg.get("dataset_path")), cfg.get("dataset_name"), revision), _version(cfg)
    )


def task_sources(
    names: Iterable[str],
    data_root: str | os.PathLike | None,
    model_dir: str | os.PathLike | None,
) -> dict[str, TaskSource]:
    """{task: TaskSource} for the cell identity and the record (files hashed once each)."""
    out = {}
    for name in names:
        if not is_local(name, data_root):
            out[name] = _builtin_source(name)
            continue
        task = LOCAL_TASKS[name]
        base = _version(builtin_config(task)) + "+" if task.builtin else ""
        files = task_files([name], data_root, model_dir)
        out[name] = TaskSource(local_source(files), base + ADAPTER_VERSION)
    return out


# ---------------------------------------------------------------------------- materializing
def _cache_root() -> Path:
    return Path(os.environ.get("KBIT_CACHE_DIR") or Path.home() / ".cache" / "kbit") / "tasks"


def _apply(spec: object, doc: dict) -> object:
    """A ``doc_to_*`` field applied the way lm-eval's ConfigurableTask applies it."""
    import lm_eval.utils

    if callable(spec):
        return spec(doc)
    if isinstance(spec, str) and spec in doc:
        return doc[spec]
    if isinstance(spec, str):
        text = lm_eval.utils.apply_template(spec, doc)
        if text.isdigit() or (text.startswith("[") and text.endswith("]")):
            return ast.literal_eval(text)
        return text
    return spec


def _check_round_trip(task: LocalTask, source: Path, stored: list[dict], docs: list[dict]) -> None:
    """lm-eval's own doc_to_* on each converted document must give the stored strings back."""
    if task.expect is None:
        return
    config = builtin_config(task, resolve_functions=True)
    with _templates_compiled_once():
        _compare(config, task, source, stored, docs)


def _compare(config: dict, task: LocalTask, source: Path, stored: list[dict], docs: list[dict]):
    for number, (row, doc) in enumerate(zip(stored, docs, strict=True), 1):
        for key, want in task.expect(row).items():
            got = _apply(config[key], doc)
            if got != want:
                raise ValueError(f"{source} document {number}: converted {key} gives {got!r}, "
                                 f"stored {want!r}")  # fmt: skip


def hub_docs(
    name: str, data_root: str | os.PathLike | None, model_dir: str | os.PathLike | None = None
) -> list[dict]:
    """The local documents of a built-in-based task in the hub's format (round-trip checked)."""
    files = [f.resolve() for f in task_files([name], data_root, model_dir)]
    return _hub_docs(LOCAL_TASKS[name], files)


def _hub_docs(task: LocalTask, files: list[Path]) -> list[dict]:
    if task.convert is None:
        return _read_jsonl(files[0])
    docs = task.convert(files)
    _check_round_trip(task, files[0], _read_jsonl(files[0]), docs)
    return docs


def _jsonl_text(docs: Iterable[dict]) -> str:
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)


def _data_source(task: LocalTask, data_file: Path) -> dict:
    """What replaces the built-in's data source: a local jsonl in the evaluation split only."""
    splits = {"training_split": None, "validation_split": None, "test_split": None}
    splits[f"{task.split}_split"] = task.split
    return {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task.split: str(data_file)}},
        **splits,
        "tag": None,  # the built-in's tags stay with lm-eval's own tasks
    }


def _plain_yaml(task: LocalTask, data_file: Path) -> dict:
    return {
        "include": str(_lm_eval_tasks_dir() / task.builtin),
        "task": task.name,
        **_data_source(task, data_file),
    }


def _zoo_yaml(task: LocalTask, data_file: Path) -> dict:
    return {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        **task.config,
        "metadata": {"version": ADAPTER_VERSION},
    }


@contextlib.contextmanager
def _templates_compiled_once() -> Iterator[None]:
    """lm-eval's ``apply_template`` with each template compiled once, not once per document.

    Same environment (``lm_eval.utils.env``), same template text, so the same strings; the
    original function comes back on exit. Makes precomputing a folder ~3x faster.
    """
    import lm_eval.utils as lm_utils

    original = lm_utils.apply_template
    compiled = functools.lru_cache(maxsize=64)(lm_utils.env.from_string)
    lm_utils.apply_template = lambda template, doc: compiled(template).render(**doc)
    try:
        yield
    finally:
        lm_utils.apply_template = original


def _lm_eval_task(folder: Path, name: str):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False).load([name])["tasks"][name]


def _precomputed_docs(task: LocalTask, plain_yaml: dict) -> list[dict]:
    """Each evaluation document (after lm-eval's process_docs) with lm-eval's prompts in columns.

    The values come from lm-eval's own task object built from the plain form, so they are its
    ``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` results exactly.
    """
    with tempfile.TemporaryDirectory(prefix="kbit-plain-") as tmp, _templates_compiled_once():
        atomic_write(Path(tmp) / f"{task.name}.yaml", yaml.safe_dump(plain_yaml, sort_keys=False))
        lm_task = _lm_eval_task(Path(tmp), task.name)
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
        "metadata": {
            **(base.get("metadata") or {}),
            "version": f"{_version(base)}+{ADAPTER_VERSION}",
        },
    }


def _write_task(task: LocalTask, files: list[Path], out: Path, plain: bool) -> None:
    """Write one task's YAML (and its converted documents) into ``out``."""
    if task.builtin is None:
        data_file = files[0]
        if task.convert is not None:
            data_file = out / f"{task.name}.jsonl"
            atomic_write(data_file, _jsonl_text(task.convert(files)), skip_same=True)
        atomic_write(out / f"{task.name}.yaml", yaml.safe_dump(_zoo_yaml(task, data_file),
                     sort_keys=False), skip_same=True)  # fmt: skip
        return
    data_file = files[0]
    if task.convert is not None:
        data_file = out / f"{task.name}.hub.jsonl"
        atomic_write(data_file, _jsonl_text(_hub_docs(task, files)), skip_same=True)
    config = _plain_yaml(task, data_file)
    if task.precompute and not plain:
        docs = _precomputed_docs(task, config)
        fast_file = out / f"{task.name}.prompts.jsonl"
        atomic_write(fast_file, _jsonl_text(docs), skip_same=True)
        config = _fast_yaml(task, fast_file, "kbit_choices" in docs[0])
    atomic_write(out / f"{task.name}.yaml", yaml.safe_dump(config, sort_keys=False), skip_same=True)


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
    files (path, size, mtime) are unchanged since it was written is not written again.
    """
    check_files(names, data_root, model_dir)
    if out_dir is None:
        key = json.dumps([TASKS_VERSION, _lm_eval_version(), str(_lm_eval_tasks_dir()),
                          str(data_root), str(model_dir), plain, sorted(names)])  # fmt: skip
        out_dir = _cache_root() / hashlib.sha256(key.encode()).hexdigest()[:16]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(out)
    for name in names:
        task = LOCAL_TASKS[name]
        files = [f.resolve() for f in task_files([name], data_root, model_dir)]
        stamp = [[*_stamp(f)] for f in files] + [[TASKS_VERSION, _lm_eval_version(), plain]]
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
