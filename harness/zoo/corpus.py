"""Training corpora: a folder of .txt files, or the small corpus shipped inside the package.

Documents are files. Held-out documents are chosen by a hash of the file name, so the split
does not depend on listing order, on the seed, or on which other files are present, and a
book is never split between training and evaluation. Text is normalized the same way for
training and for the evaluation files: hard-wrapped lines are joined into paragraphs.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from harness.zoo.config import ZooConfigError

log = logging.getLogger(__name__)

# Ten short public-domain books (Project Gutenberg, first published before 1929; see
# harness/zoo/corpus/MANIFEST.tsv), gzipped: the corpus that exists on any machine.
PACKAGED_CORPUS = Path(__file__).resolve().parent / "corpus"
PACKAGED_NAME = "kbit-packaged-gutenberg10"


@dataclass
class Document:
    """One file of the corpus, normalized."""

    name: str
    text: str


@dataclass
class Corpus:
    """A split corpus; ``hash`` is the sha256 of names and raw bytes (the cache key)."""

    name: str
    source: str
    hash: str
    train: list[Document]
    heldout: list[Document]


def normalize(text: str) -> str:
    """Join hard-wrapped lines; keep paragraph breaks as one blank line."""
    text = text.replace("\r\n", "\n").replace("\u00a0", " ")
    paragraphs = re.split(r"\n\s*\n", text)
    joined = (" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs)
    return "\n\n".join(re.sub(r"[ \t]+", " ", p) for p in joined if p)


def _read_files(folder: Path) -> list[tuple[str, bytes]]:
    files = sorted(folder.glob("*.txt")) + sorted(folder.glob("*.txt.gz"))
    out = []
    for path in files:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        out.append((path.name.removesuffix(".gz"), raw))
    return sorted(out)


def _heldout_rank(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def corpus_folder(corpus: str | Path | None) -> Path:
    """The folder a family reads (None = the packaged corpus); checked to exist."""
    folder = Path(corpus) if corpus is not None else PACKAGED_CORPUS
    if not folder.is_dir():
        raise ZooConfigError(
            f"zoo config field corpus={str(folder)!r} is not a folder; allowed: a folder of "
            ".txt files, or null (the packaged corpus)"
        )
    return folder


def _nonempty_files(folder: Path) -> list[tuple[str, bytes]]:
    files = [(n, raw) for n, raw in _read_files(folder) if raw.strip()]
    if len(files) < 2:
        raise ZooConfigError(
            f"zoo config field corpus={str(folder)!r} has {len(files)} non-empty .txt file(s); "
            "allowed: a folder of at least 2 (documents are files; some are held out)"
        )
    return files


def _digest(files: list[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    for name, raw in files:
        digest.update(name.encode() + b"\0" + hashlib.sha256(raw).digest())
    return digest.hexdigest()[:16]


def corpus_hash(corpus: str | Path | None) -> str:
    """Content hash of a corpus (file names + bytes): cheap, so resolve_model can call it."""
    return _digest(_nonempty_files(corpus_folder(corpus)))


def corpus_name(corpus: str | Path | None) -> str:
    """Short human name of a corpus for model cards."""
    return PACKAGED_NAME if corpus is None else Path(corpus).name


def load_corpus(corpus: str | Path | None, heldout_fraction: float, min_heldout: int = 2) -> Corpus:
    """Read, hash, normalize and split a corpus folder (None = the packaged corpus)."""
    folder = corpus_folder(corpus)
    files = _nonempty_files(folder)
    n_held = min(len(files) - 1, max(min_heldout, round(heldout_fraction * len(files))))
    held_names = set(sorted((n for n, _ in files), key=_heldout_rank)[:n_held])
    docs = [Document(n, normalize(raw.decode("utf-8", errors="replace"))) for n, raw in files]
    log.info("corpus %s: %d documents, %d held out", corpus_name(corpus), len(docs), n_held)
    return Corpus(
        name=corpus_name(corpus),
        source=str(folder),
        hash=_digest(files),
        train=[d for d in docs if d.name not in held_names],
        heldout=[d for d in docs if d.name in held_names],
    )


def training_text(corpus: Corpus, max_chars: int | None) -> list[str]:
    """Training documents, each cut to an equal share of ``max_chars`` (None = all)."""
    if max_chars is None:
        return [d.text for d in corpus.train]
    share = max(1, max_chars // len(corpus.train))
    return [d.text[:share] for d in corpus.train]
