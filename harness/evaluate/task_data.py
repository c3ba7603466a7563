"""The data files of kbit's local tasks: checked before any model loads, and identified.

:func:`check_files` is the runner's validation (a missing, empty or malformed file fails in one
line naming the file and line); :func:`task_sources` is the provenance the cell identity and the
record carry (each local file's resolved path and sha256, or a built-in's hub dataset and
revision). Both read a file once per (path, size, mtime) in a process: :func:`file_stamp` keys
their caches. :func:`check_context` refuses a task with an example longer than the model's
context (lm-eval would cut it from the left and score the rest). Built on
:mod:`harness.evaluate.task_catalog`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.evaluate.task_catalog import (
    LOCAL_TASKS,
    builtin_index,
    builtin_task_names,
    config_version,
    is_local,
    lm_eval_version,
    task_files,
    task_version,
    unknown_task_error,
    yaml_config,
)
from harness.evaluate.task_formats import jsonl_lines

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ file checking
def file_stamp(path: Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime_ns): the key of the per-file caches (and of materializing)."""
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


Label = tuple[str, str | int] | None  # (gold field, choices field or their number)


def _label_problem(value: object, n_choices: int) -> str:
    """Why a gold label does not index one of ``n_choices`` choices ("" when it does).

    Why: lm-eval scores a label outside the choices as wrong for every model (or fails
    deep inside an evaluation), so a bad data file would give a plausible accuracy.
    """
    number = value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        number = int(value.strip())
    allowed = ", ".join(map(str, range(n_choices))) if n_choices else "none (no choices)"
    if isinstance(number, bool) or not isinstance(number, int):
        return f"label {value!r} is not an integer; allowed: {allowed}"
    if not 0 <= number < n_choices:
        return f"label {value!r} is not one of the {n_choices} choices; allowed: {allowed}"
    return ""


def _check_doc_label(doc: dict, label: Label) -> str:
    if label is None or label[0] not in doc:
        return ""
    field, choices = label
    n = choices if isinstance(choices, int) else len(doc.get(choices) or ())
    problem = _label_problem(doc[field], n)
    return f"field {field!r}: {problem}" if problem else ""


def _check_jsonl(
    path: Path, schema: Mapping[str, type | tuple[type, ...]], label: Label = None
) -> int:
    """Number of documents in ``path``; raises one line naming the file, line and problem
    (a missing or mistyped field, or a gold label that indexes no choice)."""
    count = 0
    try:
        for number, line in jsonl_lines(path):
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
            problem = _check_doc_label(doc, label)
            if problem:
                raise ValueError(f"{where}: {problem}")
            count += 1
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if count == 0:
        raise ValueError(f"{path}: empty file (no documents)")
    return count


def _check_labels(path: Path, label: Label = None) -> int:
    """Number of integer labels in a ``.lst`` file (one a line), each indexing a choice when
    the task fixes their number."""
    count = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                if not re.fullmatch(r"-?\d+", line.strip()):
                    raise ValueError(f"{path}:{number}: label {line.strip()[:40]!r} is not an int")
                if label is not None and isinstance(label[1], int):
                    problem = _label_problem(int(line.strip()), label[1])
                    if problem:
                        raise ValueError(f"{path}:{number}: {problem}")
                count += 1
    if count == 0:
        raise ValueError(f"{path}: empty file (no labels)")
    return count


_VERDICTS: dict[tuple, int] = {}  # (path, size, mtime_ns, schema) -> number of records


def _check_file(
    path: Path, schema: Mapping[str, type | tuple[type, ...]], label: Label = None
) -> int:
    """Records in a task file, checked once per (path, size, mtime) in this process."""
    key = (*file_stamp(path), tuple(sorted(schema)), label)
    if key not in _VERDICTS:
        _VERDICTS[key] = (
            _check_labels(path, label)
            if path.suffix == ".lst"
            else _check_jsonl(path, schema, label)
        )
    return _VERDICTS[key]


