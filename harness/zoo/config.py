"""Family configs of the model zoo: schema, loading, validation and the config hash.

A family is one YAML file under ``conf/zoo/``. Its fields are mirrored one-to-one by the
dataclasses below, so a typo in a key fails when the file is loaded, not halfway through a
45-minute build. The *family hash* covers everything that changes the trained weights or the
evaluation files except the list of sizes (each size carries its own hash), so adding a size
to a family reuses the sizes already built while any other change builds a new family folder.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.files import PathError, user_path
from harness.names import closest, did_you_mean, plain_name_problem

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
    """A family config or its inputs are invalid; the message is one line naming the field."""


def family_names() -> list[str]:
    """Names of the families shipped in conf/zoo/."""
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


# The nested schemas of a family, for the key check below.
_NESTED: dict[str, type] = {
    "tokenizer": TokenizerConfig,
    "budget": BudgetConfig,
    "optimizer": OptimizerConfig,
    "eval_sets": EvalSetsConfig,
}
_KEYS_LISTED = 8  # a schema with more keys shows only the closest ones (FamilyConfig has 17)


def _shown(value: Any) -> str:
    """``repr`` of a value; a list or mapping cut so that a refusal stays one short line
    (a path or a name is never cut: it is what the user must find)."""
    text = repr(value)
    return text if isinstance(value, str) or len(text) <= 60 else text[:57] + "..."


def check_keys(raw: Any, schema: type | None = None, prefix: str = "") -> None:
    """Refuse a key the schema lacks, naming it and the closest allowed keys.

    ``schema`` None is the family (:class:`FamilyConfig`); nested keys are checked too. Why
    not OmegaConf's own error: it spans several lines, and for the family (17 keys) a full
    list makes a line of 300 characters; the closest few and the docs say more.
    """
    schema = schema or FamilyConfig
    if not isinstance(raw, dict):
        return
    names = [f.name for f in fields(schema)]
    for key, value in raw.items():
        if key not in names:
            if len(names) <= _KEYS_LISTED:
                listed = f"allowed keys: {', '.join(names)}"
            else:
                near = closest(str(key), names, n=3, cutoff=0.4)
                listed = (f"the closest allowed keys: {', '.join(near)}" if near
                          else f"allowed: the {len(names)} keys") + " (all: docs/zoo.md)"  # fmt: skip
            raise ZooConfigError(
                f"zoo config field {prefix}{key}={_shown(value)} is not a setting of a zoo "
                f"family; {listed}{did_you_mean(str(key), names)}"
            )
        if schema is FamilyConfig and key == "sizes" and isinstance(value, list):
            for i, size in enumerate(value):
                check_keys(size, SizeConfig, f"sizes[{i}].")
        elif schema is FamilyConfig and key in _NESTED:
            check_keys(value, _NESTED[key], f"{key}.")


def _one_line(err: Exception) -> str:
    """OmegaConf's error (several lines: message, key, type) as one line with what is allowed."""
    from harness.error_lines import composition_error_line

    line = composition_error_line(err) or str(err).strip().splitlines()[0]
    return f"zoo config field {line}"


def _path_field(value: str | None, field_name: str) -> str | None:
    """A path field through :func:`harness.files.user_path` (``$VAR`` then ``~`` expanded).

    An empty value means the field's default (null), as an empty ``KBIT_CORPUS_DIR`` does.
    """
    if value is None or not str(value).strip():
        return None
    try:
        return str(user_path(str(value), field_name))
    except PathError as err:
        raise ZooConfigError(f"zoo config field {err}") from None


