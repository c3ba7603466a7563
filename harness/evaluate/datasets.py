"""Perplexity texts by name or path, and their tokenization (cached per tokenizer and text).

Names resolve against ``data_root`` (a folder laid out like ``shared/data``: ``eval/<name>/``);
with no data root they come from the Hugging Face Hub the way GPTQ builds them. A name that is
not known is taken as a local text file, or a folder whose ``*.txt`` files are joined. A path
starting with ``model:`` is relative to the model's own folder (the zoo's ``kbit_eval/``) and
must stay inside it (no ``..``, no absolute path). Other paths and ``data_root`` go through
:func:`harness.files.user_path` (``$VAR`` and ``~`` expanded): the path checked is the path read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from harness.evaluate.task_data import TaskSource, local_source
from harness.files import atomic_output, user_path
from harness.models.files import escapes_folder
from harness.names import unknown_name

log = logging.getLogger(__name__)


def _hub_wikitext2() -> str:
    from datasets import load_dataset

    rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    return "\n\n".join(rows)  # GPTQ's exact construction


def _hub_ptb() -> str:
    from datasets import load_dataset

    rows = load_dataset("ptb_text_only", "penn_treebank", split="test")["sentence"]
    return " ".join(rows)  # GPTQ's get_ptb


# name -> (file under data_root, hub loader)
DATASETS: dict[str, tuple[str, Callable[[], str]]] = {
    "wikitext2": ("eval/wikitext2/test.txt", _hub_wikitext2),
    "ptb": ("eval/ptb/test.txt", _hub_ptb),
}
# name -> the hub dataset its loader reads (provenance; keep in step with the loaders above)
HUB_SOURCES = {"wikitext2": "hub:wikitext/wikitext-2-raw-v1@unpinned",
               "ptb": "hub:ptb_text_only/penn_treebank@unpinned"}  # fmt: skip
TEXT_VERSION = "gptq-1"  # how the text is built from its rows (GPTQ's joins); bump on change
MODEL_PREFIX = "model:"


def resolve_text_path(
    name: str,
    path: str | None = None,
    data_root: str | os.PathLike | None = None,
    model_dir: str | os.PathLike | None = None,
) -> Path | None:
    """The local file/folder of a dataset, None for a hub dataset; raises if it is missing."""
    target = path or name
    if target.startswith(MODEL_PREFIX):
        if model_dir is None:
            raise ValueError(
                f"perplexity dataset {name!r}: path {target!r} needs a local model folder"
            )
        inner = target[len(MODEL_PREFIX) :]
        if not inner.strip() or escapes_folder(inner):
            raise ValueError(
                f"perplexity dataset {name!r}: path {target!r} leaves the model folder "
                f"{str(model_dir)!r}; allowed: model:<a path inside the model folder>"
            )
        resolved = Path(model_dir) / inner
    elif path is None and name in DATASETS:
        if data_root is None:
            return None
        resolved = user_path(data_root, "data_root") / DATASETS[name][0]
    else:
        resolved = user_path(target, f"perplexity dataset {name!r} path")
        if not resolved.exists() and path is None:
            raise unknown_name("perplexity dataset", name, DATASETS,
                               what="known names (or an existing file or folder)")  # fmt: skip
    if not resolved.exists():
        raise ValueError(f"perplexity dataset {name!r}: data file {str(resolved)!r} does not exist")
    check_text_file(name, resolved)
    return resolved


def text_files(name: str, resolved: Path) -> list[Path]:
    """The files a resolved text path stands for: itself, or a folder's ``*.txt`` (sorted)."""
    if not resolved.is_dir():
        return [resolved]
    files = sorted(resolved.glob("*.txt"))
    if not files:
        raise ValueError(f"perplexity dataset {name!r}: folder {resolved} has no *.txt files")
    return files


_VERDICTS: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) of files found valid


