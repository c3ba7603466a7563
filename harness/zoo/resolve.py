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
from harness.zoo.build import ZooModelNotBuiltError, family_paths
from harness.zoo.config import CORPUS_ENV, ZooConfigError, load_family_config

PREFIX = "zoo:"


def parse_spec(spec: str) -> tuple[str, str]:
    """'zoo:demo/l2d64' (or 'demo/l2d64', the prefix already stripped) -> ('demo', 'l2d64')."""
    body = spec.removeprefix(PREFIX)
    if body.count("/") != 1 or not all(body.split("/")):
        raise ZooConfigError(f"model={spec!r} is not a zoo spec; expected 'zoo:<family>/<size>'")
    family, size = body.split("/")
    return family, size


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
    family, size = parse_spec(spec)
    cfg = load_family_config(family)
    names = [s.name for s in cfg.sizes]
    if size not in names:
        raise ZooConfigError(
            f"model={spec!r}: family {family!r} has sizes {names}" + did_you_mean(size, names)
        )
    fp = family_paths(cfg, zoo_dir)
    target = next(s for s in cfg.sizes if s.name == size)
    if fp.is_built(target):
        return fp.size_folder(target)
    corpus = f" zoo.corpus={cfg.corpus}" if cfg.corpus and not os.environ.get(CORPUS_ENV) else ""
    env = f"{CORPUS_ENV}={os.environ[CORPUS_ENV]} " if os.environ.get(CORPUS_ENV) else ""
    others = _other_builds(fp.zoo_dir, family)
    hint = f"; builds of {family} with other configs: {others}" if others else ""
    raise ZooModelNotBuiltError(
        f"zoo model {spec!r} is not built for the current conf/zoo/{family}.yaml "
        f"(corpus {cfg.corpus or 'packaged'}) in zoo_dir={str(fp.zoo_dir)!r}; build it with: "
        f"{env}kbit-zoo zoo={family}{corpus} zoo_dir={fp.zoo_dir}{hint}"
    )