def load_family_config(name_or_cfg: str | Path | dict | DictConfig | FamilyConfig) -> FamilyConfig:
    """Load and validate a family: a shipped name, a YAML path, a dict/DictConfig, or a config.

    Environment interpolations (``${oc.env:KBIT_CORPUS_DIR,null}``) are resolved here, so the
    corpus override reaches both ``kbit-zoo`` and ``resolve_model`` the same way; path fields
    (``corpus``, ``tokenizer.path``) are expanded by :func:`harness.files.user_path`. Every
    error is a :class:`ZooConfigError` of one line naming the field.
    """
    try:
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
                        f"zoo family {str(name_or_cfg)!r} not found in {CONF_DIR}; known: "
                        f"{known}" + did_you_mean(str(name_or_cfg), known)
                    )
                raw = OmegaConf.load(path)
            else:
                raw = OmegaConf.create(name_or_cfg)
            if not isinstance(raw, DictConfig):
                raise ZooConfigError(
                    f"zoo config {_shown(name_or_cfg)} is not a mapping; allowed: the fields "
                    "of a family (docs/zoo.md)"
                )
            check_keys(OmegaConf.to_container(raw, resolve=False))
            cfg = OmegaConf.merge(OmegaConf.structured(FamilyConfig), raw)
        obj: FamilyConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except ZooConfigError:
        raise
    except OSError as err:
        raise ZooConfigError(f"zoo config {str(name_or_cfg)!r}: {err.strerror}") from err
    except Exception as err:  # OmegaConf names the offending key and type
        from omegaconf.errors import OmegaConfBaseException

        if not isinstance(err, OmegaConfBaseException):
            raise
        raise ZooConfigError(_one_line(err)) from err
    obj.sizes = [s if isinstance(s, SizeConfig) else SizeConfig(**s) for s in obj.sizes]
    obj.corpus = _path_field(obj.corpus, "corpus")
    obj.tokenizer.path = _path_field(obj.tokenizer.path, "tokenizer.path")
    validate(obj)
    return obj


