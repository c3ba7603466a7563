"""The tasks kbit knows by name: its local task catalogue and lm-eval's built-ins.

:data:`LOCAL_TASKS` says, for each of kbit's local tasks, which files it reads (under the data
root or the model folder), what every line of them must hold, which lm-eval built-in it is and
how the shared files convert into the hub's document format. lm-eval's built-in task, group and
tag names come from a fast regex index of its YAML files (no ``TaskManager``). The lookups here
(:func:`check_task_names`, :func:`task_files`, :func:`is_local`) are what every other task
module builds on: :mod:`harness.evaluate.task_data` checks and hashes the files,
:mod:`harness.evaluate.tasks` writes the lm-eval task folder. This module imports neither.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from harness.files import atomic_write, user_path
from harness.names import unknown_name

TASKS_VERSION = "3"  # bump when a definition changes: the cache folder name includes it
ADAPTER_VERSION = f"kbit{TASKS_VERSION}"

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
def jsonl_lines(path: Path) -> Iterable[tuple[int, str]]:
    """(1-based line number, line) of the non-blank lines of a jsonl file."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                yield number, line


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for _, line in jsonl_lines(path)]


def _read_labels(path: Path) -> list[int]:
    return [int(x) for x in path.read_text(encoding="utf-8").split()]


# --------------------------------------------------------------- conversions to the hub format
def _convert_piqa(files: list[Path]) -> list[dict]:
    """PIQA's AI2 files (documents + a label file) as ``baber/piqa`` rows."""
    docs, labels = read_jsonl(files[0]), _read_labels(files[1])
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
    continuation. Any split that round-trips gives lm-eval's requests (checked by
    :func:`harness.evaluate.tasks.hub_docs`).
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
    return [_winogrande_doc(d) for d in read_jsonl(files[0])]


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
    return [_arc_doc(d) for d in read_jsonl(files[0])]


def _convert_lastword(files: list[Path]) -> list[dict]:
    """Zoo last-word format: everything before the last space-separated word, then " " + it."""
    out = []
    for d in read_jsonl(files[0]):
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


# ---------------------------------------------- the (context, continuation) pairs of a document
# What lm-eval scores for one line of a task's first file: the strings whose concatenation the
# model reads (lm-eval 0.4 encodes ``context + continuation`` whole). Used to check that every
# example fits the model's context before it is scored (task_data.check_context).
Pairs = list[tuple[str, str]]


def _lastword_pairs(doc: dict) -> Pairs:
    context, _, word = doc["text"].rpartition(" ")
    return [(context, " " + word)]


def _query_pairs(doc: dict) -> Pairs:
    return [(doc["query"], " " + str(c)) for c in doc["choices"]]


def _arc_pairs(doc: dict) -> Pairs:
    return [(doc["query"] + "\nAnswer:", " " + str(c)) for c in doc["choices"]]


def _piqa_pairs(doc: dict) -> Pairs:
    question = f"Question: {doc['goal']}\nAnswer:"
    return [(question, " " + doc["sol1"]), (question, " " + doc["sol2"])]


def _hellaswag_pairs(doc: dict) -> Pairs:
    from lm_eval.tasks.hellaswag.utils import preprocess  # lm-eval's own process_docs step

    query = preprocess(
        doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    )
    return [(query, " " + preprocess(str(e))) for e in doc["endings"]]


def _winogrande_pairs(doc: dict) -> Pairs:
    return [(str(option), " " + doc["continuation"]) for option in doc["context_options"]]


