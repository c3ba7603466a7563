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

Every example fits the family's context: with a :class:`TokenFit` (the build passes one made
of the family's tokenizer and ``context``), an mc query loses its earliest sentences and a
last-word passage its earliest words until ``context + continuation``, tokenized as lm-eval
tokenizes it (the whole string), holds at most ``context - FIT_MARGIN`` tokens; an item that
cannot fit is dropped. Why: lm-eval cuts a longer example from the left without failing, so a
model would be scored on passages that lost the very words the task is about (the nano models,
context 64, were given 40-word passages of ~80 tokens and mc queries of up to ~180 tokens).
``counts.json`` records the recipe, the context and the longest example in tokens; the build
refits an older folder's files without retraining (:data:`RECIPE`).

Everything is drawn with a seeded ``random.Random``, so the files are reproducible.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.zoo.config import EvalSetsConfig
from harness.zoo.corpus import Document

# Version of the recipe of the files; counts.json records it. Bump when the files change for
# an unchanged config: the next build of the family rewrites them (the weights are kept).
RECIPE = 2
# Tokens kept free below the context (lm-eval truncates only past context + 1 tokens; one
# more token of slack absorbs a tokenizer that adds a special token).
FIT_MARGIN = 1


@dataclass(frozen=True)
class TokenFit:
    """The token budget of an example: ``context + continuation`` in ``max_tokens`` tokens.

    ``tokenizer``: a Hugging Face tokenizer (the family's). Counted as lm-eval 0.4 counts a
    causal request: the whole string ``context + continuation`` encoded at once.
    """

    tokenizer: Any
    max_tokens: int

    def length(self, context: str, continuation: str) -> int:
        """Tokens of ``context + continuation`` as the model reads them."""
        return len(self.tokenizer(context + continuation, verbose=False).input_ids)

    def fits(self, context: str, continuation: str) -> bool:
        return self.length(context, continuation) <= self.max_tokens


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
) -> list[tuple[int, int, list[str], str]]:
    """(doc, sentence index, query pieces, true ending) of every eligible sentence.

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
                out.append((i, j, ctx, ending))
    return out


def _fitted_query(pieces: list[str], choices: list[str], fit: TokenFit | None) -> str | None:
    """The query without its earliest sentences until every ``query + " " + choice`` fits;
    None when even the cut sentence's head does not fit with the longest choice."""
    for start in range(len(pieces)):
        query = " ".join(pieces[start:])
        if fit is None or all(fit.fits(query, " " + c) for c in choices):
            return query
    return None


def make_mc(
    docs: list[Document], cfg: EvalSetsConfig, seed: int, fit: TokenFit | None = None
) -> list[dict]:
    """Items {"query", "choices", "gold"} for "which continuation is the real one".

    Distractors are endings of eligible sentences of other documents, drawn from the same
    pool as the true endings and matched in length, so a model that ignores the query
    scores chance in expectation. ``fit``: every ``query + " " + choice`` within its budget
    (the query loses its earliest whole sentences; an item that cannot fit is dropped).
    """
    rng = random.Random(f"mc-{seed}")
    per_doc = [sentences(d.text) for d in docs]
    candidates = _mc_candidates(per_doc, _common_words(docs, 100), cfg, rng)
    pool = [(i, j, ending) for i, j, _, ending in candidates]
    rng.shuffle(candidates)
    items = []
    for i, j, pieces, true in candidates[: 2 * cfg.mc_items]:
        distractors = _pick_distractors(rng, pool, i, j, true, cfg.mc_choices - 1)
        if len(distractors) < cfg.mc_choices - 1:
            continue
        gold = rng.randrange(cfg.mc_choices)
        choices = [*distractors[:gold], true, *distractors[gold:]]
        query = _fitted_query(pieces, choices, fit)
        if query is None:
            continue
        items.append({"query": query, "choices": choices, "gold": gold})
        if len(items) >= cfg.mc_items:
            break
    return items


# A fitted passage keeps at least this share of lastword_words (else the item is dropped).
_MIN_WORDS_SHARE = 0.25


def _fitted_context(context: list[str], target: str, fit: TokenFit | None) -> list[str]:
    """``context`` without its earliest words until ``context + " " + target`` fits."""
    if fit is None:
        return context
    start = 0  # one word at a time: the longest passage that fits
    while start < len(context) and not fit.fits(" ".join(context[start:]), " " + target):
        start += 1
    return context[start:]


def make_lastword(
    docs: list[Document], cfg: EvalSetsConfig, seed: int, fit: TokenFit | None = None
) -> list[dict]:
    """LAMBADA-style passages whose last word already occurred in the passage.

    ``fit``: ``passage minus its last word + " " + last word`` within its budget (the passage
    loses its earliest words; it must keep a quarter of ``lastword_words`` and an earlier
    occurrence of the target, else the item is dropped).
    """
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
        if not any(c.strip(".,;:!?\"'“”‘’()") == w for c in context):
            continue
        context = _fitted_context(context, w, fit)
        if len(context) >= max(1, round(_MIN_WORDS_SHARE * n)) and any(
            c.strip(".,;:!?\"'“”‘’()") == w for c in context
        ):
            items.append({"text": " ".join([*context, w])})
    return items


def longest_example(items: list[dict], kind: str, fit: TokenFit) -> int:
    """Tokens of the longest example of a file's items (``kind``: "mc" or "lastword")."""
    if kind == "mc":
        return max((fit.length(it["query"], " " + c) for it in items for c in it["choices"]),
                   default=0)  # fmt: skip
    pairs = (it["text"].rsplit(" ", 1) for it in items)
    return max((fit.length(ctx, " " + word) for ctx, word in pairs), default=0)


def write_eval_sets(
    docs: list[Document], cfg: EvalSetsConfig, seed: int, out: Path, tokenizer: Any, context: int
) -> dict:
    """Write heldout.txt, mc.jsonl and lastword.jsonl into ``out``; return counts.json.

    Every mc/last-word example fits ``context`` tokens of ``tokenizer`` (with
    :data:`FIT_MARGIN`); counts.json records the item counts, the recipe, the context and the
    longest example of each file in tokens (the model card shows them).
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout.txt").write_text(make_heldout_text(docs, cfg.heldout_chars), encoding="utf-8")
    fit = TokenFit(tokenizer, context - FIT_MARGIN)
    counts: dict[str, int] = {"heldout_chars": cfg.heldout_chars}
    for name, items in (
        ("mc", make_mc(docs, cfg, seed, fit)),
        ("lastword", make_lastword(docs, cfg, seed, fit)),
    ):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
        counts[f"{name}_items"] = len(items)
        counts[f"{name}_longest_tokens"] = longest_example(items, name, fit)
    counts.update(recipe=RECIPE, context=context, fit_margin=FIT_MARGIN)
    (out / "counts.json").write_text(json.dumps(counts))
    return counts


def is_current(counts_file: Path, context: int) -> bool:
    """Whether an evaluation folder's counts.json is of this recipe and fitted to ``context``.

    A folder written before the files were fitted (no ``recipe``) is not current.
    """
    try:
        counts = json.loads(counts_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return counts.get("recipe") == RECIPE and counts.get("context") == context