def _require(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ZooConfigError(f"zoo config field {field_name}={_shown(value)}; allowed: {allowed}")


def _count(value: Any, field_name: str, minimum: int = 1, nullable: bool = False) -> None:
    """An integer count (layers, tokens, items, ...) of at least ``minimum``."""
    if value is None and nullable:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    _require(ok, field_name, value, f"an integer >= {minimum}" + (" or null" if nullable else ""))


def _number(value: Any, field_name: str, low: float, high: float = math.inf, *,
            low_open: bool = True, high_open: bool = True, what: str = "a number") -> None:  # fmt: skip
    """A finite number in an interval (open or closed at either end)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    span = f"{'>' if low_open else '>='} {low:g}" if high == math.inf else (
        f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")  # fmt: skip
    _require(ok, field_name, value, f"{what} {span}")


def validate(cfg: FamilyConfig) -> None:
    """Check everything that can be checked before reading the corpus; name the field.

    Every size, count and rate must make sense before a build starts: a non-positive value
    would otherwise fail deep inside training (or, like ``grad_clip=0``, train nothing).
    """
    from harness.zoo.model import ARCHITECTURES

    # the folder prefix <family>-<hash>/ and the <family> of zoo:<family>/<size>
    if (problem := plain_name_problem("name", cfg.name)) is not None:
        raise ZooConfigError(f"zoo config field {problem}")
    if cfg.architecture not in ARCHITECTURES:
        known = sorted(ARCHITECTURES)
        raise ZooConfigError(
            f"zoo config field architecture={cfg.architecture!r} is unknown; allowed: {known}"
            + did_you_mean(cfg.architecture, known)
        )
    _require(bool(cfg.sizes), "sizes", cfg.sizes, "a list of at least one size")
    names = [s.name for s in cfg.sizes]
    _require(len(set(names)) == len(names), "sizes[].name", names, "names that differ")
    for i, s in enumerate(cfg.sizes):
        _require(
            s.name.replace("-", "").replace("_", "").isalnum(),
            f"sizes[{i}].name",
            s.name,
            "letters, digits, '-' and '_' only",
        )
        for key in ("layers", "width", "heads"):
            _count(getattr(s, key), f"sizes[{i}].{key}")
        _require(
            s.width % s.heads == 0,
            f"sizes[{i}].width",
            s.width,
            f"a multiple of sizes[{i}].heads={s.heads}",
        )
        _count(s.ffn, f"sizes[{i}].ffn", nullable=True)
        if s.lr is not None:
            _number(s.lr, f"sizes[{i}].lr", 0, what="null (optimizer.lr) or a number")
    tok = cfg.tokenizer
    _require(tok.kind in ("bpe", "file"), "tokenizer.kind", tok.kind, "one of 'bpe', 'file'")
    if tok.kind == "bpe":
        _require(
            isinstance(tok.vocab_size, int) and tok.vocab_size >= 260,
            "tokenizer.vocab_size",
            tok.vocab_size,
            "an integer >= 260 (a byte-level BPE needs 256 bytes + special tokens)",
        )
    else:
        _require(
            bool(tok.path) and Path(str(tok.path)).is_file(),
            "tokenizer.path",
            tok.path,
            "an existing tokenizers JSON file when tokenizer.kind=file",
        )
    _number(cfg.heldout_fraction, "heldout_fraction", 0, 1, what="a fraction")
    _count(cfg.min_heldout_docs, "min_heldout_docs")
    _count(cfg.max_train_chars, "max_train_chars", nullable=True)
    _count(cfg.context, "context", minimum=8)
    _count(cfg.batch_size, "batch_size")
    _count(cfg.eval_every, "eval_every")
    budget = cfg.budget
    _require(
        budget.kind in ("fixed", "proportional"),
        "budget.kind",
        budget.kind,
        "one of 'fixed', 'proportional'",
    )
    _count(budget.tokens, "budget.tokens")
    _number(budget.tokens_per_param, "budget.tokens_per_param", 0)
    _count(budget.min_tokens, "budget.min_tokens", minimum=0)
    _count(budget.max_tokens, "budget.max_tokens", minimum=max(1, budget.min_tokens),
           nullable=True)  # fmt: skip
    opt = cfg.optimizer
    _number(opt.lr, "optimizer.lr", 0)
    betas = list(opt.betas)
    _require(
        len(betas) == 2
        and all(isinstance(b, int | float) and math.isfinite(b) and 0 <= b < 1 for b in betas),
        "optimizer.betas",
        betas,
        "two numbers in [0, 1), e.g. [0.9, 0.95]",
    )
    _number(opt.weight_decay, "optimizer.weight_decay", 0, low_open=False)
    _number(opt.warmup_frac, "optimizer.warmup_frac", 0, 1, low_open=False, what="a fraction")
    _number(opt.min_lr_ratio, "optimizer.min_lr_ratio", 0, 1, low_open=False, high_open=False,
            what="a fraction")  # fmt: skip
    _number(opt.grad_clip, "optimizer.grad_clip", 0, what="a gradient-norm bound")
    ev = cfg.eval_sets
    for key in ("heldout_chars", "mc_items", "mc_context_chars", "lastword_items",
                "lastword_words", "val_tokens"):  # fmt: skip
        _count(getattr(ev, key), f"eval_sets.{key}")
    _count(ev.mc_choices, "eval_sets.mc_choices", minimum=2)
    if cfg.corpus is not None:
        folder = Path(cfg.corpus)
        _require(
            folder.is_dir(),
            "corpus",
            cfg.corpus,
            "a folder of .txt files, or null (the packaged corpus); "
            + ("this is a file" if folder.exists() else "no such folder"),
        )
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
            f"each below budget.tokens={cfg.budget.tokens} (the end of training is "
            "always kept as the size itself)",
        )
    labels = [token_label(t) for t in marks]
    _require(
        len(set(labels)) == len(labels),
        "checkpoints",
        marks,
        f"token counts whose labels differ ({labels} must differ; labels round to k/M/G)",
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