def check_files(
    names: Iterable[str],
    data_root: str | os.PathLike | None,
    model_dir: str | os.PathLike | None,
) -> None:
    """Raise one line if a local task's files are missing, empty or hold an invalid line (a
    missing or mistyped field, or a gold label outside the choices: file, line, value and the
    allowed labels named).

    Called by the runner's validation, before any model loads. Each file is read once per
    (path, size, mtime) in a process; later calls cost a ``stat``.
    """
    for name in names:
        task = LOCAL_TASKS.get(name)
        if task is None:
            raise unknown_task_error(name, LOCAL_TASKS)
        files = task_files([name], data_root, model_dir)
        counts = {f: _check_file(f, task.schema, task.label) for f in files}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{n} in {f}" for f, n in counts.items())
            raise ValueError(f"task={name!r}: files disagree on the number of documents: {listed}")


# ------------------------------------------------------------------- fitting the model's context
# Tokens a tokenizer may add to a string beyond one per UTF-8 byte (a BOS token, a
# SentencePiece dummy prefix): a byte-level or SentencePiece tokenizer never gives more
# tokens than bytes + this, so a short example is known to fit without tokenizing it.
_SPECIAL_SLACK = 2


def model_max_length(model_dir: str | os.PathLike) -> int:
    """The context lm-eval gives a model folder (``HFLM.max_length``), read from its files.

    lm-eval's own rule (``resolve_max_length``) on config.json (``n_positions``,
    ``max_position_embeddings``, ``n_ctx``; a nested ``text_config`` first), then the
    tokenizer's ``model_max_length``, then lm-eval's default of 2048. No weights are read.
    """
    from types import SimpleNamespace

    from lm_eval.models.utils import DEFAULT_MAX_LENGTH, resolve_max_length

    folder = Path(model_dir)
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text = raw.get("text_config")
    config = SimpleNamespace(**{**raw, "text_config": SimpleNamespace(**text) if
                                isinstance(text, dict) else None})  # fmt: skip
    tok_file = folder / "tokenizer_config.json"
    tok_raw = json.loads(tok_file.read_text(encoding="utf-8")) if tok_file.is_file() else {}
    tokenizer = SimpleNamespace(model_max_length=tok_raw.get("model_max_length"))
    return resolve_max_length(config, tokenizer, default=DEFAULT_MAX_LENGTH)


@dataclass(frozen=True)
class ContextFit:
    """How a task's examples compare with a model's context (lm-eval's ``max_length``).

    ``over``: examples (documents) with a request longer than ``context + 1`` tokens, the
    point past which lm-eval cuts the request from the left; ``longest``: tokens of the
    longest such request (0 when none is over).
    """

    task: str
    examples: int
    over: int
    longest: int
    context: int

    def problem(self, root: str) -> str:
        """The one-line refusal ("" when every example fits)."""
        if not self.over:
            return ""
        hint = (
            "for a zoo model, run kbit-zoo for its family again: it refits the evaluation "
            "files to the context and keeps the weights"
            if root == "model"
            else "use a model with a longer context, or leave the task out of eval.tasks"
        )
        return (
            f"task={self.task!r}: {self.over} of {self.examples} examples are longer than the "
            f"model's context (the longest is {self.longest} tokens, the context "
            f"{self.context} tokens), and lm-eval would score them cut from the left; {hint}"
        )


_TOKENIZERS: dict[tuple, Any] = {}
_FITS: dict[tuple, ContextFit] = {}


def _tokenizer_stamp(folder: Path) -> tuple:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return tuple(file_stamp(folder / n) for n in names if (folder / n).is_file())


def _folder_tokenizer(folder: Path, stamp: tuple) -> Any:
    from transformers import AutoTokenizer

    key = (str(folder.resolve()), stamp)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
    return _TOKENIZERS[key]


def _examples_evaluated(total: int, limit: int | float | None) -> int:
    """How many of ``total`` documents lm-eval evaluates under ``limit`` (its own rule:
    a fraction below 1 is rounded up, anything else is a count)."""
    if limit is None:
        return total
    return min(total, math.ceil(total * limit) if limit < 1.0 else int(limit))


