"""The tasks kbit knows by name: its local tasks (one YAML file each) and lm-eval's built-ins.

A local task is one file in ``harness/evaluate/local_tasks/`` in lm-eval's task format plus a
``kbit:`` block (read by :mod:`harness.evaluate.task_definitions`); adding a local task is
adding one such file and its data (``local_tasks/README.md``). :func:`local_task`,
:func:`local_task_names` and :func:`task_cost` are how the rest of kbit learns about them.
lm-eval's built-in task, group and tag names come from a fast regex index of its YAML files (no
``TaskManager``); :func:`yaml_config` reads one of its task files with includes merged.

The lookups here (:func:`check_task_names`, :func:`task_files`, :func:`is_local`) are what
every other task module builds on: :mod:`harness.evaluate.task_data` checks and hashes the
files, :mod:`harness.evaluate.tasks` writes the folder lm-eval's
``TaskManager(include_path=...)`` loads. This module imports neither.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from harness.evaluate.task_definitions import (
    LOCAL_TASKS,
    LocalTask,
    TaskDefinitionError,
    definitions_dir,
    dump_yaml,
    load_definition,
    register_task_dir,
    task_dirs,
)
from harness.evaluate.task_formats import jsonl_lines, read_jsonl
from harness.files import atomic_write, user_path
from harness.names import unknown_name

__all__ = [
    "ADAPTER_VERSION",
    "LOCAL_TASKS",
    "TASKS_VERSION",
    "LocalTask",
    "TaskDefinitionError",
    "builtin_config",
    "builtin_index",
    "builtin_task_names",
    "cache_root",
    "check_task_names",
    "config_version",
    "definitions_dir",
    "dump_yaml",
    "is_local",
    "jsonl_lines",
    "lm_eval_tasks_dir",
    "lm_eval_version",
    "load_definition",
    "local_task",
    "local_task_names",
    "read_jsonl",
    "register_task_dir",
    "task_cost",
    "task_dirs",
    "task_files",
    "task_root",
    "task_version",
    "unknown_task_error",
    "yaml_config",
]

TASKS_VERSION = "3"  # bump when a definition changes: the cache folder name includes it
ADAPTER_VERSION = f"kbit{TASKS_VERSION}"


# ------------------------------------------------------------------------------ task catalogue


def local_task_names() -> list[str]:
    """The names of kbit's local tasks, in file order."""
    return list(LOCAL_TASKS)


def local_task(name: str) -> LocalTask:
    """The local task ``name``; one line naming the closest names when there is none."""
    if name not in LOCAL_TASKS:
        raise unknown_task_error(name, LOCAL_TASKS)
    return LOCAL_TASKS[name]


def task_cost(name: str) -> tuple[int, int] | None:
    """(examples, forward tokens per example summed over choices) of a full evaluation of task
    ``name``, as its definition declares (``kbit.cost``); None when it declares none or kbit
    has no local definition of that name. For sizing scheduler jobs (rough)."""
    task = LOCAL_TASKS.get(name)
    return task.cost if task is not None else None


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


def _read_yaml(path: Path) -> object:
    """One YAML file of lm-eval's task format; ``!function spec`` as lm-eval keeps it unresolved
    (the path ``<file's folder>/spec``)."""
    base = path.parent
    safe = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when built with it

    class Loader(safe):  # type: ignore[misc, valid-type]
        pass

    Loader.add_constructor(
        "!function", lambda loader, node: str(base / loader.construct_scalar(node))
    )
    with path.open("rb") as fh:
        return yaml.load(fh, Loader=Loader)  # a safe loader plus one string tag


def yaml_config(path: str | os.PathLike, _seen: frozenset[Path] = frozenset()) -> dict:
    """A lm-eval task YAML with its includes merged, functions left unresolved.

    Why not lm-eval's own reader: it is private (``lm_eval.tasks._yaml_loader``) and has no
    public equivalent that does not build the task (and so load its dataset). This follows the
    task format as lm-eval documents it: each ``include`` (one or a list, relative to the file)
    is read recursively and merged in order, the including file's keys win, an included
    ``task_list`` is dropped. tests/test_local_tasks.py compares it with lm-eval's reader on
    lm-eval's own files.
    """
    path = Path(path).expanduser().resolve()
    if path in _seen:
        raise ValueError(f"{path}: include cycle")
    config = _read_yaml(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a YAML {type(config).__name__}, not a mapping")
    if "include" not in config:
        return config
    includes = config.pop("include")
    merged: dict = {}
    for include in includes if isinstance(includes, list) else [includes]:
        included = yaml_config(path.parent / include, _seen | {path})
        included.pop("task_list", None)
        merged.update(included)
    return {**merged, **config}


def builtin_config(task: LocalTask) -> dict:
    """The lm-eval built-in config a local task includes (its includes merged)."""
    return yaml_config(lm_eval_tasks_dir() / str(task.builtin))


def config_version(config: dict) -> str:
    """A lm-eval config's ``metadata.version`` as a string (``"unknown"`` when missing)."""
    version = (config.get("metadata") or {}).get("version")
    return "unknown" if version is None else str(version)


def task_version(task: LocalTask) -> str:
    """The definition version a local task's provenance carries: its built-in's
    ``metadata.version`` (or the file's own, for a task it defines whole) + kbit's adapter."""
    if task.builtin is not None:
        return f"{config_version(builtin_config(task))}+{ADAPTER_VERSION}"
    version = (task.config.get("metadata") or {}).get("version")
    return ADAPTER_VERSION if version is None else f"{version}+{ADAPTER_VERSION}"


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
