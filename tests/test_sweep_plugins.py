"""The sweep and the cluster layer after the split (issue 23): who imports whom, plugins loaded
in every process that plans or runs a cell, and packing asking the registries.

Fast: no model, no scheduler. The end-to-end runs of a plugin family under the local launcher
and Slurm are tests/test_plugins.py's.
"""

from __future__ import annotations

import ast
import math
import sys
import types
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


# ----------------------------------------------------------------------------- layers
@pytest.mark.parametrize(
    "path", sorted((ROOT / "harness" / "cluster").glob("*.py")), ids=lambda p: p.name
)
def test_the_cluster_layer_does_not_import_the_sweep(path):
    """The sweep sits above the cluster layer (it hands planned cells to harness.cluster.jobs);
    only the kbit-download command, an entry point, reads a sweep's grid."""
    if path.name == "download.py":
        return
    upward = [m for m in _imported_modules(path) if m == "harness.sweep" or
              m.startswith("harness.sweep.")]  # fmt: skip
    assert not upward, f"harness/cluster/{path.name} imports {upward}"


def test_the_sweep_modules_use_no_hydra_internal_but_the_one_function():
    """hydra._internal only inside harness.sweep.compose.apply_value_overrides (documented)."""
    for path in sorted((ROOT / "harness" / "sweep").glob("*.py")):
        tree = ast.parse(path.read_text())
        where = {}  # import node -> the function it is in (None: module level)
        for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            for node in ast.walk(fn):
                where.setdefault(node, fn.name)
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])  # fmt: skip
            if any("_internal" in m for m in modules):
                assert (path.name, where.get(node)) == ("compose.py", "apply_value_overrides"), (
                    f"{path.name}: {modules}"
                )


