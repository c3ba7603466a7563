"""``kbit-zoo``: build a model family (a Hydra app over conf/zoo_build.yaml)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from harness.zoo.build import build_family
from harness.zoo.config import CONF_DIR

log = logging.getLogger(__name__)


def _run(cfg: DictConfig) -> None:
    family = OmegaConf.to_container(cfg.zoo, resolve=True)
    sizes = list(cfg.sizes) if cfg.sizes is not None else None
    threads = int(cfg.threads) if cfg.threads not in (None, "") else None  # env gives a str
    paths = build_family(
        family, zoo_dir=cfg.zoo_dir, device=cfg.device, sizes=sizes, threads=threads
    )
    for path in paths:
        log.info("ready: %s", path)


def main() -> None:
    """Entry point of ``kbit-zoo`` (config: conf/zoo_build.yaml; groups: conf/zoo/)."""
    app = hydra.main(version_base="1.3", config_path=str(CONF_DIR.parent), config_name="zoo_build")
    app(_run)()


if __name__ == "__main__":
    main()