# ------------------------------------------------------------------------------ task catalogue
@dataclass(frozen=True)
class LocalTask:
    """One local task: its source files (relative to its root) and how lm-eval reads them.

    ``builtin``: the lm-eval YAML (relative to ``lm_eval/tasks``) that defines the task; None
    for kbit's own zoo tasks, whose whole lm-eval config is ``config``. ``convert`` turns the
    source files into hub-format documents (None: the first file already is); ``expect`` gives,
    for a stored row, what lm-eval's ``doc_to_*`` must return on its converted document.
    ``schema``: the fields (and types) every line of the first file needs. ``label``: (the
    field holding the gold answer, the field listing the choices or their fixed number); every
    label must index a choice (a ``.lst`` label file holds one label a line, checked alike).
    ``pairs``: the (context, continuation) strings lm-eval scores for one line of the first file
    (their length in tokens is checked against the model's context).
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
    label: tuple[str, str | int] | None = None
    pairs: Callable[[dict], Pairs] | None = None


_HS_FIELDS = {"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": list,
              "label": (int, str)}  # fmt: skip
_MC_FIELDS = {"query": str, "choices": list, "gold": int}

LOCAL_TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in [
        LocalTask("lambada_openai", ("eval/lambada_openai/test.jsonl",), {"text": str},
                  "lambada/lambada_openai.yaml", precompute=True, pairs=_lastword_pairs),
        LocalTask("piqa", ("eval/piqa/valid.jsonl", "eval/piqa/valid-labels.lst"),
                  {"goal": str, "sol1": str, "sol2": str}, "piqa/piqa.yaml", "validation",
                  _convert_piqa, precompute=True, label=("label", 2), pairs=_piqa_pairs),
        LocalTask("hellaswag", ("eval/hellaswag/validation.jsonl",), _HS_FIELDS,
                  "hellaswag/hellaswag.yaml", "validation", precompute=True,
                  label=("label", "endings"), pairs=_hellaswag_pairs),
        LocalTask("winogrande", ("eval/winogrande/dev.jsonl",),
                  {"context_options": list, "continuation": str, "gold": int},
                  "winogrande/default.yaml", "validation", _convert_winogrande,
                  _expect_winogrande, label=("gold", "context_options"),
                  pairs=_winogrande_pairs),
        LocalTask("arc_easy", ("eval/arc/arc_easy_test.jsonl",), _MC_FIELDS, "arc/arc_easy.yaml",
                  "test", _convert_arc, _expect_arc, precompute=True, label=("gold", "choices"),
                  pairs=_arc_pairs),
        LocalTask("arc_challenge", ("eval/arc/arc_challenge_test.jsonl",), _MC_FIELDS,
                  "arc/arc_challenge.yaml", "test", _convert_arc, _expect_arc, precompute=True,
                  label=("gold", "choices"), pairs=_arc_pairs),
        LocalTask("zoo_mc", ("kbit_eval/mc.jsonl",), _MC_FIELDS,
                  config={**_MC, "doc_to_text": "query", "metric_list": _ACC_NORM},
                  root="model", label=("gold", "choices"), pairs=_query_pairs),
        LocalTask("zoo_lastword", ("kbit_eval/lastword.jsonl",), {"text": str},
                  convert=_convert_lastword, config=_LASTWORD, root="model",
                  pairs=_lastword_pairs),
    ]
}  # fmt: skip


# --------------------------------------------------------------------------- lm-eval built-ins
def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def lm_eval_version() -> str:
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
def builtin_index() -> tuple[dict[str, Path], frozenset[str]]:
    """({task name: its YAML}, group and tag names) of lm-eval's built-in tasks.

    A regex over the YAML files (~0.25 s on an idle machine) instead of a ``TaskManager``
    (~4-10 s): names are all a validation needs. Templates without a ``.yaml`` suffix are
    scanned for the tags they give the tasks including them. Matches
    ``TaskManager().all_tasks`` up to a handful of names. Cached in memory and on disk (keyed
    by lm-eval's version, folder and the folder's mtime), so a process pays a file read.
    """
    root = lm_eval_tasks_dir()
    key = json.dumps([lm_eval_version(), str(root), root.stat().st_mtime_ns, TASKS_VERSION])
    file = cache_root() / f"builtin-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    try:
        tasks, others = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tasks, others = _scan_builtins(root)
        with contextlib.suppress(OSError):  # a read-only home must not fail a validation
            atomic_write(file, json.dumps([tasks, others]), skip_same=True)
    return {k: root / v for k, v in tasks.items()}, frozenset(others)


def cache_root() -> Path:
    """kbit's task cache folder (``$KBIT_CACHE_DIR/tasks``, default ``~/.cache/kbit/tasks``)."""
    return Path(os.environ.get("KBIT_CACHE_DIR") or Path.home() / ".cache" / "kbit") / "tasks"


def builtin_task_names() -> frozenset[str]:
    """lm-eval's built-in task, group and tag names (cached; from its YAML files, fast)."""
    tasks, others = builtin_index()
    return frozenset(tasks) | others


def yaml_config(path: Path, resolve_functions: bool = False) -> dict:
    """A lm-eval YAML with its includes merged, as lm-eval's own loader reads it."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=resolve_functions)


def builtin_config(task: LocalTask, resolve_functions: bool = False) -> dict:
    """The lm-eval built-in config a local task is built from (functions resolved on request)."""
    return yaml_config(lm_eval_tasks_dir() / task.builtin, resolve_functions)


def config_version(config: dict) -> str:
    """A lm-eval config's ``metadata.version`` as a string (``"unknown"`` when missing)."""
    version = (config.get("metadata") or {}).get("version")
    return "unknown" if version is None else str(version)


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
    return Path(root) if task.root == "model" else user_path(root, "data_root")


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
