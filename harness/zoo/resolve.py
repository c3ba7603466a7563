"""``zoo:<family>/<size>`` -> the folder of a built model, for ``kbit-run model=zoo:...``.

The family hash is recomputed from the current ``conf/zoo/<family>.yaml`` and corpus
(``$KBIT_CORPUS_DIR`` overrides the corpus, as in ``kbit-zoo``), so a build made from an
older config or another corpus is never used silently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from harness.names import did_you_mean
from harness.zoo.config import (
    CORPUS_ENV,
    FamilyConfig,
    ZooConfigError,
    load_family_config,
    parse_token_label,
    token_label,
)
from harness.zoo.paths import CHECKPOINTS_DIR, ZooModelNotBuiltError, family_paths

PREFIX = "zoo:"


def parse_spec(spec: str) -> tuple[str, str]:
    """'zoo:demo/l2d64' (or 'demo/l2d64', the prefix already stripped) -> ('demo', 'l2d64').

    A checkpoint suffix ('@2M') is dropped here; :func:`parse_checkpoint` keeps it.
    """
    family, size, _ = parse_checkpoint(spec)
    return family, size


def parse_checkpoint(spec: str) -> tuple[str, str, str | None]:
    """'zoo:tokens/l2d64@2M' -> ('tokens', 'l2d64', '2M'); no '@' -> (family, size, None)."""
    body = spec.removeprefix(PREFIX)
    body, at, label = body.partition("@")
    if body.count("/") != 1 or not all(body.split("/")) or (at and not label):
        raise ZooConfigError(
            f"model={spec!r} is not a zoo spec; expected 'zoo:<family>/<size>' or "
            "'zoo:<family>/<size>@<training tokens>' (e.g. @2M)"
        )
    family, size = body.split("/")
    return family, size, label or None


def _other_builds(zoo_dir: Path, family: str) -> list[str]:
    out = []
    for manifest in sorted(zoo_dir.glob(f"{family}-*/family.json")):
        info = json.loads(manifest.read_text())
        out.append(f"{manifest.parent.name} (corpus {info.get('corpus_source') or 'packaged'}, "
                   f"sizes {sorted(info.get('sizes', {}))})")  # fmt: skip
    return out


def resolve_model(spec: str, zoo_dir: str | Path | None = None) -> Path:
    """The folder of a built zoo model; raise ZooModelNotBuiltError with the build command.

    ``spec`` is ``zoo:<family>/<size>`` or ``<family>/<size>``; ``zoo_dir`` None = the default.
    """
    family, size, label = parse_checkpoint(spec)
    cfg = load_family_config(family)
    names = [s.name for s in cfg.sizes]
    if size not in names:
        raise ZooConfigError(
            f"model={spec!r}: family {family!r} has sizes {names}" + did_you_mean(size, names)
        )
    fp = family_paths(cfg, zoo_dir)
    target = next(s for s in cfg.sizes if s.name == size)
    if label is not None:
        _checkpoint_label(spec, cfg, label)
    if fp.is_built(target):
        folder = fp.size_folder(target)
        return folder if label is None else _checkpoint_folder(spec, folder, label)
    corpus = f" zoo.corpus={cfg.corpus}" if cfg.corpus and not os.environ.get(CORPUS_ENV) else ""
    env = f"{CORPUS_ENV}={os.environ[CORPUS_ENV]} " if os.environ.get(CORPUS_ENV) else ""
    others = [b for b in _other_builds(fp.zoo_dir, family) if not b.startswith(fp.folder.name)]
    hint = f"; builds of {family} with other configs: {others}" if others else ""
    if (fp.folder / "family.json").is_file():
        built = [s.name for s in cfg.sizes if fp.is_built(s)]
        hint = f"; this config's build in {fp.folder} has sizes {built} so far{hint}"
    raise ZooModelNotBuiltError(
        f"zoo model {spec!r} is not built for the current conf/zoo/{family}.yaml "
        f"(corpus {cfg.corpus or 'packaged'}) in zoo_dir={str(fp.zoo_dir)!r}; build it with: "
        f"{env}kbit-zoo zoo={family}{corpus} zoo_dir={fp.zoo_dir}{hint}"
    )


def _checkpoint_label(spec: str, cfg: FamilyConfig, label: str) -> None:
    """Refuse a checkpoint the family config does not make, before looking at any folder."""
    try:
        tokens = parse_token_label(label)
    except ValueError as err:
        raise ZooConfigError(f"model={spec!r}: {err}") from None
    known = [token_label(t) for t in cfg.checkpoints]
    if cfg.budget.kind == "fixed":
        known.append(token_label(cfg.budget.tokens))
    if token_label(tokens) not in known and cfg.budget.kind == "fixed":
        raise ZooConfigError(
            f"model={spec!r}: family {cfg.name!r} has no checkpoint {label!r}; its checkpoints "
            f"(training tokens): {known or 'none (set checkpoints: in its YAML)'}"
            + did_you_mean(label, known)
        )


def _checkpoint_folder(spec: str, folder: Path, label: str) -> Path:
    """The model folder of checkpoint ``label`` of a built size (the size itself at the end)."""
    meta = json.loads((folder / "kbit_zoo.json").read_text())
    wanted = token_label(parse_token_label(label))
    if wanted == meta.get("checkpoint"):
        return folder
    saved = meta.get("checkpoints") or {}
    if wanted in saved and (folder / CHECKPOINTS_DIR / wanted / "kbit_zoo.json").is_file():
        return folder / CHECKPOINTS_DIR / wanted
    known = [*saved, meta.get("checkpoint")]
    raise ZooConfigError(
        f"model={spec!r}: no checkpoint {label!r} in {folder}; saved: {known}"
        + did_you_mean(label, [k for k in known if k])
    )
