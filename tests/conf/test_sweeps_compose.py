"""Every sweep in sweeps/ composes, says how to launch it, and expands to the grid it documents."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from harness.sweep.expand import expand_union

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))
QUANT_KEYS = {"dtype", "block_size", "centering", "method", "method.outlier_fraction",
              "scale_format"}  # fmt: skip

# Unique cells per sweep, counted by hand from each file's grid (see the comment in each file).
EXPECTED_CELLS = {
    "demo": 4 * (4 * 5 + 1),
    "micro": 5 * (7 * 6 * 7 + 2 * 7 + 2 * 7 + 1),
    "blocksize": 5 * (3 * 2 * 9 + 1),
    "dtypes": 5 * (7 * 6 + 2 + 2 + 1),
    "proxy": 5 * (2 * 2 * 2 * 4 + 1),
    "paper": 26 * (4 * 6 * 8 * 2 * 2 + 1),
    "methods": 5 * (2 * 2 * (3 * 3 + 1) + 3 * 2 + 1),
    "claims": 5 * (3 * 3 + 2),
    "tokens": 4 * 5 * (3 * 6 + 1) + 4 * (3 * 2 + 2),
}


def test_every_sweep_is_listed():
    assert set(SWEEPS) == set(EXPECTED_CELLS)


def _compose(name: str):
    from harness.config.schema import register_schema

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"+sweeps@_global_={name}"], return_hydra_config=True)


def _unique(cells: list[list[str]]) -> set[frozenset[str]]:
    """Brute-force cell identity: at 16 bits the quantization fields do not matter."""
    out = set()
    for cell in cells:
        kv = dict(item.split("=", 1) for item in cell)
        if kv.get("bits") == "16":
            kv = {k: v for k, v in kv.items() if k not in QUANT_KEYS}
        if kv.get("method", "blockwise") != "proxy":
            kv.pop("method.outlier_fraction", None)
        out.add(frozenset(kv.items()))
    return out


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_header_and_grid(name):
    lines = (ROOT / "sweeps" / f"{name}.yaml").read_text().splitlines()
    assert re.match(rf"^# kbit-run --multirun \+sweeps@_global_={name}( |$)", lines[0]), lines[0]
    assert lines[1] == "# @package _global_"
    cfg = _compose(name)
    assert cfg.sweep == name
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.kbit_sweeper.KbitSweeper"
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    params = {k: str(v) for k, v in sweeper["params"].items()}
    assert next(iter(params)) == "model"  # the slowest dimension
    cells = expand_union(OverridesParser.create(), params, sweeper.get("grids"), [])
    assert len(_unique(cells)) == EXPECTED_CELLS[name]
    models = [dict(i.split("=", 1) for i in c)["model"] for c in cells]
    assert len(models) == len(cells)
    # each model's cells are contiguous: an in-process launch loads each model once
    assert (
        sum(1 for i in range(1, len(models)) if models[i] != models[i - 1]) == len(set(models)) - 1
    )


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_cells_are_legal(name):
    """Every (dtype, bits) pair is legal and every zoo model names a size of its family."""
    from harness.dtypes import check
    from harness.zoo.config import load_family_config

    cfg = _compose(name)
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    params = {k: str(v) for k, v in sweeper["params"].items()}
    cells = expand_union(OverridesParser.create(), params, sweeper.get("grids"), [])
    pairs = set()
    for cell in cells:
        kv = dict(item.split("=", 1) for item in cell)
        if kv.get("bits", str(cfg.bits)) != "16":
            pairs.add((kv.get("dtype", cfg.dtype.name), int(kv.get("bits", cfg.bits))))
    for dtype, bits in sorted(pairs):
        check(dtype, bits)
    for model in {dict(i.split("=", 1) for i in c)["model"] for c in cells}:
        if model.startswith("zoo:"):
            family, size = model[4:].split("/")
            assert size in [s.name for s in load_family_config(family).sizes], model
