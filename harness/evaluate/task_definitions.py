"""kbit's local task definitions: one YAML file each, in lm-eval's task format plus ``kbit:``.

Each file under ``harness/evaluate/local_tasks/`` is a task as lm-eval reads it (``task:``,
``include:`` of a built-in under ``lm_eval/tasks/`` or a whole definition: ``output_type``,
``doc_to_text``, ``doc_to_target``, ``doc_to_choice``, ``metric_list`` ..., and
``dataset_path: json`` with its evaluation split) plus a ``kbit:`` block that lm-eval never
sees: the files the task reads and where (``root: data`` or ``model``), the fields every line
needs (``schema``), the gold label (``label``), dotted paths of the functions that convert the
files and list the scored strings (:mod:`harness.evaluate.task_formats`), ``precompute`` and a
job-packing ``cost``. :data:`LOCAL_TASKS` reads the folder on first use; a bad file fails in
one line naming the file, the field and what is allowed. ``local_tasks/README.md`` is the
how-to for adding a task.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.evaluate.task_formats import Pairs

__all__ = ["LOCAL_TASKS", "TASK_DIR_ENV", "FunctionRef", "LocalTask", "TaskDefinitionError",
           "definitions_dir", "dump_yaml", "load_definition", "register_task_dir",
           "task_dirs"]  # fmt: skip


class FunctionRef(str):
    """A definition's ``!function package.module.function`` value, written back as it was
    (lm-eval imports it when it loads the materialized task)."""

    __slots__ = ()


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML's safe loader plus lm-eval's ``!function`` tag, kept as a :class:`FunctionRef`."""


_Loader.add_constructor(
    "!function", lambda loader, node: FunctionRef(loader.construct_scalar(node))
)


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper writing a :class:`FunctionRef` back as ``!function``."""


_Dumper.add_representer(FunctionRef, lambda dumper, v: dumper.represent_scalar("!function", v))


def dump_yaml(config: dict) -> str:
    """A task config as lm-eval reads it (``yaml.safe_dump`` plus ``!function`` tags)."""
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False)


@dataclass(frozen=True)
class LocalTask:
    """One local task, as read from its YAML file (:func:`load_definition`).

    ``config``: the lm-eval part of the file (everything but ``kbit:``); ``builtin``: its
    ``include``, the lm-eval YAML (relative to ``lm_eval/tasks``) that defines the task, or None
    for a task the file defines whole (the zoo tasks). ``split``: the evaluation split the local
    documents fill. ``files``: the source files, relative to ``root`` ("data": the data root;
    "model": the model folder). ``convert`` turns them into the documents lm-eval reads (None:
    the first file already is); ``expect`` gives, for a stored row, what lm-eval's ``doc_to_*``
    must return on its converted document. ``schema``: the fields (and types) every line of the
    first file needs. ``label``: (the field holding the gold answer, the field listing the
    choices or their fixed number); every label must index a choice. ``pairs``: the (context,
    continuation) strings lm-eval scores for one line of the first file. ``precompute``: put
    lm-eval's prompts into columns (the built-in uses Jinja templates). ``cost``: (examples,
    forward tokens per example summed over choices) of a full evaluation, for job packing.
    """

    name: str
    files: tuple[str, ...]
    schema: Mapping[str, type | tuple[type, ...]]
    builtin: str | None = None
    split: str = "test"
    convert: Callable[[list[Path]], list[dict]] | None = None
    expect: Callable[[dict], dict] | None = None
    precompute: bool = False
    config: dict = field(default_factory=dict)
    root: str = "data"
    label: tuple[str, str | int] | None = None
    pairs: Callable[[dict], Pairs] | None = None
    cost: tuple[int, int] | None = None
    path: Path | None = None  # the YAML file it was read from


class TaskDefinitionError(ValueError):
    """A local task's YAML file that kbit cannot use (one line: file, field, what is allowed)."""


_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}
_KBIT_KEYS = {"root": True, "files": True, "schema": True, "label": False, "convert": False,
              "expect": False, "pairs": False, "precompute": False, "cost": False}  # fmt: skip
_SPLITS = ("test_split", "validation_split")  # lm-eval evaluates test when it has one


TASK_DIR_ENV = "KBIT_TASK_DIR"  # a folder of the user's own task definitions
_PLUGIN_DIRS: list[Path] = []  # folders registered by plugins, in load order


def definitions_dir() -> Path:
    """The folder of kbit's own local task definitions (one ``<task>.yaml`` each)."""
    return Path(__file__).resolve().parent / "local_tasks"


def register_task_dir(folder: str | os.PathLike) -> None:
    """Add a folder of task definitions shipped by a plugin (searched after kbit's own, before
    ``$KBIT_TASK_DIR``). Registering it again is a no-op."""
    from harness.plugins import add_plugin_folder

    add_plugin_folder(_PLUGIN_DIRS, folder, "task folder", "task definitions (<task>.yaml)")


def task_dirs() -> tuple[Path, ...]:
    """Folders of local task definitions: kbit's own, the plugins' (:func:`register_task_dir`),
    then ``$KBIT_TASK_DIR`` if set, so a user adds a task without touching the checkout. A
    task defined in two of them is refused, naming both files."""
    from harness.files import user_path

    dirs = [definitions_dir(), *_PLUGIN_DIRS]
    if os.environ.get(TASK_DIR_ENV):
        dirs.append(user_path(os.environ[TASK_DIR_ENV], TASK_DIR_ENV))
    return tuple(dirs)


