"""Build a family: train every size not built yet (``zoo:`` specs resolve in harness.zoo.resolve).

Layout::

    <zoo_dir>/<family>-<family_hash>/family.json         # manifest: config + one entry per size
    <zoo_dir>/<family>-<family_hash>/<size>/             # HF folder: config, safetensors, tokenizer,
        README.md, kbit_zoo.json, train_log.jsonl, kbit_eval/{heldout.txt,mc.jsonl,lastword.jsonl}
    <zoo_dir>/tokenizers/<key>.json, <zoo_dir>/data/<key>.npy   # caches shared by families

A size folder appears under its final name only when complete (built in a temporary folder,
then renamed), so an interrupted build resumes at the first size not built, and a second
build of the same config only hashes the corpus.

The evaluation files are derived from the held-out documents, never from the weights, so a
change of their recipe (:data:`harness.zoo.evalsets.RECIPE`) does not change the family hash:
the next build rewrites ``kbit_eval/`` of the family and of every built size (and checkpoint),
with the cards' ``eval_sets``, and keeps the weights.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

import harness
from harness.files import atomic_write
from harness.models.loading import count_params
from harness.zoo.card import write_card
from harness.zoo.config import FamilyConfig, SizeConfig, token_label
from harness.zoo.corpus import corpus_name, load_corpus, training_text
from harness.zoo.evalsets import is_current, write_eval_sets
from harness.zoo.model import build_config
from harness.zoo.paths import CHECKPOINTS_DIR, FamilyPaths, family_paths, size_hash, stable_hash
from harness.zoo.request import BuildRequest, check_request
from harness.zoo.tokenizer import get_tokenizer, token_stream
from harness.zoo.train import TrainPlan, train, val_windows

log = logging.getLogger(__name__)


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _tokens_for(cfg: FamilyConfig, n_nonemb: int) -> int:
    b = cfg.budget
    if b.kind == "fixed":
        return b.tokens
    tokens = max(b.min_tokens, int(b.tokens_per_param * n_nonemb))
    return min(tokens, b.max_tokens) if b.max_tokens is not None else tokens


def _install_folder(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final``, replacing an older ``final``.

    Why not one ``os.replace``: it cannot replace a non-empty folder. The old folder is first
    renamed aside (so no reader ever sees a half-deleted folder under the final name) and
    deleted after. When a concurrent build of the same config installs ``final`` in between,
    its folder (the same content: builds are deterministic) is kept and ``tmp`` dropped.
    """
    aside = final.with_name(f".old-{final.name}-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):  # nothing to replace: the usual case
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        log.info("%s was installed by another build meanwhile; keeping it", final)
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


class _Prepared:
    """Corpus, tokenizer, token streams and eval files: built once per family build."""

    def __init__(self, fp: FamilyPaths):
        cfg = fp.cfg
        self.corpus = load_corpus(cfg.corpus, cfg.heldout_fraction, cfg.min_heldout_docs)
        texts = training_text(self.corpus, cfg.max_train_chars)
        self.tok = get_tokenizer(cfg.tokenizer, texts, fp.tokenizer_key, fp.zoo_dir, cfg.context)
        stream_key = stable_hash([fp.tokenizer_key, fp.corpus_hash, cfg.max_train_chars, "train"])
        self.train = token_stream(self.tok, texts, stream_key, fp.zoo_dir)
        held_key = stable_hash([fp.tokenizer_key, fp.corpus_hash, "heldout"])
        self.heldout = token_stream(
            self.tok, [d.text for d in self.corpus.heldout], held_key, fp.zoo_dir
        )
        self.eval_dir = fp.folder / "kbit_eval"
        if not is_current(self.eval_dir / "counts.json", cfg.context):
            tmp = fp.folder / f".kbit_eval.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            write_eval_sets(
                self.corpus.heldout, cfg.eval_sets, cfg.seed, tmp, self.tok, cfg.context
            )
            _install_folder(tmp, self.eval_dir)
        log.info(
            "train stream %d tokens, held-out stream %d tokens", len(self.train), len(self.heldout)
        )