# ----------------------------------------------------------------------------- expansion
@pytest.mark.parametrize(
    "args",
    [
        ["a=1,2", "b=x,y,z"],
        ["model=m1,m2", "bits=3,4", "model=m3"],  # a key given twice: the last values win
        ["x=range(0,3)", "y=1", "+z=choice(p,q)"],
        ["bits=4"],
    ],
)
def test_the_grid_product_is_hydras_basic_sweeper_product(args):
    """Against Hydra's own expansion (its basic sweeper, used here only as the reference)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from harness.sweep.expand import product

    parsed = OverridesParser.create().parse_overrides(args)
    assert product(parsed) == BasicSweeper.split_arguments(parsed, None)[0]


# ----------------------------------------------------------------------------- jobs <-> sweep
class _Launcher:
    waits = False
    poll_s = 1.0

    def __init__(self, error=None):
        self.error = error

    def launch_packed(self, specs):
        if self.error is not None:
            raise self.error
        return types.SimpleNamespace(arrays=[("7", len(specs), "x")], jobs=[None] * len(specs))


def _cells(tmp_path, n=2):
    from harness.sweep.plan import Cell

    return [Cell([f"bits={b}"], f"c{b}", "s", str(tmp_path)) for b in range(3, 3 + n)]


def test_a_refused_submission_is_a_jobs_error_the_sweeper_turns_into_a_refusal(tmp_path):
    from harness.cluster.jobs import JobsError, launch
    from harness.cluster.launcher import SubmissionError

    todo = _cells(tmp_path)
    specs = [types.SimpleNamespace(cells=[c.overrides], planned=[]) for c in todo]
    with pytest.raises(JobsError) as err:
        launch(_Launcher(SubmissionError("sbatch: no partition")), specs, todo)
    assert err.value.refused and str(err.value) == "submission failed: sbatch: no partition"
    with pytest.raises(JobsError) as err:
        launch(_Launcher(SubmissionError("later array", queued=["5"])), specs, todo)
    assert not err.value.refused  # an array was queued: the launch is not undone


def test_a_launch_that_does_not_wait_returns_no_outcome(tmp_path):
    from harness.cluster.jobs import launch

    todo = _cells(tmp_path)
    specs = [types.SimpleNamespace(cells=[c.overrides], planned=[]) for c in todo]
    assert launch(_Launcher(), specs, todo) is None


# ----------------------------------------------------------------------------- plugins
@pytest.fixture
def plugin_calls(monkeypatch):
    """harness.plugins.load_plugins replaced by a recorder (same name, same call)."""
    calls: list[list[str]] = []
    stub = types.ModuleType("harness.plugins")
    stub.load_plugins = lambda modules=(): calls.append(list(modules)) or {}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "harness.plugins", stub)
    return calls


def test_a_cells_plugins_come_from_its_plan_else_its_overrides():
    from harness.cluster.in_job import PLUGIN_MODULES, cell_plugins

    assert cell_plugins(["plugins=[a]"], {PLUGIN_MODULES: ["p.q", "r"]}) == ["p.q", "r"]
    assert cell_plugins(["bits=4", "plugins=[my.mod,other]"], None) == ["my.mod", "other"]
    assert cell_plugins(["+plugins=[x]"], {"cell_id": "c"}) == ["x"]  # an older plan
    assert cell_plugins(["bits=4"], None) == []


def test_the_packed_job_loads_each_cells_plugins_before_composing_it(monkeypatch, plugin_calls):
    from harness.cluster import launcher as module
    from harness.cluster.in_job import PLUGIN_MODULES
    from harness.cluster.launcher import PackedLocalLauncher

    order: list[tuple[str, object]] = []

    def compose_and_run(self, overrides, *args):  # what composes the cell in the job
        order.append(("compose", list(plugin_calls)))
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED)

    monkeypatch.setattr(module.BaseSubmititLauncher, "__call__", compose_and_run)
    job = object.__new__(PackedLocalLauncher)
    job.params = {}
    planned = [{PLUGIN_MODULES: ["fam.one"]}, {PLUGIN_MODULES: []}]
    job([["bits=3"], ["bits=4"]], 0, {}, planned)
    assert order == [("compose", [["fam.one"]]), ("compose", [["fam.one"], []])]


def test_the_planner_loads_the_sweeps_plugins_before_composing(plugin_calls):
    from harness.sweep.sweeper import load_sweep_plugins

    config = OmegaConf.create({"plugins": ["base.mod"]})
    grid = [["bits=3", "plugins=[a.b]"], ["bits=4", "plugins=[a.b,c]"], ["bits=5"]]
    load_sweep_plugins(config, grid)
    assert plugin_calls == [["base.mod", "a.b", "c"]]
    load_sweep_plugins(OmegaConf.create({}), [["bits=3"]])
    assert plugin_calls[-1] == []  # still called: the kbit.plugins entry points


def test_a_planned_cell_names_its_plugins(tmp_path):
    from harness.cluster.in_job import PLUGIN_MODULES
    from harness.cluster.jobs import cell_meta, planned_cell

    cfg = OmegaConf.create({"model": "m", "bits": 16, "plugins": ["x.y"], "eval": {}})
    (cell,) = _cells(tmp_path, 1)
    cell.meta = cell_meta(cfg, None)
    assert planned_cell(cell)[PLUGIN_MODULES] == ["x.y"]


# ----------------------------------------------------------------------------- registries
def test_packing_asks_the_method_registry_about_calibration(monkeypatch):
    from harness.cluster.packing import CALIBRATION_PASSES, cell_tokens
    from harness.quantize import methods

    def cfg(name):
        return {"eval": {}, "bits": 4, "method": {"name": name, "n_samples": 4, "seqlen": 8}}

    assert methods.needs_calibration("gptq") and not methods.needs_calibration("blockwise")
    assert cell_tokens(cfg("gptq")) == CALIBRATION_PASSES * 4 * 8
    assert cell_tokens(cfg("blockwise")) == 0
    monkeypatch.setattr(methods, "needs_calibration", lambda name: name == "blockwise")
    assert cell_tokens(cfg("blockwise")) == CALIBRATION_PASSES * 4 * 8  # no name compared
    assert cell_tokens(cfg("gptq")) == 0


def test_packing_sizes_tasks_from_their_definition_files():
    from harness.cluster.packing import DEFAULT_TASK, eval_tokens

    folder = ROOT / "harness" / "evaluate" / "local_tasks"
    sized = 0
    for path in sorted(folder.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text().replace("!function", ""))
        name, cost = doc["task"], (doc.get("kbit") or {}).get("cost")
        expected = (
            cost["examples"] * cost["tokens_per_example"] if cost else math.prod(DEFAULT_TASK)
        )
        assert eval_tokens({"tasks": [name]}) == expected, name
        sized += bool(cost)
    assert sized >= 4  # the paper's zero-shot tasks declare their size
    assert eval_tokens({"tasks": ["no_such_task"]}) == math.prod(DEFAULT_TASK)
