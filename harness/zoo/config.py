"""Family configs of the model zoo: schema, loading, validation and the config hash.

A family is one YAML file under ``conf/zoo/``. Its fields are mirrored one-to-one by the
dataclasses below, so a typo in a key fails when the file is loaded, not halfway through a
45-minute build. The *family hash* covers everything that changes the trained weights or the
evaluation files except the list of sizes (each size carries its own hash), so adding a size
to a family reuses the sizes already built while any other change builds a new family folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.names import did_you_mean

# Bump when the build changes its output for an unchanged config (forces a rebuild).
ZOO_FORMAT_VERSION = 3
# Folder of the family YAMLs in a source checkout (the project keeps conf/ beside harness/).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "zoo"
CORPUS_ENV = "KBIT_CORPUS_DIR"
ZOO_DIR_ENV = "KBIT_ZOO_DIR"


@dataclass
class SizeConfig:
    """One member of a family; the model-size axis of a scaling law."""

    name: str = "???"  # folder name and the <size> of zoo:<family>/<size>
    layers: int = 2
    width: int = 64  # hidden size (d_model)
    heads: int = 2  # attention heads; width must be divisible by heads
    ffn: int | None = None  # FFN inner width; None = 4 * width
    lr: float | None = None  # peak learning rate for this size; None = optimizer.lr


@dataclass
class TokenizerConfig:
    """Either train a byte-level BPE on the training documents, or use a tokenizer file."""

    kind: str = "bpe"  # bpe | file
    vocab_size: int = 2048  # bpe: target vocabulary including special tokens
    path: str | None = None  # file: a Hugging Face tokenizers JSON (e.g. gpt-neox-20b.json)


@dataclass
class BudgetConfig:
    """Training tokens per model: fixed, or proportional to non-embedding parameters."""

    kind: str = "fixed"  # fixed | proportional
    tokens: int = 1_000_000  # fixed: tokens per model
    tokens_per_param: float = 20.0  # proportional: tokens = this x non-embedding params
    min_tokens: int = 0  # proportional: clamp
    max_tokens: int | None = None  # proportional: clamp


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay to min_lr_ratio x peak."""

    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class EvalSetsConfig:
    """Sizes of the held-out evaluation files written into every model folder (kbit_eval/)."""

    heldout_chars: int = 200_000  # characters of held-out text for perplexity
    mc_items: int = 1000  # "which continuation is the real one" items
    mc_choices: int = 4  # the true next sentence + (mc_choices - 1) distractors
    mc_context_chars: int = 300  # context: whole sentences before the true one, up to this
    lastword_items: int = 1000  # LAMBADA-style passages
    lastword_words: int = 50  # words of context before the target word
    val_tokens: int = 32768  # held-out tokens for the validation loss in the model card


@dataclass
class FamilyConfig:
    """A family of models that differ only in size (the schema of conf/zoo/<name>.yaml)."""

    name: str = "???"
    description: str = ""
    architecture: str = "gpt_neox"  # gpt_neox | gpt2 | opt | llama
    sizes: list[SizeConfig] = field(default_factory=list)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    corpus: str | None = None  # folder of .txt files; None = the corpus shipped in the package
    heldout_fraction: float = 0.1  # share of documents (files) held out for validation/eval
    min_heldout_docs: int = 2  # at least this many held out (while one is left to train on)
    max_train_chars: int | None = None  # cap on training text (each document cut to its share)
    context: int = 128  # tokens per training sequence (and max_position_embeddings)
    batch_size: int = 16  # sequences per optimizer step
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval_sets: EvalSetsConfig = field(default_factory=EvalSetsConfig)
    eval_every: int = 100  # steps between validation-loss points in train_log.jsonl
    # training-token counts at which a copy of each size is saved (a geometric series gives a
    # training-tokens axis); zoo:<family>/<size>@<label> addresses one, e.g. @500k, @2M.
    # The end of training is always the size itself (and @<its label>).
    checkpoints: list[int] = field(default_factory=list)
    seed: int = 0


class ZooConfigError(ValueError):
    """A family config or its inputs are invalid; the message names the field."""


def family_names() -> list[str]:
    """Names of the families shipped in conf/zoo/."""
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def load_family_config(name_or_cfg: str | Path | dict | DictConfig | FamilyConfig) -> FamilyConfig:
    """Load and validate a family: a shipped name, a YAML path, a dict/DictConfig, or a config.

    Environment interpolations (``${oc.env:KBIT_CORPUS_DIR,null}``) are resolved here, so the
    corpus override reaches both ``kbit-zoo`` and ``resolve_model`` the same way.
    """
    if isinstance(name_or_cfg, FamilyConfig):
        cfg = OmegaConf.structured(name_or_cfg)
    else:
        if isinstance(name_or_cfg, str | Path) and str(name_or_cfg).endswith((".yaml", ".yml")):
            raw = OmegaConf.load(name_or_cfg)
        elif isinstance(name_or_cfg, str | Path):
            path = CONF_DIR / f"{name_or_cfg}.yaml"
            if not path.is_file():
                known = family_names()
                raise ZooConfigError(
                    f"zoo family {str(name_or_cfg)!r} not found in {CONF_DIR}; known: {known}"
                    + did_you_mean(str(name_or_cfg), known)
                )
            raw = OmegaConf.load(path)
        else:
            raw = OmegaConf.create(name_or_cfg)
        try:
            cfg = OmegaConf.merge(OmegaConf.structured(FamilyConfig), raw)
        except Exception as err:  # omegaconf names the offending key
            raise ZooConfigError(f"invalid zoo family config: {err}") from err
    obj: FamilyConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    obj.sizes = [s if isinstance(s, SizeConfig) else SizeConfig(**s) for s in obj.sizes]
    validate(obj)
    return obj