def _check_one(name: str, file: Path) -> None:
    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
    if key in _VERDICTS:
        return
    if st.st_size == 0:
        raise ValueError(f"perplexity dataset {name!r}: {file} is empty")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"perplexity dataset {name!r}: {file} is not UTF-8 text "
                         f"({exc.reason} at byte {exc.start})") from None  # fmt: skip
    if not text.strip():
        raise ValueError(f"perplexity dataset {name!r}: {file} holds only whitespace")
    _VERDICTS.add(key)


def check_text_file(name: str, resolved: Path) -> None:
    """Raise one line if a text file (or a folder's ``*.txt``) is empty or not UTF-8.

    Run by :func:`resolve_text_path`, i.e. by the runner's validation before any model
    loads; each file is read once per (path, size, mtime) in a process.
    """
    for file in text_files(name, resolved):
        _check_one(name, file)


def text_source(
    name: str,
    path: str | None = None,
    data_root: str | os.PathLike | None = None,
    model_dir: str | os.PathLike | None = None,
) -> TaskSource:
    """Where a perplexity text comes from (local files with their sha256, or the hub)."""
    resolved = resolve_text_path(name, path, data_root, model_dir)
    if resolved is None:
        return TaskSource(HUB_SOURCES[name], TEXT_VERSION)
    return TaskSource(local_source(text_files(name, resolved)), TEXT_VERSION)


def load_text(
    name: str,
    path: str | None = None,
    data_root: str | os.PathLike | None = None,
    model_dir: str | os.PathLike | None = None,
) -> str:
    """The evaluation text of a dataset (see the module docstring for how names resolve)."""
    resolved = resolve_text_path(name, path, data_root, model_dir)
    if resolved is None:
        return DATASETS[name][1]()
    if resolved.is_dir():
        return "\n\n".join(f.read_text(encoding="utf-8") for f in text_files(name, resolved))
    return resolved.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------ tokenization
_MEMORY: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
_MEMORY_SLOTS = 8


def tokenizer_fingerprint(tokenizer: object) -> str:
    """A hash of everything that decides the token ids (vocab, merges, pre/post-processing)."""
    cached = getattr(tokenizer, "_kbit_fingerprint", None)
    if cached:
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = repr(sorted(tokenizer.get_vocab().items())) + repr(tokenizer.init_kwargs)
    digest = hashlib.sha256((type(tokenizer).__name__ + payload).encode()).hexdigest()[:16]
    with contextlib.suppress(AttributeError):
        tokenizer._kbit_fingerprint = digest
    return digest


def _cache_dir() -> Path:
    root = os.environ.get("KBIT_CACHE_DIR") or Path.home() / ".cache" / "kbit"
    return Path(root) / "tokens"


def token_ids(tokenizer: object, text: str, *, disk_cache: bool = True) -> torch.Tensor:
    """Token ids (1-D int64) of the whole text, tokenized once; cached in memory and on disk."""
    key = (tokenizer_fingerprint(tokenizer), hashlib.sha256(text.encode()).hexdigest()[:24])
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    file = _cache_dir() / f"{key[0]}-{key[1]}.npy"
    ids = None
    if disk_cache and file.is_file():
        try:
            ids = torch.from_numpy(np.load(file)).long()
        except (OSError, ValueError):
            log.warning("token cache %s unreadable; tokenizing again", file)
    if ids is None:
        ids = tokenizer(text, return_tensors="pt").input_ids[0].long()
        if disk_cache:
            _save_atomic(file, ids.numpy())
    _MEMORY[key] = ids
    while len(_MEMORY) > _MEMORY_SLOTS:
        _MEMORY.popitem(last=False)
    return ids


def _save_atomic(file: Path, array: np.ndarray) -> None:
    try:
        with atomic_output(file) as fh:
            np.save(fh, array)
    except OSError as exc:  # a read-only home must not fail an evaluation
        log.warning("could not cache tokens at %s: %s", file, exc)