def _function(spec: object, where: str) -> Callable:
    """The function a dotted path (``package.module.function``) names."""
    module, _, name = str(spec).rpartition(".")
    try:
        function = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as exc:
        raise TaskDefinitionError(f"{where}={spec!r}: not importable ({exc})") from None
    if not callable(function):
        raise TaskDefinitionError(f"{where}={spec!r}: allowed: a dotted path to a function")
    return function


def _schema(raw: object, where: str) -> dict[str, type | tuple[type, ...]]:
    if not isinstance(raw, dict) or not raw:
        raise TaskDefinitionError(f"{where}={raw!r}: allowed: a mapping field -> type")
    out: dict[str, type | tuple[type, ...]] = {}
    for key, kind in raw.items():
        names = kind if isinstance(kind, list) else [kind]
        bad = [n for n in names if n not in _TYPES]
        if bad or not names:
            raise TaskDefinitionError(
                f"{where}.{key}={kind!r}: allowed: one of {sorted(_TYPES)} or a list of them"
            )
        types = tuple(_TYPES[n] for n in names)
        out[str(key)] = types[0] if len(types) == 1 else types
    return out


def _label(raw: object, where: str) -> tuple[str, str | int] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"field", "choices"}:
        raise TaskDefinitionError(
            f"{where}={raw!r}: allowed: {{field: <gold field>, choices: <choices field or count>}}"
        )
    return str(raw["field"]), raw["choices"]


def _cost(raw: object, where: str) -> tuple[int, int] | None:
    if raw is None:
        return None
    ok = isinstance(raw, dict) and set(raw) == {"examples", "tokens_per_example"}
    if not ok or not all(isinstance(v, int) and v > 0 for v in raw.values()):
        raise TaskDefinitionError(
            f"{where}={raw!r}: allowed: {{examples: <int > 0>, tokens_per_example: <int > 0>}}"
        )
    return raw["examples"], raw["tokens_per_example"]


def load_definition(path: str | os.PathLike) -> LocalTask:
    """A local task from its YAML file; one line naming the file and field for a bad entry."""
    path = Path(path)
    raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # a safe loader
    if not isinstance(raw, dict) or not isinstance(raw.get("task"), str):
        raise TaskDefinitionError(f"{path}: task: missing; a local task file names its task")
    config = {k: v for k, v in raw.items() if k != "kbit"}
    kbit = raw.get("kbit")
    if not isinstance(kbit, dict):
        raise TaskDefinitionError(f"{path}: kbit: missing; allowed keys: {sorted(_KBIT_KEYS)}")
    unknown = sorted(set(kbit) - set(_KBIT_KEYS))
    missing = sorted(k for k, needed in _KBIT_KEYS.items() if needed and k not in kbit)
    if unknown or missing:
        what = f"kbit.{unknown[0]}: unknown" if unknown else f"kbit.{missing[0]}: missing"
        raise TaskDefinitionError(f"{path}: {what}; allowed keys: {sorted(_KBIT_KEYS)}")
    if kbit["root"] not in ("data", "model"):
        raise TaskDefinitionError(f"{path}: kbit.root={kbit['root']!r}: allowed: data, model")
    files = kbit["files"]
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise TaskDefinitionError(f"{path}: kbit.files={files!r}: allowed: a list of paths")
    split = next((config[k] for k in _SPLITS if config.get(k)), None)
    if split is None:
        raise TaskDefinitionError(f"{path}: none of {list(_SPLITS)} is set: the split to fill")
    where = f"{path}: kbit"
    fns = {k: _function(kbit[k], f"{where}.{k}") if kbit.get(k) else None
           for k in ("convert", "expect", "pairs")}  # fmt: skip
    return LocalTask(
        name=raw["task"], files=tuple(files), schema=_schema(kbit["schema"], f"{where}.schema"),
        builtin=config.get("include"), split=str(split), precompute=bool(kbit.get("precompute")),
        config=config, root=kbit["root"], label=_label(kbit.get("label"), f"{where}.label"),
        cost=_cost(kbit.get("cost"), f"{where}.cost"), path=path, **fns,
    )  # fmt: skip


def _read_folders(stamp: tuple) -> dict[str, LocalTask]:
    tasks: dict[str, LocalTask] = {}
    for folder, files in stamp:
        for name, *_ in files:
            task = load_definition(folder / name)
            if task.name in tasks:
                raise TaskDefinitionError(f"{folder / name}: task {task.name!r} is also "
                                          f"defined in {tasks[task.name].path}")  # fmt: skip
            tasks[task.name] = task
    return tasks


def _listing(folder: Path) -> tuple:
    """(file name, size, mtime) of the ``*.yaml`` files of ``folder`` (none if it is missing)."""
    try:
        with os.scandir(folder) as entries:
            return tuple(sorted((e.name, (st := e.stat()).st_size, st.st_mtime_ns)
                                for e in entries if e.name.endswith(".yaml")))  # fmt: skip
    except FileNotFoundError:
        return ()


class _Catalog(Mapping[str, LocalTask]):
    """{task name: LocalTask} of the files in :func:`task_dirs`.

    Read on first use (not at import) and again when a file there is added, removed or edited
    (a long-lived process, a notebook, sees the change); otherwise a look-up costs a listing
    of the folder.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._read: dict[str, LocalTask] = {}

    @property
    def _tasks(self) -> dict[str, LocalTask]:
        stamp = tuple((folder, _listing(folder)) for folder in task_dirs())
        if stamp != self._key:
            self._read = _read_folders(stamp)
            self._key = stamp
        return self._read

    def __getitem__(self, name: str) -> LocalTask:
        return self._tasks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)


LOCAL_TASKS: Mapping[str, LocalTask] = _Catalog()