def _build_size(fp: FamilyPaths, prep: _Prepared, size: SizeConfig, device: torch.device) -> dict:
    cfg, tok = fp.cfg, prep.tok
    s_hash = size_hash(fp.hash, size)
    seed = int(stable_hash([cfg.seed, size.name], 8), 16)
    torch.manual_seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    hf_cfg = build_config(cfg.architecture, size, len(tok), cfg.context, tok.eos_token_id, pad)
    model = AutoModelForCausalLM.from_config(hf_cfg).to(device)
    n_params, n_nonemb = count_params(model)
    tokens = _tokens_for(cfg, n_nonemb)
    plan = TrainPlan(steps=max(1, -(-tokens // (cfg.batch_size * cfg.context))),
                     batch_size=cfg.batch_size, context=cfg.context,
                     lr=size.lr if size.lr is not None else cfg.optimizer.lr,
                     optimizer=cfg.optimizer, eval_every=cfg.eval_every, seed=seed + 1)  # fmt: skip
    tmp = fp.folder / f".tmp-{size.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    val = val_windows(prep.heldout, cfg.context, cfg.eval_sets.val_tokens, device)
    desc = f"{cfg.name}/{size.name} ({n_nonemb / 1e6:.2f}M non-emb, {plan.steps} steps)"
    per_step = plan.batch_size * plan.context
    saved: dict[str, int] = {}

    def save_checkpoint(label: str, model: torch.nn.Module, point: dict) -> None:
        folder = tmp / CHECKPOINTS_DIR / label
        folder.mkdir(parents=True)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        shutil.copytree(prep.eval_dir, folder / "kbit_eval")
        log_lines = (tmp / "train_log.jsonl").read_text().splitlines()
        (folder / "train_log.jsonl").write_text("\n".join(log_lines) + "\n")
        summary = {"steps": point["step"], "tokens_seen": point["tokens"],
                   "final_val_loss": point["val_loss"], "final_train_loss": point["train_loss"],
                   "train_seconds": point["seconds"]}  # fmt: skip
        write_card(
            folder,
            {
                **meta_common,
                "summary": summary,
                "checkpoint": label,
                "train_tokens": point["tokens"],
                "final_tokens": plan.steps * per_step,
            },
        )
        saved[label] = point["tokens"]
        log.info("%s/%s@%s: checkpoint at %d tokens, val loss %.4f", cfg.name, size.name, label,
                 point["tokens"], point["val_loss"])  # fmt: skip

    marks = {}
    for target in cfg.checkpoints:
        step = -(-target // per_step)
        if step >= plan.steps:
            log.warning(
                "%s/%s: checkpoint %s is not before the end of training (%d tokens); skipped",
                cfg.name,
                size.name,
                token_label(target),
                plan.steps * per_step,
            )
            continue
        marks[step] = functools.partial(save_checkpoint, token_label(target))
    ffn = size.ffn if size.ffn is not None else 4 * size.width
    meta_common = {
        "family": cfg.name, "size": size.name, "architecture": cfg.architecture,
        "family_hash": fp.hash, "size_hash": s_hash, "shape": {**asdict(size), "ffn": ffn},
        "n_params": n_params, "n_nonembedding_params": n_nonemb,
        "corpus": {"name": prep.corpus.name, "hash": prep.corpus.hash, "source": prep.corpus.source,
                   "train_docs": len(prep.corpus.train), "heldout_docs": len(prep.corpus.heldout),
                   "heldout": [d.name for d in prep.corpus.heldout]},
        "tokenizer": fp.tokenizer_key, "vocab_size": len(tok), "batch_size": cfg.batch_size,
        "context": cfg.context, "val_tokens": int(val[:, 1:].numel()), "device": str(device),
        "mc_choices": cfg.eval_sets.mc_choices,
        "eval_sets": json.loads((prep.eval_dir / "counts.json").read_text()),
        "versions": {"harness": harness.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "config": asdict(cfg),
    }  # fmt: skip
    summary = train(model, prep.train, val, plan, tmp / "train_log.jsonl", desc, marks)
    model.to("cpu").save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.copytree(prep.eval_dir, tmp / "kbit_eval")
    final_label = token_label(tokens)
    meta = {**meta_common, "summary": summary, "train_tokens": summary["tokens_seen"],
            "checkpoint": final_label, "final_tokens": summary["tokens_seen"],
            "checkpoints": saved}  # fmt: skip
    write_card(tmp, meta)
    _install_folder(tmp, fp.size_folder(size))  # replaces a stale build of an older config
    log.info("%s/%s: val loss %.4f after %d tokens", cfg.name, size.name,
             summary["final_val_loss"], summary["tokens_seen"])  # fmt: skip
    return meta


def _eval_files_stale(fp: FamilyPaths, size: SizeConfig) -> bool:
    """Whether a built size (or one of its checkpoints) holds evaluation files of an older
    recipe or not fitted to the family's context."""
    folder = fp.size_folder(size)
    folders = [folder, *sorted((folder / CHECKPOINTS_DIR).glob("*/"))]
    return any(not is_current(f / "kbit_eval" / "counts.json", fp.cfg.context) for f in folders)


def _refresh_eval_files(fp: FamilyPaths, prep: _Prepared, size: SizeConfig) -> None:
    """Give a built size (and its checkpoints) the family's current evaluation files.

    The weights, tokenizer and training log stay; ``kbit_zoo.json``'s ``eval_sets`` and the
    model card (README.md) are rewritten to describe the new files.
    """
    counts = json.loads((prep.eval_dir / "counts.json").read_text())
    folder = fp.size_folder(size)
    for target in [folder, *sorted((folder / CHECKPOINTS_DIR).glob("*/"))]:
        tmp = target / f".kbit_eval.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(prep.eval_dir, tmp)
        _install_folder(tmp, target / "kbit_eval")
        meta = json.loads((target / "kbit_zoo.json").read_text())
        meta["eval_sets"] = counts
        write_card(target, meta)
    log.info("%s/%s: evaluation files refitted to context %d (recipe %d; weights kept)",
             fp.cfg.name, size.name, fp.cfg.context, counts["recipe"])  # fmt: skip


def build_family(
    name_or_cfg: str | Path | dict | FamilyConfig,
    zoo_dir: str | Path | None = None,
    corpus: str | Path | None = None,
    device: str = "auto",
    sizes: list[str] | None = None,
    threads: int | None = None,
) -> list[Path]:
    """Train every size of a family that is not built yet; return the size folders.

    ``corpus`` overrides the config's corpus; ``sizes`` restricts the build to some sizes;
    ``threads`` sets torch's CPU threads for the build (on a busy machine 1 thread is often
    much faster than 2 oversubscribed ones). A second call with the same config returns at
    once ("cached"). Every input is checked first (:func:`check_request`): a bad one raises
    :class:`ZooConfigError` and nothing is written.
    """
    return build(check_request(name_or_cfg, zoo_dir, corpus, device, sizes, threads))


def build(request: BuildRequest) -> list[Path]:
    """Train the sizes of a checked request (:func:`check_request`) not built yet."""
    cfg, sizes, threads = request.family, request.sizes, request.threads
    fp = family_paths(cfg, request.zoo_dir, request.corpus_hash)
    todo = [s for s in cfg.sizes if sizes is None or s.name in sizes]
    fp.folder.mkdir(parents=True, exist_ok=True)
    missing = [s for s in todo if not fp.is_built(s)]
    stale = [s for s in todo if s not in missing and _eval_files_stale(fp, s)]
    for s in todo:
        if s not in missing:
            log.info("%s/%s: cached (%s)", cfg.name, s.name, fp.size_folder(s))
    if missing or stale:
        start, before = time.time(), torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            prep = _Prepared(fp)
            for s in stale:
                _refresh_eval_files(fp, prep, s)
            dev = _pick_device(request.device)
            for s in missing:
                _build_size(fp, prep, s, dev)
                _write_manifest(fp)
        finally:
            torch.set_num_threads(before)
        if missing:
            log.info("built %d size(s) of %s in %.0f s", len(missing), cfg.name,
                     time.time() - start)  # fmt: skip
    _write_manifest(fp)
    return [fp.size_folder(s) for s in todo]


def _write_manifest(fp: FamilyPaths) -> None:
    built = {}
    for s in fp.cfg.sizes:
        if fp.is_built(s):
            meta = json.loads((fp.size_folder(s) / "kbit_zoo.json").read_text())
            built[s.name] = {k: meta[k] for k in ("n_params", "n_nonembedding_params", "summary")}
    atomic_write(fp.folder / "family.json", json.dumps({
        "family": fp.cfg.name, "family_hash": fp.hash, "corpus": corpus_name(fp.cfg.corpus),
        "corpus_source": fp.cfg.corpus, "corpus_hash": fp.corpus_hash, "sizes": built,
        "config": asdict(fp.cfg),
    }, indent=2))  # fmt: skip
