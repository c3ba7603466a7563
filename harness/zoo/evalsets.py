"""Held-out evaluation files written into every model folder (``kbit_eval/``).

- ``heldout.txt``: held-out documents for perplexity (normalized like the training text).
- ``mc.jsonl``: "which continuation is the real one". A held-out sentence is cut after a
  random word: ``query`` is the preceding sentences plus the sentence's head, ``choices`` holds
  its true ending and endings of other sentences drawn from *other* held-out documents (from
  far away in the same one if only one is held out), matched in length. Score
  ``query + " " + choice``. The true ending shares a name or rare word with the query; the
  distractors come from the same pool of endings, so a model that ignores the query scores
  chance in expectation, while grammar at the cut and names/topic reward a model that reads it.
- ``lastword.jsonl``: LAMBADA-style ``{"text": ...}``; the target is the last
  whitespace-separated word, a word that already occurred in the passage (so it can be
  predicted from context) and is not one of the corpus' most frequent words.

Everything is drawn with a seeded ``random.Random``, so the files are reproducible.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from harness.zoo.config import EvalSetsConfig
from harness.zoo.corpus import Document

_ABBREV = {"mr", "mrs", "dr", "st", "messrs", "mme", "mlle", "sr", "jr", "capt", "col", "gen",
           "rev", "prof", "lieut", "no", "vol", "ch", "i.e", "e.g", "viz", "etc"}  # fmt: skip
_SPLIT = re.compile(r"(?<=[.!?])([\"'”’)]*)\s+(?=[\"'“‘(]*[A-Z])")
_WORD = re.compile(r"^[A-Za-z]+$")


def sentences(text: str) -> list[str]:
    """Split normalized text into sentences (paragraph breaks end a sentence)."""
    out: list[str] = []
    for para in text.split("\n\n"):
        pieces, start = [], 0
        for m in _SPLIT.finditer(para):
            pieces.append(para[start : m.end(1)])
            start = m.end()
        pieces.append(para[start:])
        merged: list[str] = []
        for piece in pieces:
            last = merged[-1].rstrip(".").split()[-1].lower() if merged else ""
            if merged and (last in _ABBREV or len(last) == 1):
                merged[-1] = f"{merged[-1]} {piece}"
            else:
                merged.append(piece)
        out.extend(s.strip() for s in merged if s.strip())
    return out


_STRIP = ".,;:!?\"'“”‘’()[]_-—"


def _common_words(docs: list[Document], n: int) -> set[str]:
    freq = Counter(w.lower().strip(_STRIP) for d in docs for w in d.text.split())
    return {w for w, _ in freq.most_common(n)}


def _content_words(text: str, common: set[str]) -> set[str]:
    words = (w.lower().strip(_STRIP) for w in text.split())
    return {w for w in words if len(w) >= 4 and w not in common}


def make_heldout_text(docs: list[Document], n_chars: int) -> str:
    """The first ``n_chars`` of the held-out documents, each given an equal share."""
    share = max(1, n_chars // len(docs))
    return "\n\n".join(d.text[:share] for d in docs)


def _pick_distractors(
    rng: random.Random, pool: list[tuple[int, int, str]], doc: int, pos: int, true: str, k: int
) -> list[str]:
    """k endings from other documents (or >= 200 sentences away) closest in length to ``true``.

    Matching the length in characters keeps both the summed and the length-normalized
    log-likelihood rules free of a length bias.
    """
    multi_doc = pool[0][0] != pool[-1][0]  # pool is ordered by document
    sample = rng.sample(pool, min(len(pool), 64))
    ok = [e for d, p, e in sample if (d != doc if multi_doc else abs(p - pos) >= 200) and e != true]
    ok = list(dict.fromkeys(ok))  # no duplicate choices
    return sorted(ok, key=lambda e: abs(len(e) - len(true)))[:k]


def _mc_candidates(
    per_doc: list[list[str]], common: set[str], cfg: EvalSetsConfig, rng: random.Random
) -> list[tuple[int, int, str, str]]:
    """(doc, sentence index, query, true ending) of every eligible sentence.

    A sentence of 8-30 words is cut after a random word between its first third and its
    last four words: the query is the preceding sentences plus the head, the true ending is
    the rest. Kept only where the ending shares a name or rare word with the query.
    """
    out = []
    for i, sents in enumerate(per_doc):
        for j in range(1, len(sents)):
            words = sents[j].split()
            if not 8 <= len(words) <= 30:
                continue
            cut = rng.randint(max(3, len(words) // 3), len(words) - 4)
            ctx = [" ".join(words[:cut])]
            for prev in sents[j - 1 :: -1] if j else []:
                if len(" ".join([prev, *ctx])) > cfg.mc_context_chars and len(ctx) > 1:
                    break
                ctx.insert(0, prev)
            query, ending = " ".join(ctx), " ".join(words[cut:])
            if len(query) <= 2 * cfg.mc_context_chars and (
                _content_words(ending, common) & _content_words(query, common)
            ):
                out.append((i, j, query, ending))
    return out


def make_mc(docs: list[Document], cfg: EvalSetsConfig, seed: int) -> list[dict]:
    """Items {"query", "choices", "gold"} for "which continuation is the real one".

    Distractors are endings of eligible sentences of other documents, drawn from the same
    pool as the true endings and matched in length, so a model that ignores the query
    scores chance in expectation.
    """
    rng = random.Random(f"mc-{seed}")
    per_doc = [sentences(d.text) for d in docs]
    candidates = _mc_candidates(per_doc, _common_words(docs, 100), cfg, rng)
    pool = [(i, j, ending) for i, j, _, ending in candidates]
    rng.shuffle(candidates)
    items = []
    for i, j, query, true in candidates[: 2 * cfg.mc_items]:
        distractors = _pick_distractors(rng, pool, i, j, true, cfg.mc_choices - 1)
        if len(distractors) < cfg.mc_choices - 1:
            continue
        gold = rng.randrange(cfg.mc_choices)
        choices = [*distractors[:gold], true, *distractors[gold:]]
        items.append({"query": query, "choices": choices, "gold": gold})
        if len(items) >= cfg.mc_items:
            break
    return items


def make_lastword(docs: list[Document], cfg: EvalSetsConfig, seed: int) -> list[dict]:
    """LAMBADA-style passages whose last word already occurred in the passage."""
    rng = random.Random(f"lastword-{seed}")
    words_per_doc = [d.text.split() for d in docs]
    common = _common_words(docs, 100)
    n = cfg.lastword_words
    spots = [(i, j) for i, ws in enumerate(words_per_doc) for j in range(n, len(ws))]
    items: list[dict] = []
    seen: set[tuple[int, int]] = set()
    for _ in range(100 * cfg.lastword_items):
        if len(items) >= cfg.lastword_items or len(seen) >= len(spots):
            break
        i, j = spots[rng.randrange(len(spots))]
        if (i, j) in seen:
            continue
        seen.add((i, j))
        w = words_per_doc[i][j].rstrip(".,;:!?\"'”’)")
        if len(w) < 3 or not _WORD.match(w) or w.lower() in common:
            continue
        context = words_per_doc[i][j - n : j]
        if any(c.strip(".,;:!?\"'“”‘’()") == w for c in context):
            items.append({"text": " ".join([*context, w])})
    return items


def write_eval_sets(docs: list[Document], cfg: EvalSetsConfig, seed: int, out: Path) -> dict:
    """Write heldout.txt, mc.jsonl and lastword.jsonl into ``out``; return their counts."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout.txt").write_text(make_heldout_text(docs, cfg.heldout_chars), encoding="utf-8")
    counts = {"heldout_chars": cfg.heldout_chars}
    for name, items in (
        ("mc", make_mc(docs, cfg, seed)),
        ("lastword", make_lastword(docs, cfg, seed)),
    ):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
        counts[f"{name}_items"] = len(items)
    (out / "counts.json").write_text(json.dumps(counts))
    return counts
