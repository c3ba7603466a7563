"""Where a built zoo family lives, and the hashes that name it: read without training anything.

Layout (written by :mod:`harness.zoo.build`)::

    <zoo_dir>/<family>-<family_hash>/family.json     # manifest: config + one entry per size
    <zoo_dir>/<family>-<family_hash>/<size>/         # a complete HF model folder
    <zoo_dir>/<family>-<family_hash>/<size>/checkpoints/<label>/   # earlier checkpoints

Why a module apart from the builder: resolving ``zoo:<family>/<size>`` (harness.zoo.resolve,
which harness.models.files calls for every cell) needs only these paths and hashes, never
torch, the trainer or harness.models; with them in the builder the zoo and the model loader
imported each other (the builder counts a model's parameters with harness.models.loading).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.files import PathError, user_path
from harness.zoo.config import (
    ZOO_DIR_ENV,
    ZOO_FORMAT_VERSION,
    FamilyConfig,
    SizeConfig,
    TokenizerConfig,
    ZooConfigError,
    load_family_config,
)
from harness.zoo.corpus import corpus_hash

CHECKPOINTS_DIR = "checkpoints"  # <size>/checkpoints/<label>/: a model folder per checkpoint


class ZooModelNotBuiltError(FileNotFoundError):
    """A zoo:<family>/<size> spec has no complete build for the current config."""


@dataclass
class FamilyPaths:
    """Where a family lives and under which hashes."""

    cfg: FamilyConfig
    zoo_dir: Path
    corpus_hash: str
    tokenizer_key: str
    hash: str

    @property
    def folder(self) -> Path:
        return self.zoo_dir / f"{self.cfg.name}-{self.hash}"

    def size_folder(self, size: SizeConfig) -> Path:
        return self.folder / size.name

    def is_built(self, size: SizeConfig) -> bool:
        meta = self.size_folder(size) / "kbit_zoo.json"
        return meta.is_file() and json.loads(meta.read_text()).get("size_hash") == size_hash(
            self.hash, size
        )


def family_paths(
    cfg: FamilyConfig, zoo_dir: str | Path | None, c_hash: str | None = None
) -> FamilyPaths:
    """Hash a family without training anything (the corpus is read, not tokenized).

    ``zoo_dir`` goes through :func:`zoo_dir_path` (``~`` and ``$VAR``
    expanded); ``c_hash``, when the caller has it, saves reading the corpus again.
    """
    zoo = zoo_dir_path(zoo_dir)
    c_hash = c_hash or corpus_hash(cfg.corpus)
    t_key = tokenizer_key(cfg.tokenizer, c_hash, cfg.max_train_chars)
    return FamilyPaths(cfg, zoo, c_hash, t_key, family_hash(cfg, c_hash, t_key))


def family_sizes(name: str) -> list[str]:
    """Size names of a shipped family, smallest first as listed in its YAML."""
    return [s.name for s in load_family_config(name).sizes]


def tokenizer_key(cfg: TokenizerConfig, corpus_hash: str, max_chars: int | None) -> str:
    """Cache key: what the tokenizer depends on (file content for a given tokenizer file)."""
    if cfg.kind == "file":
        return "file-" + hashlib.sha256(Path(str(cfg.path)).read_bytes()).hexdigest()[:12]
    return f"bpe{cfg.vocab_size}-" + stable_hash([corpus_hash, max_chars, cfg.vocab_size])


def stable_hash(obj: Any, length: int = 12) -> str:
    """Short sha256 of a JSON-serializable object with sorted keys (stable across runs)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def family_hash(cfg: FamilyConfig, corpus_hash: str, tokenizer_hash: str) -> str:
    """Hash of everything shared by the sizes; the corpus enters by content, not by path."""
    shared = asdict(cfg)
    for key in ("name", "description", "sizes", "corpus"):
        shared.pop(key)
    if not shared["checkpoints"]:  # families without checkpoints keep the hash they had
        shared.pop("checkpoints")
    shared["tokenizer"] = tokenizer_hash
    return stable_hash({"v": ZOO_FORMAT_VERSION, "cfg": shared, "corpus": corpus_hash})


def size_hash(fam_hash: str, size: SizeConfig) -> str:
    """Hash of one size within its family (stored in the size folder's kbit_zoo.json)."""
    return stable_hash({"family": fam_hash, "size": asdict(size)})


def zoo_dir_path(zoo_dir: str | os.PathLike | None) -> Path:
    """The folder a ``zoo_dir`` value means (None = :func:`default_zoo_dir`).

    ``$VAR`` and ``~`` are expanded by :func:`harness.files.user_path`, so the folder checked
    is the folder written (``zoo_dir=~/z`` is ``$HOME/z``, never a literal ``./~``).
    """
    if zoo_dir is None:
        return default_zoo_dir()
    try:
        return user_path(zoo_dir, "zoo_dir")
    except PathError as err:
        raise ZooConfigError(str(err)) from None


def default_zoo_dir() -> Path:
    """Same default as conf/config.yaml's zoo_dir: $KBIT_ZOO_DIR or ~/.cache/kbit/zoo."""
    env = os.environ.get(ZOO_DIR_ENV)
    if not env:
        return Path.home() / ".cache" / "kbit" / "zoo"
    try:
        return user_path(env, ZOO_DIR_ENV)
    except PathError as err:
        raise ZooConfigError(str(err)) from None
