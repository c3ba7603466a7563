"""Fast sweep planning: the same plan as composing and validating every cell one by one.

``plan_sweep`` with the default hooks and a :class:`harness.sweep.compose.CellComposer` takes each
cell as plain data and validates it with one :class:`harness.run.execute.CellValidator` (each check
once per distinct input). These tests hold it to the straightforward path (compose the cell,
``validate_cell``, ``cell_id``) on a mixed grid with invalid cells, and plan the paper grid
(26 hub models, faked as a local HF cache holding their config.json) without reading weights.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from test_models_tiny import save_tiny

from harness.records import STATUS_FAILED, cell_path, empty_record, write_cell

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(scope="module")
def bench(plan_bench):
    return plan_bench


@pytest.fixture
def fake_hub(bench, tmp_path, monkeypatch):
    """The paper's hub models as a local HF cache (config.json only), offline."""
    from huggingface_hub import constants

    hub = bench.build_fake_hub(tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


@pytest.fixture(autouse=True)
def _clear_hydra():
    """Other tests initialize Hydra themselves: leave it as found."""
    from hydra.core.global_hydra import GlobalHydra

    yield
    GlobalHydra.instance().clear()


def _hydra():
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra

    from harness.config.schema import register_schema

    register_schema()
    GlobalHydra.instance().clear()
    return Hydra.create_main_hydra2(
        task_name="run", config_search_path=create_config_search_path(str(CONF))
    )


def _master(hydra, overrides):
    from hydra.types import RunMode

    return hydra.compose_config("config", list(overrides), run_mode=RunMode.MULTIRUN)


def _plans(grid, master_overrides, target=None):
    """(fast plan, straightforward plan) of ``grid``, and the composer."""
    from harness.config.identity import cell_id
    from harness.run.execute import validate_cell
    from harness.sweep.compose import CellComposer
    from harness.sweep.plan import plan_sweep
    from harness.sweep.sweeper import launch_target

    hydra = _hydra()
    master = _master(hydra, master_overrides)
    task = [o for o in master_overrides if not o.startswith("hydra")]
    grid = [[*cell, *task] for cell in grid]  # the task overrides, as expand_union adds them
    target = target or launch_target(master.hydra.get("launcher"))
    fast = plan_sweep(grid, CellComposer(hydra.config_loader, master).compose, target=target)
    composer = CellComposer(hydra.config_loader, master)
    slow = plan_sweep(grid, composer.compose, cell_id=cell_id,
                      validate=lambda cfg: validate_cell(cfg, target), target=target)  # fmt: skip
    return fast, slow, composer


def _same(fast, slow):
    assert fast.problems == slow.problems
    assert (fast.duplicates, fast.invalid) == (slow.duplicates, slow.invalid)
    got = [(c.overrides, c.cell_id, c.sweep, c.results_dir, c.status, c.meta) for c in fast.cells]
    want = [(c.overrides, c.cell_id, c.sweep, c.results_dir, c.status, c.meta) for c in slow.cells]
    assert got == want


def _mixed_grid(tiny: Path) -> list[list[str]]:
    models = ["facebook/opt-125m", "EleutherAI/pythia-70m", str(tiny), "nobody/not-cached"]
    dtypes = ["int", "float", "nf4", "bogus"]  # nf4 only at 4 bits; bogus is no data type
    grid = [
        [f"model={m}", f"dtype={d}", f"bits={b}", f"block_size={bs}", f"method={me}"]
        for m, d, b, bs, me in itertools.product(
            models, dtypes, [3, 4, 16], [64, "null", 0], ["blockwise", "proxy"]
        )
    ]
    odd = [
        ["seed=-1"], ["+foo=1"], ["eval.limit=0.5"], ["eval.limit=5", "eval.limit=6"],
        ["eval=ppl"], ["eval=smoke", "eval.limit=3"], ["centering=true"], ["centering=maybe"],
        ["scale_format=e8m0"], ["scale_format=fp17"], ["device=cpu"], ["device=gpu"],
        ["zoo_dir=${oc.env:HOME}/zoo"], ["seed=${oc.env:NO_SUCH_VARIABLE_KBIT}"],
        ["seed=99999999999999999999"],  # passes every rule, but a record cannot store it
        ["compute_dtype=bfloat16"], ["method.outlier_fraction=0.05"], ["sweep=a/b"],
        ["model_family=opt"], ["quantize_head=true"], ["dtype=quantile", "bits=5"],
        ["~model_family"], ["blocksize=32"],
    ]  # fmt: skip
    for m, extra in itertools.product(models[:3], odd):
        grid.append([f"model={m}", "dtype=int", "bits=4", "method=proxy", *extra])
    return grid


def test_fast_plan_equals_one_cell_at_a_time(fake_hub, tmp_path):
    tiny = save_tiny("gpt_neox", tmp_path / "models" / "pythia-tiny")
    grid = _mixed_grid(tiny)
    results = tmp_path / "results"
    master = [f"results_dir={results}", "sweep=mixed"]
    fast, slow, composer = _plans(grid, master)
    _same(fast, slow)
    assert len(grid) > 300 and len(fast.cells) > 50 and fast.duplicates > 20
    text = "\n".join(fast.problems)
    for words in ("dtype=nf4", "bogus", "block_size=0", "seed=-1", "foo", "not-cached",
                  "centering", "fp17", "device='gpu'", "Could not delete", "blocksize",
                  "seed=99999999999999999999"):  # fmt: skip
        assert words in text, words
    # a record on disk: the second plan finds one cell done and one failed, in both paths
    assert {(c.results_dir, c.sweep) for c in fast.cells} == {(str(results), "mixed")}
    done, failed = fast.cells[0], fast.cells[1]
    write_cell([empty_record(task="x", metric="ppl", value=1.0)],
               cell_path(results, "mixed", done.cell_id))  # fmt: skip
    write_cell([empty_record(status=STATUS_FAILED, error="E")],
               cell_path(results, "mixed", failed.cell_id))  # fmt: skip
    fast2, slow2, _ = _plans(grid[:80], master)
    _same(fast2, slow2)
    assert fast2.counts()["done"] == 1 and fast2.counts()["failed"] == 1
    # and the shortcut's plain data is what Hydra's own compose gives each cell
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.config.schema import register_schema

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for overrides in [*grid[::53], *grid[-14:]]:
            cell = [*overrides, *master]
            try:
                want = OmegaConf.to_container(
                    compose("config", overrides=cell), resolve=True, enum_to_str=True
                )
            except Exception:
                want = "refused"
            try:
                got = composer.plain(cell)
            except Exception:
                got = "refused"
            assert got in (None, want), cell


def test_fast_plan_pins_numerics_for_gpu_jobs(fake_hub, tmp_path):
    """Jobs on GPU nodes: auto numerics resolve for a GPU (the checkpoint's 16-bit dtype)."""
    from harness.config.identity import Target

    grid = [[f"model={m}", f"bits={b}", "dtype=int"] for m in ("facebook/opt-125m",
            "bigscience/bloom") for b in (4, 16)]  # fmt: skip
    master = [f"results_dir={tmp_path}", "sweep=gpu"]
    fast, slow, _ = _plans(grid, master, Target(cuda_available=True))
    _same(fast, slow)
    pins = {p for c in fast.cells for p in c.overrides if p.startswith(("compute", "device"))}
    assert pins == {"compute_dtype=float16", "compute_dtype=bfloat16", "device=cuda"}


def test_plain_falls_back_where_overrides_overlap(fake_hub, tmp_path):
    from harness.sweep.compose import CellComposer

    hydra = _hydra()
    composer = CellComposer(hydra.config_loader, _master(hydra, [f"results_dir={tmp_path}"]))
    cell = ["model=facebook/opt-125m", "bits=4"]
    assert composer.plain(cell)["bits"] == 4
    # overrides of one top-level field are applied together (in order: the last wins), not
    # composed cell by cell (issue 21: a grid with eval.limit and eval.batch_size took minutes)
    assert composer.plain([*cell, "eval.limit=5", "eval.limit=6"])["eval"]["limit"] == 6
    assert composer.plain([*cell, "results_dir=${oc.env:HOME}"]) is None


def _paper_plan(bench, results: Path):
    """The paper sweep planned as KbitSweeper.sweep plans it (expand_union, CellComposer)."""
    from harness.sweep.compose import CellComposer
    from harness.sweep.expand import expand_union
    from harness.sweep.plan import plan_sweep
    from harness.sweep.sweeper import launch_target

    hydra = _hydra()
    arguments = ["+sweeps@_global_=paper", f"results_dir={results}"]
    master = _master(hydra, arguments)
    sweeper = OmegaConf.to_container(master.hydra.sweeper, resolve=True)
    params = {str(k): str(v) for k, v in sweeper["params"].items()}
    parser = OverridesParser.create(config_loader=hydra.config_loader)
    grid = expand_union(parser, params, sweeper.get("grids"), arguments)
    composer = CellComposer(hydra.config_loader, master)
    target = launch_target(master.hydra.get("launcher"))
    with bench.no_weight_reads() as attempts:
        plan = plan_sweep(grid, composer.compose, target=target)
    return grid, plan, attempts


def test_paper_grid_plans_without_reading_weights(bench, fake_hub, tmp_path, data_root):
    results = tmp_path / "results"
    grid, plan, attempts = _paper_plan(bench, results)
    assert not attempts
    assert len(grid) == bench.PAPER_CELLS == 19_994
    assert not plan.problems and plan.duplicates == 0
    assert plan.counts() == {"total": 19_994, "done": 0, "failed": 0, "to_run": 19_994}
    assert len({c.cell_id for c in plan.cells}) == 19_994
    assert not results.exists()  # planning writes nothing
