"""The Python a local task's YAML may name: conversions, round-trip checks and request pairs.

A local task (one YAML file under ``harness/evaluate/local_tasks/``) names these functions by
dotted path in its ``kbit:`` block; a new task may name functions of its own module instead.
Three kinds, each a plain function:

- ``convert(files) -> docs``: the task's source files (``kbit.files``, resolved) as documents in
  the format the lm-eval definition reads (the hub's format for a built-in).
- ``expect(stored_row) -> {doc_to_*: value}``: what lm-eval's ``doc_to_text`` /
  ``doc_to_target`` / ``doc_to_choice`` must return on the converted document of a stored row
  (the round trip :func:`harness.evaluate.tasks.hub_docs` checks).
- ``pairs(doc) -> [(context, continuation), ...]``: the strings lm-eval scores for one line of
  the first file (lm-eval 0.4 encodes ``context + continuation`` whole); their length in tokens
  is checked against the model's context before a cell runs (task_data.check_context).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

Pairs = list[tuple[str, str]]


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
def piqa_docs(files: list[Path]) -> list[dict]:
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


def winogrande_doc(doc: dict) -> dict:
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


def winogrande_docs(files: list[Path]) -> list[dict]:
    return [winogrande_doc(d) for d in read_jsonl(files[0])]


_ARC_PREFIX = "Question: "


def arc_doc(doc: dict) -> dict:
    """``{query: "Question: ...", choices, gold}`` as an ``allenai/ai2_arc`` row."""
    if not doc["query"].startswith(_ARC_PREFIX):
        raise ValueError(f"query does not start with {_ARC_PREFIX!r}: {doc['query'][:60]!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {
        "question": doc["query"][len(_ARC_PREFIX) :],
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[int(doc["gold"])],
    }


def arc_docs(files: list[Path]) -> list[dict]:
    return [arc_doc(d) for d in read_jsonl(files[0])]


def lastword_docs(files: list[Path]) -> list[dict]:
    """Zoo last-word format: everything before the last space-separated word, then " " + it."""
    out = []
    for d in read_jsonl(files[0]):
        words = d["text"].split(" ")
        out.append({**d, "context": " ".join(words[:-1]), "target": " " + words[-1]})
    return out


# ----------------------------- what lm-eval's functions must give back on a converted document
def winogrande_expect(stored: dict) -> dict:
    return {"doc_to_text": int(stored["gold"]), "doc_to_target": stored["continuation"],
            "doc_to_choice": list(stored["context_options"])}  # fmt: skip


def arc_expect(stored: dict) -> dict:
    # The shared file stores lm-eval's prompt without its "\nAnswer:" suffix (data/README.md).
    return {"doc_to_text": stored["query"] + "\nAnswer:", "doc_to_target": int(stored["gold"]),
            "doc_to_choice": list(stored["choices"])}  # fmt: skip


# ---------------------------------------------- the (context, continuation) pairs of a document
def lastword_pairs(doc: dict) -> Pairs:
    context, _, word = doc["text"].rpartition(" ")
    return [(context, " " + word)]


def query_pairs(doc: dict) -> Pairs:
    return [(doc["query"], " " + str(c)) for c in doc["choices"]]


def arc_pairs(doc: dict) -> Pairs:
    return [(doc["query"] + "\nAnswer:", " " + str(c)) for c in doc["choices"]]


def piqa_pairs(doc: dict) -> Pairs:
    question = f"Question: {doc['goal']}\nAnswer:"
    return [(question, " " + doc["sol1"]), (question, " " + doc["sol2"])]


def hellaswag_pairs(doc: dict) -> Pairs:
    from lm_eval.tasks.hellaswag.utils import preprocess  # lm-eval's own process_docs step

    query = preprocess(
        doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    )
    return [(query, " " + preprocess(str(e))) for e in doc["endings"]]


def winogrande_pairs(doc: dict) -> Pairs:
    return [(str(option), " " + doc["continuation"]) for option in doc["context_options"]]
