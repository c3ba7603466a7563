"""kbit's local lm-eval task definitions, for offline use.

Each task keeps lm-eval's built-in *name* and prompt format but reads its documents from a
data root laid out like ``shared/data/eval`` (or, for the zoo tasks, from the model folder's
``kbit_eval/``). :func:`materialize` writes the resolved task YAMLs (and any converted jsonl,
e.g. PIQA joined with its label file) into a cache folder; that folder is what kbit passes to
``TaskManager(include_path=...)`` and what the ``lm_eval`` command line takes as
``--include_path``, so both evaluate exactly the same documents and prompts::

    python -m harness.evaluate --data-root ../shared/data --out /tmp/kbit_tasks
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)
TASKS_VERSION = "2"  # bump when a definition changes: the cache folder name includes it

_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_ACC_NORM = [*_ACC, {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
# Prompts are precomputed into columns by each task's ``convert`` (same strings as lm-eval's
# Jinja templates, e.g. lambada's "{{text.split(' ')[:-1]|join(' ')}}"): lm-eval compiles a
# template per document, which cost more than the forward passes of a small model.
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


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag ``preprocess`` (the shared file has most of it applied already)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _convert_lastword(files: list[Path]) -> list[dict]:
    """LAMBADA format: everything before the last space-separated word, then " " + that word."""
    out = []
    for d in _read_jsonl(files[0]):
        words = d["text"].split(" ")
        out.append({**d, "context": " ".join(words[:-1]), "target": " " + words[-1]})
    return out


def _convert_piqa(files: list[Path]) -> list[dict]:
    docs = _read_jsonl(files[0])
    labels = files[1].read_text().split()
    if len(labels) != len(docs):
        raise ValueError(f"piqa: {len(docs)} docs but {len(labels)} labels in {files[1]}")
    return [
        {
            **d,
            "label": int(lab),
            "prompt": f"Question: {d['goal']}\nAnswer:",
            "choices": [d["sol1"], d["sol2"]],
        }
        for d, lab in zip(docs, labels, strict=True)
    ]


def _convert_arc(files: list[Path]) -> list[dict]:
    return [{**d, "prompt": f"{d['query']}\nAnswer:"} for d in _read_jsonl(files[0])]


def _convert_hellaswag(files: list[Path]) -> list[dict]:
    return [
        {
            "query": _hellaswag_clean(d["ctx"]),
            "choices": [_hellaswag_clean(e) for e in d["endings"]],
            "gold": int(d["label"]),
        }
        for d in _read_jsonl(files[0])
    ]


@dataclass(frozen=True)
class LocalTask:
    """One task: source files (relative to its root), optional conversion, lm-eval config."""

    name: str
    files: tuple[str, ...]
    config: dict
    convert: Callable[[list[Path]], list[dict]] | None = None
    root: str = "data"  # "data": under data_root; "model": under the model folder


LOCAL_TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in [
        LocalTask(
            "lambada_openai", ("eval/lambada_openai/test.jsonl",), _LASTWORD, _convert_lastword
        ),
        LocalTask(
            "piqa",
            ("eval/piqa/valid.jsonl", "eval/piqa/valid-labels.lst"),
            {
                **_MC,
                "doc_to_text": "prompt",  # "Question: {{goal}}\nAnswer:"
                "doc_to_target": "label",
                "doc_to_choice": "choices",  # "{{[sol1, sol2]}}"
                "metric_list": _ACC_NORM,
            },
            _convert_piqa,
        ),
        LocalTask(
            "hellaswag",
            ("eval/hellaswag/validation.jsonl",),
            {**_MC, "doc_to_text": "query", "metric_list": _ACC_NORM},
            _convert_hellaswag,
        ),
        # Partial scoring as lm-eval does it: the options are contexts, `gold` picks one (an int
        # doc_to_text means "multiple inputs"), the shared continuation is scored after each.
        LocalTask(
            "winogrande",
            ("eval/winogrande/dev.jsonl",),
            {
                "output_type": "multiple_choice",
                "doc_to_text": "gold",
                "doc_to_target": "continuation",
                "doc_to_choice": "context_options",
                "metric_list": _ACC,
            },
        ),
        LocalTask(
            "arc_easy",
            ("eval/arc/arc_easy_test.jsonl",),
            {**_MC, "doc_to_text": "prompt", "metric_list": _ACC_NORM},  # "{{query}}\nAnswer:"
            _convert_arc,
        ),
        LocalTask(
            "arc_challenge",
            ("eval/arc/arc_challenge_test.jsonl",),
            {**_MC, "doc_to_text": "prompt", "metric_list": _ACC_NORM},  # "{{query}}\nAnswer:"
            _convert_arc,
        ),
        LocalTask(
            "zoo_mc",
            ("kbit_eval/mc.jsonl",),
            {**_MC, "doc_to_text": "query", "metric_list": _ACC_NORM},
            root="model",
        ),
        LocalTask(
            "zoo_lastword", ("kbit_eval/lastword.jsonl",), _LASTWORD, _convert_lastword, "model"
        ),
    ]
}


def unknown_task_error(name: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; closest match: {close[0]!r}" if close else ""
    return ValueError(f"task={name!r} is unknown; known local tasks: {sorted(known)}{hint}")


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
    names: list[str], data_root: str | os.PathLike | None, model_dir: str | os.PathLike | None
) -> list[Path]:
    """The data files of local tasks ``names``; raises if a name or a file is unknown."""
    files = []
    for name in names:
        if name not in LOCAL_TASKS:
            raise unknown_task_error(name, list(LOCAL_TASKS))
        task = LOCAL_TASKS[name]
        root = task_root(task, data_root, model_dir)
        for rel in task.files:
            if not (root / rel).is_file():
                raise ValueError(f"task={name!r}: data file {str(root / rel)!r} does not exist")
            files.append(root / rel)
    return files


def check_files(
    names: list[str], data_root: str | os.PathLike | None, model_dir: str | os.PathLike | None
) -> None:
    """Raise if a local task's data files are missing (cheap: no reading)."""
    task_files(names, data_root, model_dir)


