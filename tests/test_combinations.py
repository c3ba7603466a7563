"""Every rule before work: what passes planning runs, what cannot run is refused at planning.

Issue 23's combination test. Enumerates data-type family x bits x block size x scale format x
centering x method (and the hardware format presets x method x centering), plans each cell as
a run does (Hydra composes ``conf/config.yaml`` with the cell's choices, then
``harness.config.schema.check_cell``), and

* quantizes every cell that planning accepts on a tiny random Llama through the method
  registry (``harness.quantize.quantize_model``) and counts its bits: no configuration error
  may surface there (a ValueError/TypeError after planning is a rule planning missed);
* checks that the refused ones are refused with one line naming a field, its value and what
  is allowed, and that the issue's three examples are among them.

The references are independent of the rules: the runtime code (the kernels, the methods, the
bit count) decides what runs, the planner what is accepted.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_models_tiny import tiny_model

from harness.config.schema import ConfigError, check_cell, register_schema
from harness.dtypes import entries
from harness.kernels.scale_formats import SCALE_FORMATS

CONF = Path(__file__).resolve().parents[1] / "conf"

# representative values of each axis: every family, the ends and the middle of k, blocks and
# per-tensor, every registered scale format, both centerings, every built-in method
FAMILY_DTYPES = ("int", "int_asym", "float", "e2m1", "nf4", "dynamic", "quantile")
BITS = (3, 4, 8)
BLOCKS = (32, None)
METHODS = ("blockwise", "proxy", "gptq", "hqq")
FORMATS = ("mxfp4", "nvfp4", "mxint8")


def _dtypes() -> tuple[str, ...]:
    """The families' representatives, plus a lookup-table entry where one is shipped."""
    table = sorted(n for n, s in entries().items() if s.family == "table")
    return FAMILY_DTYPES + tuple(table[:1])


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", *overrides])
    GlobalHydra.instance().clear()
    return cfg


def _planned(base, **values):
    """``base`` with ``values`` set through the typed config (as overrides are), then
    ``check_cell``: None if planning accepts the cell, else the refusal."""
    cfg = base.copy()
    for key, value in values.items():
        cfg[key] = value
    try:
        check_cell(cfg)
    except ConfigError as exc:
        return cfg, str(exc)
    return cfg, None


def _plan_all(bits_axis=BITS, blocks_axis=BLOCKS) -> tuple[list, list]:
    """(accepted cfgs, [(cell, refusal)]) over the free axes and the format presets."""
    register_schema()
    accepted, refused = [], []
    for dtype, method in itertools.product(_dtypes(), METHODS):
        base = _compose(f"dtype={dtype}", f"method={method}")
        for bits, block, fmt, centering in itertools.product(
            bits_axis, blocks_axis, SCALE_FORMATS, (False, True)
        ):
            cell = dict(bits=bits, block_size=block, scale_format=fmt, centering=centering)
            cfg, refusal = _planned(base, **cell)
            if refusal is None:
                accepted.append(cfg)
            else:
                refused.append(({"dtype": dtype, "method": method, **cell}, refusal))
    for fmt, method, centering in itertools.product(FORMATS, METHODS, (False, True)):
        base = _compose(f"format={fmt}", f"method={method}")
        cfg, refusal = _planned(base, centering=centering)
        if refusal is None:
            accepted.append(cfg)
        else:
            refused.append(({"format": fmt, "method": method, "centering": centering}, refusal))
    return accepted, refused


@pytest.fixture(scope="module")
def plan():
    """The whole grid (about a minute of planning on one core: slow tests only)."""
    return _plan_all()


@pytest.fixture(scope="module")
def small_plan():
    """The grid at k = 4 with blocks of 32: every family, format, centering and method."""
    return _plan_all((4,), (32,))


def _quantize(model, cfg, calibration):
    from harness.config.rules import dtype_overrides
    from harness.config.schema import method_settings
    from harness.quantize import quantize_model
    from harness.quantize.methods import needs_calibration
    from harness.quantize.model import count_bits

    settings = method_settings(cfg)
    report = quantize_model(
        model, str(cfg.dtype.name), int(cfg.bits), cfg.block_size,
        scale_format=str(cfg.scale_format), centering=bool(cfg.centering),
        method=settings.name, settings=settings, dtype_overrides=dtype_overrides(cfg),
        calibration=calibration if needs_calibration(settings.name) else None, progress=False,
    )  # fmt: skip
    count = count_bits(model, report)
    assert report.tensors and count.bits_per_param > 0


