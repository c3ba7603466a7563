"""Calibration text for methods that need data (GPTQ): where it comes from, and its identity.

``method.calibration`` names the source:

==========================  ===================================================================
``corpus``                  the *training* split of the public-domain corpus shipped inside
                            kbit (``harness/zoo/corpus``; the zoo's own held-out rule, so a zoo
                            model trained on it is never calibrated on its held-out books);
                            present on every machine, offline
a path                      a local text file, or a folder whose ``*.txt`` files are joined
                            (``$VAR`` and ``~`` expanded)
``hub:<dataset>[/<config>]``  a Hugging Face dataset's ``train`` split, column ``text`` (needs
                            a network; refused offline before any model loads)
==========================  ===================================================================

The source's content identity (sha256 of the file, the corpus hash, or the hub dataset) is part
of the cell id, like the evaluation data.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from harness.evaluate.datasets import check_text_file, text_files
from harness.evaluate.task_data import TaskSource, local_source
from harness.files import user_path

CORPUS = "corpus"
HUB_PREFIX = "hub:"
CALIBRATION_VERSION = "calib-1"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _offline() -> bool:
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in _OFFLINE_VARS)


def _local(source: str) -> Path:
    """The local file or folder ``source`` names (``$VAR`` and ``~`` expanded by
    :func:`harness.files.user_path`: the path checked is the path read), checked as text."""
    path = user_path(source, "method.calibration")
    if not path.exists():
        raise ValueError(
            f"method.calibration={source!r}: no such file or folder; allowed: corpus (kbit's "
            "packaged corpus, offline), a local text file or folder, or hub:<dataset>[/<config>]"
        )
    check_text_file("calibration", path)
    return path


def calibration_source(source: str) -> TaskSource:
    """The identity of a calibration source, checked without reading a model (one line)."""
    if source == CORPUS:
        from harness.zoo.corpus import PACKAGED_NAME, corpus_hash

        return TaskSource(f"kbit:{PACKAGED_NAME}/train;sha256={corpus_hash(None)}",
                          CALIBRATION_VERSION)  # fmt: skip
    if source.startswith(HUB_PREFIX):
        if _offline():
            raise ValueError(
                f"method.calibration={source!r}: no calibration data available offline "
                "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); allowed offline: corpus, or a "
                "local text file or folder"
            )
        return TaskSource(f"{source}@unpinned", CALIBRATION_VERSION)
    path = _local(source)
    return TaskSource(local_source(text_files("calibration", path)), CALIBRATION_VERSION)


@functools.lru_cache(maxsize=4)
def calibration_text(source: str) -> str:
    """The calibration text of ``source`` (see the module docstring)."""
    if source == CORPUS:
        from harness.zoo.corpus import load_corpus

        return "\n\n".join(d.text for d in load_corpus(None, heldout_fraction=0.1).train)
    if source.startswith(HUB_PREFIX):
        from datasets import load_dataset

        name, _, config = source[len(HUB_PREFIX) :].partition("/")
        rows = load_dataset(name, config or None, split="train")["text"]
        return "\n\n".join(rows)
    path = _local(source)
    return "\n\n".join(f.read_text(encoding="utf-8") for f in text_files("calibration", path))