def _require(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ZooConfigError(f"zoo config field {field_name}={value!r} is invalid: {allowed}")


def validate(cfg: FamilyConfig) -> None:
    """Check everything that can be checked before reading the corpus; name the field."""
    from harness.zoo.model import ARCHITECTURES

    if cfg.architecture not in ARCHITECTURES:
        known = sorted(ARCHITECTURES)
        raise ZooConfigError(
            f"zoo config field architecture={cfg.architecture!r} is unknown; known: {known}"
            + did_you_mean(cfg.architecture, known)
        )
    _require(bool(cfg.sizes), "sizes", cfg.sizes, "need at least one size")
    names = [s.name for s in cfg.sizes]
    _require(len(set(names)) == len(names), "sizes[].name", names, "names must be unique")
    for i, s in enumerate(cfg.sizes):
        _require(
            s.name.replace("-", "").replace("_", "").isalnum(),
            f"sizes[{i}].name",
            s.name,
            "letters, digits, '-' and '_' only",
        )
        for key in ("layers", "width", "heads"):
            _require(getattr(s, key) >= 1, f"sizes[{i}].{key}", getattr(s, key), "must be >= 1")
        _require(
            s.width % s.heads == 0,
            f"sizes[{i}].width",
            s.width,
            f"must be divisible by sizes[{i}].heads={s.heads}",
        )
        _require(s.ffn is None or s.ffn >= 1, f"sizes[{i}].ffn", s.ffn, "must be >= 1 or null")
    tok = cfg.tokenizer
    _require(tok.kind in ("bpe", "file"), "tokenizer.kind", tok.kind, "one of 'bpe', 'file'")
    if tok.kind == "bpe":
        _require(
            tok.vocab_size >= 260,
            "tokenizer.vocab_size",
            tok.vocab_size,
            "a byte-level BPE needs >= 260 (256 bytes + special tokens)",
        )
    else:
        _require(
            bool(tok.path) and Path(str(tok.path)).is_file(),
            "tokenizer.path",
            tok.path,
            "must be an existing tokenizers JSON file when tokenizer.kind=file",
        )
    _require(0 < cfg.heldout_fraction < 1, "heldout_fraction", cfg.heldout_fraction, "in (0, 1)")
    _require(cfg.min_heldout_docs >= 1, "min_heldout_docs", cfg.min_heldout_docs, "must be >= 1")
    _require(cfg.context >= 8, "context", cfg.context, "must be >= 8 tokens")
    _require(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1")
    _require(
        cfg.budget.kind in ("fixed", "proportional"),
        "budget.kind",
        cfg.budget.kind,
        "one of 'fixed', 'proportional'",
    )
    _require(cfg.optimizer.lr > 0, "optimizer.lr", cfg.optimizer.lr, "must be > 0")
    _require(
        cfg.eval_sets.mc_choices >= 2,
        "eval_sets.mc_choices",
        cfg.eval_sets.mc_choices,
        "must be >= 2",
    )
    if cfg.corpus is not None:
        _require(Path(cfg.corpus).is_dir(), "corpus", cfg.corpus, "must be a folder of .txt files")
    marks = list(cfg.checkpoints)
    _require(
        all(isinstance(t, int) and t > 0 for t in marks) and marks == sorted(set(marks)),
        "checkpoints",
        marks,
        "positive token counts in increasing order, e.g. [500000, 1000000, 2000000]",
    )
    if marks and cfg.budget.kind == "fixed":
        _require(
            marks[-1] < cfg.budget.tokens,
            "checkpoints",
            marks,
            f"each must be below budget.tokens={cfg.budget.tokens} (the end of training is "
            "always kept as the size itself)",
        )
    labels = [token_label(t) for t in marks]
    _require(
        len(set(labels)) == len(labels),
        "checkpoints",
        marks,
        f"their labels {labels} must differ (labels round to k/M/G)",
    )


_SUFFIXES = (("G", 10**9), ("M", 10**6), ("k", 10**3))
_LABEL = re.compile(r"^(\d+(?:\.\d+)?)([kMG]?)$")


def token_label(tokens: int) -> str:
    """Short label of a token count for checkpoint names: 500000 -> '500k', 2000000 -> '2M'.

    Exact when the count is a multiple of the unit; else up to three significant decimals
    ('1.5M'), and plain digits below 1000.
    """
    for suffix, unit in _SUFFIXES:
        if tokens >= unit:
            return f"{tokens / unit:.3f}".rstrip("0").rstrip(".") + suffix
    return str(tokens)


def parse_token_label(text: str) -> int:
    """'2M' -> 2000000, '500k' -> 500000, '1.5M' -> 1500000, '123' -> 123 (ValueError if not)."""
    match = _LABEL.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a token count; expected e.g. 500k, 2M, 1.5G or 123456")
    unit = dict(_SUFFIXES).get(match.group(2), 1)
    return round(float(match.group(1)) * unit)


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


def default_zoo_dir() -> Path:
    """Same default as conf/config.yaml's zoo_dir: $KBIT_ZOO_DIR or ~/.cache/kbit/zoo."""
    env = os.environ.get(ZOO_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "kbit" / "zoo"