def _label(cfg) -> str:
    return (f"dtype={cfg.dtype.name} bits={cfg.bits} block_size={cfg.block_size} "
            f"scale_format={cfg.scale_format} centering={cfg.centering} "
            f"method={cfg.method.name}")  # fmt: skip


def test_every_axis_has_cells_on_both_sides(small_plan):
    """The grid is not degenerate: each scale format and method has accepted cells, and the
    planner refuses some (the product contains invalid combinations by construction)."""
    accepted, refused = small_plan
    assert {str(c.scale_format) for c in accepted} == set(SCALE_FORMATS)
    assert {c.method.name for c in accepted} == set(METHODS)
    assert {str(c.dtype.name) for c in accepted} == set(_dtypes())
    assert len(refused) > 50 and len(accepted) > 50


@pytest.mark.slow
def test_every_refusal_of_the_whole_grid_is_one_line(plan):
    _, refused = plan
    for cell, refusal in refused:
        assert "\n" not in refusal and "allowed" in refusal and "=" in refusal, (cell, refusal)


@pytest.mark.slow
def test_every_planned_combination_quantizes_a_tiny_model(plan):
    """Each accepted cell runs through its method on a tiny Llama without a config error."""
    accepted, _ = plan
    model, _ = tiny_model("llama")
    calibration = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))  # fmt: skip
    failures = []
    for cfg in accepted:
        try:
            _quantize(model, cfg, calibration)
        except (ValueError, TypeError) as exc:
            failures.append(f"{_label(cfg)}: {exc}")
    assert not failures, f"{len(failures)} planned cells failed:\n" + "\n".join(failures[:20])


def test_a_sample_of_planned_combinations_quantizes(small_plan):
    """The fast version of the test above: one accepted cell per (method, scale format)."""
    accepted, _ = small_plan
    model, _ = tiny_model("llama")
    calibration = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))  # fmt: skip
    seen = set()
    for cfg in accepted:
        key = (cfg.method.name, str(cfg.scale_format))
        if key not in seen:
            seen.add(key)
            _quantize(model, cfg, calibration)
    assert len(seen) >= len(METHODS) * 3


def test_refusals_are_one_line_naming_field_value_and_allowed(small_plan):
    _, refused = small_plan
    for cell, refusal in refused:
        assert "\n" not in refusal, (cell, refusal)
        assert "allowed" in refusal and "=" in refusal, (cell, refusal)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            ["centering=true", "scale_format=e8m0"],
            ["centering=True", "scale_format='e8m0'", "allowed: centering=False"],
        ),
        (
            ["dtype=quantile", "scale_format=mx"],
            ["scale_format='mx'", "dtype='quantile'", "allowed"],
        ),
        (["method=gptq", "format=nvfp4"], ["scale_format='nvfp4'", "GPTQ", "allowed"]),
        (["centering=true", "format=mxfp4"], ["centering=True", "scale_format='mx'"]),
        (["dtype=nf4", "scale_format=mx"], ["scale_format='mx'", "allowed"]),
        (["dtype=int", "scale_format=nvfp4", "block_size=16"], ["nvfp4", "e2m1"]),
        (["method=hqq", "dtype=int", "scale_format=e8m0"], ["method=hqq", "scale_format='e8m0'"]),
        (["bits=9"], ["bits=9", "allowed"]),
    ],
)
def test_the_issues_examples_are_refused_at_planning(overrides, words):
    register_schema()
    cfg = _compose(*overrides)
    with pytest.raises(ConfigError) as err:
        check_cell(cfg)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_the_baseline_is_never_refused_for_quantization_fields():
    """bits=16 quantizes nothing: its scale format and centering are not rules' input."""
    register_schema()
    check_cell(_compose("bits=16", "centering=true", "scale_format=e8m0"))