def _cache_root() -> Path:
    return Path(os.environ.get("KBIT_CACHE_DIR") or Path.home() / ".cache" / "kbit") / "tasks"


def _task_yaml(task: LocalTask, data_file: Path) -> dict:
    return {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        **task.config,
        "metadata": {"version": f"kbit-{TASKS_VERSION}"},
    }


def materialize(
    names: list[str],
    data_root: str | os.PathLike | None = None,
    model_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
) -> Path:
    """Write task YAMLs (+ converted data) for ``names``; returns the folder (an include_path).

    The default folder is a cache keyed by the task version, the roots and the task names,
    so concurrent cells of a sweep share it and a changed definition gets a fresh folder.
    """
    check_files(names, data_root, model_dir)
    if out_dir is None:
        key = json.dumps([TASKS_VERSION, str(data_root), str(model_dir), sorted(names)])
        out_dir = _cache_root() / hashlib.sha256(key.encode()).hexdigest()[:16]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        task = LOCAL_TASKS[name]
        files = [(task_root(task, data_root, model_dir) / f).resolve() for f in task.files]
        data_file = files[0]
        if task.convert is not None:
            data_file = out / f"{name}.jsonl"
            lines = "".join(json.dumps(d) + "\n" for d in task.convert(files))
            _write_atomic(data_file, lines)
        _write_atomic(
            out / f"{name}.yaml", yaml.safe_dump(_task_yaml(task, data_file), sort_keys=False)
        )
    return out


def _write_atomic(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    """Command line: materialize local tasks into a folder for ``lm_eval --include_path``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("KBIT_DATA_ROOT"))
    parser.add_argument("--model-dir", default=None, help="model folder, for zoo_* tasks")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tasks", default=None, help="comma-separated; default: all available")
    args = parser.parse_args(argv)
    if args.tasks:
        names = args.tasks.split(",")
    else:
        names = [
            n
            for n, t in LOCAL_TASKS.items()
            if (args.model_dir if t.root == "model" else args.data_root)
        ]
    out = materialize(names, args.data_root, args.model_dir, args.out)
    logging.basicConfig(level=logging.INFO)
    log.info("wrote %d task(s) to %s", len(names), out)


if __name__ == "__main__":
    main()