def context_fit(
    name: str,
    data_root: str | os.PathLike | None,
    model_dir: str | os.PathLike,
    limit: int | float | None = None,
) -> ContextFit | None:
    """How the examples of local task ``name`` fit the context of the model in ``model_dir``.

    Each document's requests (``LocalTask.pairs``) are measured as lm-eval 0.4 measures a
    causal request: ``context + continuation`` encoded whole by the model's tokenizer (its
    default special tokens, as lm-eval's HFLM). A request no longer in UTF-8 bytes than the
    context (less :data:`_SPECIAL_SLACK`) fits without tokenizing, so a large model on the
    paper's tasks costs a read of the files; the others are encoded in one batch. ``limit``:
    ``eval.limit`` (only the first documents are evaluated, and checked). Memoised per (file,
    tokenizer, context, limit). None when it cannot be told here (no pairs rule, no
    config.json, a tokenizer that does not load: the run is left to lm-eval).
    """
    task = LOCAL_TASKS.get(name)
    folder = Path(model_dir)
    if task is None or task.pairs is None or not (folder / "config.json").is_file():
        return None
    context = model_max_length(folder)
    first = task_files([name], data_root, model_dir)[0]
    tok_stamp = _tokenizer_stamp(folder)
    key = (name, file_stamp(first), tok_stamp, context, limit)
    if key in _FITS:
        return _FITS[key]
    lines = [line for _, line in jsonl_lines(first)]
    lines = lines[: _examples_evaluated(len(lines), limit)]
    bound = context + 1  # lm-eval cuts past max_length + 1 tokens (the last one is not input)
    texts: list[str] = []
    owner: list[int] = []  # the document of each text that needs tokenizing
    for number, line in enumerate(lines):
        for c, t in task.pairs(json.loads(line)):
            if len((c + t).encode("utf-8")) + _SPECIAL_SLACK > bound:
                texts.append(c + t)
                owner.append(number)
    longest: dict[int, int] = {}
    if texts:
        try:
            tokenizer = _folder_tokenizer(folder, tok_stamp)
        except Exception as exc:  # any tokenizer failure: leave it to the run
            log.warning("tokenizer of %s not loaded for the context check (%s: %s)",
                        folder, type(exc).__name__, exc)  # fmt: skip
            return None
        for doc, ids in zip(owner, tokenizer(texts, verbose=False).input_ids, strict=True):
            if len(ids) > bound:
                longest[doc] = max(longest.get(doc, 0), len(ids))
    _FITS[key] = ContextFit(name, len(lines), len(longest), max(longest.values(), default=0),
                            context)  # fmt: skip
    return _FITS[key]


def check_context(
    names: Iterable[str],
    data_root: str | os.PathLike | None,
    model_dir: str | os.PathLike | None,
    limit: int | float | None = None,
    *,
    roots: Iterable[str] = ("data", "model"),
) -> None:
    """Raise one line when a local task holds an example longer than the model's context.

    Why refuse rather than score: lm-eval cuts an over-long request from the left and scores
    what remains, without failing; a zoo model of context 64 was so scored on 80-token
    passages. The line names the task, how many examples are over, the longest in tokens and
    the context. For the runner's validation (after :func:`check_files`, before any model
    loads: config.json and the tokenizer are read, not the weights; ``limit`` = ``eval.limit``)
    and, for the zoo tasks (``roots=("model",)``), as a guard in
    :func:`harness.evaluate.tasks.materialize`. A hub model id (no local folder) is skipped.
    """
    if model_dir is None:
        return
    roots = set(roots)
    for name in names:
        task = LOCAL_TASKS.get(name)
        if task is None or task.root not in roots:
            continue
        fit = context_fit(name, data_root, model_dir, limit)
        if fit is not None and fit.over:
            raise ValueError(fit.problem(task.root))


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
    key = file_stamp(Path(path))
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


def _builtin_source(name: str) -> TaskSource:
    """The hub source of a built-in task; groups and tags name lm-eval's release."""
    tasks, others = builtin_index()
    if name not in tasks:
        if name not in others:
            raise unknown_task_error(name, builtin_task_names() | set(LOCAL_TASKS))
        return TaskSource(f"hub:lm-eval-group/{name}@unpinned", f"lm-eval-{lm_eval_version()}")
    cfg = yaml_config(tasks[name])
    revision = (cfg.get("dataset_kwargs") or {}).get("revision")
    return TaskSource(
        hub_source(str(cfg.get("dataset_path")), cfg.get("dataset_name"), revision),
        config_version(cfg),
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
        files = task_files([name], data_root, model_dir)
        out[name] = TaskSource(local_source(files), task_version(LOCAL_TASKS[name]))
    return out
