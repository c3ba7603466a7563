"""Sweep planning's closed doors (issue 21): refusals in one line, typos named, no empty grid,
no manifest for a refused launch, live jobs asked before the store, a size cap on the grid.

- a refused sweep is ONE line on stderr (``kbit-run: ...``), exit 2, naming the field, the
  value, what is allowed and how many cells share the problem; nothing is queued or written;
- an unknown key of a sweep file (``hydra.sweeper.parms``, ``jobs.cell_per_job``, a top-level
  key) is named with its file and the closest allowed keys;
- a grid with no cells is refused; a real grid whose cells are all ok still exits 0;
- a refused submission leaves no ``sweep_manifest.json``;
- the scheduler is asked which cells live jobs hold BEFORE the store is read, so a cell whose
  job finishes while the sweep is planned is held or done, never submitted again (also on the
  real local Slurm, with cells finishing during planning);
- a grid above ``hydra.sweeper.max_cells`` is refused from its dimensions, before expanding;
- several value overrides of one top-level field (``eval.limit=.. eval.batch_size=..``) keep the
  fast planning path and give the composed config (a 24,000-cell grid of that kind took
  minutes, composed cell by cell).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from harness.records import STATUS_OK, cell_files, cell_path, empty_record, read_store, write_cell
from harness.sweep import expand as expand_module
from harness.sweep import plan as sweep_module
from harness.sweep.expand import expand_union
from harness.sweep.plan import (
    MANIFEST,
    Cell,
    SweepError,
    SweepPlan,
    manifest_unless_refused,
    plan_sweep,
    raise_on_problems,
    read_manifest,
    write_manifest,
)

ROOT = Path(__file__).resolve().parents[1]
KBIT_RUN = str(Path(sys.executable).parent / "kbit-run")


def _kbit_run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([KBIT_RUN, "--multirun", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _one_line_refusal(proc: subprocess.CompletedProcess) -> str:
    """The refusal: exit 2 and exactly one line on stderr, prefixed by the command."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kbit-run: "), lines[0]
    return lines[0]


def _nothing_written(*folders: Path) -> None:
    for folder in folders:
        assert not folder.exists() or not any(folder.rglob("*")), sorted(folder.rglob("*"))


# ----------------------------------------------------------------------------- one line
@pytest.mark.slow
def test_a_refused_grid_is_one_line_naming_field_value_allowed_and_counts(tmp_path):
    results = tmp_path / "results"
    missing = tmp_path / "no-such-model"
    proc = _kbit_run([f"model={missing}", "dtype=int", "bits=3,4,42", "block_size=64",
                      f"results_dir={results}", "device=cpu", "eval=ppl"])  # fmt: skip
    line = _one_line_refusal(proc)
    assert "Sweep not launched" in line and "nothing was queued or written" in line
    # every distinct problem, its field and value, what is allowed, and how many cells
    assert f"model='{missing}'" in line and "allowed:" in line
    assert "bits=42" in line and "[1 cell(s)" in line and "[2 cell(s)" in line
    assert "in a grid of 3 cells" in line
    _nothing_written(results)


def test_refusal_line_names_the_first_problems_and_logs_all(tmp_path, caplog):
    plan = SweepPlan(invalid=9)
    plan.problems = [f"bits={b} is not legal; allowed: 3..8  [{b} cell(s), e.g. bits={b}]"
                     for b in range(20, 25)]  # fmt: skip
    with pytest.raises(SweepError) as err, caplog.at_level("ERROR", logger="harness.sweep.plan"):
        raise_on_problems(plan, 40)
    msg = str(err.value)
    assert err.value.refused and "\n" not in msg
    assert "5 problem(s) in a grid of 40 cells" in msg
    assert all(f"bits={b}" in msg for b in (20, 21, 22)) and "bits=23" not in msg
    assert "and 2 more problem(s)" in msg
    logged = [r.getMessage() for r in caplog.records]
    assert all(any(f"bits={b} " in m for m in logged) for b in range(20, 25))  # all of them


def test_a_refused_sweep_error_is_one_line():
    err = SweepError("sbatch: error: Batch job submission failed:\n  Invalid partition name\n",
                     refused=True)  # fmt: skip
    assert "\n" not in str(err) and "Invalid partition name" in str(err)
    assert "\n" in str(SweepError("line one\nline two"))  # a failure (exit 1) keeps its lines


# ----------------------------------------------------------------------------- typos in sweep files
def _sweep_file(root: Path, name: str, body: str) -> Path:
    folder = root / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(f"# @package _global_\ndefaults:\n  - override /hydra/sweeper: kbit\n"
                    f"sweep: {name}\n" + textwrap.dedent(body))  # fmt: skip
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, body, named, closest",
    [
        ("parms", "hydra:\n  sweeper:\n    parms:\n      bits: 3,4\n",
         "hydra.sweeper.parms", "did you mean 'params'"),
        ("chunks", "hydra:\n  sweeper:\n    params:\n      bits: 3,4\n    jobs:\n"
         "      cell_per_job: 3\n", "hydra.sweeper.jobs.cell_per_job", "did you mean 'cells_per_job'"),
        ("gpus", "hydra:\n  sweeper:\n    params:\n      bits: 3,4\n    resources:\n"
         "      gpu_memory: 40\n", "hydra.sweeper.resources.gpu_memory",
         "did you mean 'gpu_memory_gb'"),
        ("toplevel", "blocksize: 64\nhydra:\n  sweeper:\n    params:\n      bits: 3,4\n",
         "blocksize", "block_size"),
    ],
    ids=["sweeper-key", "jobs-key", "resources-key", "top-level-key"],
)  # fmt: skip
def test_an_unknown_key_of_a_sweep_file_is_named_with_its_file(tmp_path, name, body, named,
                                                                closest):  # fmt: skip
    search = tmp_path / "search"
    _sweep_file(search, name, body)
    results = tmp_path / "results"
    proc = _kbit_run([f"hydra.searchpath=[file://{search}]", f"+sweeps@_global_={name}",
                      f"model={tmp_path / 'm'}", f"results_dir={results}"])  # fmt: skip
    line = _one_line_refusal(proc)
    assert named in line and closest in line, line
    assert f"sweeps/{name}" in line, line  # the file the key is in
    _nothing_written(results)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, body, named",
    [
        ("boolval", "hydra:\n  sweeper:\n    params:\n      quantize_head: 2,false\n",
         "quantize_head=2 is not a boolean"),
        ("groupval", "hydra:\n  sweeper:\n    params:\n      dtype: int,../../x\n",
         "dtype='../../x' is not a config name"),
        ("fmtval", "hydra:\n  sweeper:\n    params:\n      format: nvfp4\n"
         "      block_size: 16,64\n", "format=nvfp4 fixes block_size=16"),
    ],
    ids=["bool", "group-path", "format-conflict"],
)  # fmt: skip
def test_values_a_sweep_file_sets_obey_the_command_line_rules(tmp_path, name, body, named):
    """A sweep file's params are held to the rules kbit-run applies to its own overrides."""
    search = tmp_path / "search"
    _sweep_file(search, name, body)
    results = tmp_path / "results"
    proc = _kbit_run([f"hydra.searchpath=[file://{search}]", f"+sweeps@_global_={name}",
                      f"model={tmp_path / 'm'}", f"results_dir={results}"])  # fmt: skip
    line = _one_line_refusal(proc)
    assert named in line and "hydra.sweeper" in line, line
    _nothing_written(results)


@pytest.mark.slow
def test_an_unknown_sweeper_key_on_the_command_line_is_named_there(tmp_path):
    results = tmp_path / "results"
    proc = _kbit_run(["hydra/sweeper=kbit", "+hydra.sweeper.dryrun=true",
                      f"model={tmp_path / 'm'}", f"results_dir={results}"])  # fmt: skip
    line = _one_line_refusal(proc)
    assert "hydra.sweeper.dryrun" in line and "on the command line" in line
    assert "did you mean 'dry_run'" in line
    for setting, allowed in [("hydra.sweeper.grids={bits:3}", "a list of dicts"),
                             ("hydra.sweeper.params=[1]", "a dict of field: values")]:  # fmt: skip
        proc = _kbit_run(["hydra/sweeper=kbit", setting, f"model={tmp_path / 'm'}",
                          f"results_dir={results}"])  # fmt: skip
        line = _one_line_refusal(proc)
        assert setting.split("=")[0] in line and f"allowed: {allowed}" in line, line
    _nothing_written(results)


# ----------------------------------------------------------------------------- empty grid
@pytest.mark.slow
def test_an_empty_grid_is_refused(tmp_path):
    results = tmp_path / "results"
    proc = _kbit_run(["hydra/sweeper=kbit", "bits=range(3,3)", f"model={tmp_path / 'm'}",
                      f"results_dir={results}"])  # fmt: skip
    line = _one_line_refusal(proc)
    assert "the grid has no cells" in line and "bits=range(3,3)" in line
    assert "every cell" not in proc.stdout + proc.stderr
    _nothing_written(results)


def test_a_grid_part_without_values_is_refused_naming_it():
    parser = OverridesParser.create()
    grids = [{"bits": "3,4"}, {"bits": "range(5,5)"}]
    with pytest.raises(SweepError) as err:
        expand_union(parser, {"model": "a,b"}, grids, [])
    assert err.value.refused and "no cells" in str(err.value)
    assert "bits=range(5,5)" in str(err.value) and "grids[1]" in str(err.value)
    with pytest.raises(SweepError, match="no cells"):
        raise_on_problems(SweepPlan(), 0)  # and a plan of no cells, however it came about


@pytest.mark.slow
def test_a_real_grid_whose_cells_are_all_done_still_exits_0(tmp_path):
    from test_models_tiny import save_tiny

    model = save_tiny("gpt2", tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the cat sat on the mat and the dog ran"] * 40))
    results = tmp_path / "results"
    args = ["hydra/sweeper=kbit", f"model={model}", "bits=4,16", "dtype=int", "block_size=16",
            f"results_dir={results}", "sweep=done", "device=cpu", "eval=ppl",
            f"eval.perplexity=[{{name:t,path:'{text}',seqlen:16,max_tokens:64}}]"]  # fmt: skip
    first = _kbit_run(args, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    again = _kbit_run(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "every cell of the grid has an ok record" in again.stdout + again.stderr


# ----------------------------------------------------------------------------- size cap
def test_the_size_cap_counts_the_grid_without_expanding_it(monkeypatch):
    parser = OverridesParser.create()

    def never(*args, **kwargs):
        raise AssertionError("the grid was expanded")

    monkeypatch.setattr(expand_module, "expand_grid", never)
    with pytest.raises(SweepError) as err:  # 10^9 x 2 cells: listing them would never end
        expand_union(parser, {"seed": "range(0,1000000000)"}, None, ["bits=3,4"], max_cells=10)
    msg = str(err.value)
    assert err.value.refused and "2,000,000,000 cells" in msg and "max_cells=10" in msg


def test_the_counted_size_is_the_expanded_size():
    """Against brute force: params x each grid x the command line (which wins over both), a
    range, a key given twice, and parts that overlap (each part's cells count)."""
    parser = OverridesParser.create()
    params = {"model": "a,b,c", "block_size": "64,128", "bits": "3,4"}
    grids = [{"dtype": "int,float", "bits": "range(3,6)"}, {"dtype": "nf4", "bits": "4"},
             {"bits": "16"}]  # fmt: skip
    arguments = ["block_size=32,64,256", "seed=range(0,4,2)"]
    models, blocks, seeds = "abc", [32, 64, 256], [0, 2]
    want = len(list(itertools.product(models, blocks, [3, 4, 5], ["int", "float"], seeds)))
    want += len(list(itertools.product(models, blocks, [4], ["nf4"], seeds)))
    want += len(list(itertools.product(models, blocks, [16], seeds)))
    assert want == 144
    cells = expand_union(parser, params, grids, arguments, max_cells=want)
    assert len(cells) == want
    with pytest.raises(
        SweepError, match=f"{want:,} cells, above hydra.sweeper.max_cells={want - 1}"
    ):
        expand_union(parser, params, grids, arguments, max_cells=want - 1)


@pytest.mark.slow
def test_a_grid_above_the_cap_is_refused_on_the_command_line(tmp_path):
    results = tmp_path / "results"
    tic = time.monotonic()
    proc = _kbit_run(["hydra/sweeper=kbit", "seed=range(0,300000)", f"model={tmp_path / 'm'}",
                      f"results_dir={results}"])  # fmt: skip
    took = time.monotonic() - tic
    line = _one_line_refusal(proc)
    assert "300,000 cells" in line and "max_cells=100000" in line, line
    _nothing_written(results)
    print(f"refused a 300,000-cell grid in {took:.1f} s (process start included)")
    bad = _kbit_run(["hydra/sweeper=kbit", "hydra.sweeper.max_cells=0", f"model={tmp_path}",
                     f"results_dir={results}"])  # fmt: skip
    assert "hydra.sweeper.max_cells=0; allowed: an integer >= 1, or null" in _one_line_refusal(bad)


# ----------------------------------------------------------------------------- manifest
def _cells(results: Path, sweep: str, ids: list[str]) -> SweepPlan:
    return SweepPlan(cells=[Cell([f"bits={i}"], cid, sweep, str(results)) for i, cid in
                            enumerate(ids)])  # fmt: skip


def test_a_refused_launch_leaves_no_manifest(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    plan = _cells(results, "s", ["a1", "b2"])
    with pytest.raises(SweepError), manifest_unless_refused(plan) as written:
        assert [p.name for p in written] == [MANIFEST]  # there while the launcher submits
        raise SweepError("submission failed: sbatch: invalid partition", refused=True)
    assert sorted(results.iterdir()) == []  # no manifest, no sweep folder

    (first,) = write_manifest(_cells(results, "s", ["a1"]))
    body = first.read_bytes()
    with pytest.raises(SweepError), manifest_unless_refused(plan):
        raise SweepError("refused", refused=True)
    assert first.read_bytes() == body  # an earlier launch's manifest is as it was

    with pytest.raises(SweepError), manifest_unless_refused(plan):
        raise SweepError("2 of 3 arrays queued, then sbatch failed")  # something was queued
    assert set(read_manifest(first)) == {"a1", "b2"}


# ----------------------------------------------------------------------------- live jobs first
def _stub_plan_inputs(results: Path):
    base = OmegaConf.create({"model": "m", "bits": 4, "sweep": "t", "results_dir": str(results)})

    def compose(overrides):
        return OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))

    def cell_id(cfg):
        return f"c{cfg.bits}"

    return compose, cell_id, lambda cfg: None


def test_live_jobs_are_asked_before_the_store_is_read(tmp_path, monkeypatch):
    """A cell whose job finishes between the scheduler's answer and the store read is done;
    one still running is held: neither is planned to run (whatever happens in between)."""
    results = tmp_path / "results"
    compose, cell_id, validate = _stub_plan_inputs(results)
    grid = [[f"bits={b}"] for b in (3, 4, 5, 6)]
    order: list[str] = []
    real_read = sweep_module.read_statuses

    def live(cells):
        order.append("scheduler")
        # c3 and c4 run in a live job; c3's job writes its record right after squeue answered
        write_cell([empty_record(task="x", metric="ppl", value=1.0)], cell_path(results, "t", "c3"))
        return {(str(results), "t", c): "RUNNING" for c in ("c3", "c4")}

    def read(cells):
        order.append("store")
        real_read(cells)

    monkeypatch.setattr(sweep_module, "read_statuses", read)
    plan = plan_sweep(grid, compose, cell_id, validate, live=live)
    assert order == ["scheduler", "store"]
    status = {c.cell_id: c.status for c in plan.cells}
    assert status == {"c3": STATUS_OK, "c4": None, "c5": None, "c6": None}
    assert set(plan.held) == {(str(results), "t", "c4")}  # c3 is done, not held
    todo = [c.cell_id for c in plan.to_run() if (c.results_dir, c.sweep, c.cell_id)
            not in plan.held]  # fmt: skip
    assert todo == ["c5", "c6"]


def test_an_unknowable_scheduler_refuses_in_one_line(tmp_path):
    compose, cell_id, validate = _stub_plan_inputs(tmp_path)

    def live(cells):
        raise ValueError(".jobs names jobs of an earlier launch, and squeue failed")

    with pytest.raises(SweepError) as err:
        plan_sweep([["bits=3"]], compose, cell_id, validate, live=live)
    assert err.value.refused and "squeue failed" in str(err.value)


# ----------------------------------------------------------------------------- fast path
def test_overrides_of_one_field_keep_the_fast_path_and_equal_hydra(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from harness.config.schema import register_schema
    from harness.sweep.compose import CellComposer

    register_schema()
    GlobalHydra.instance().clear()
    hydra = Hydra.create_main_hydra2(
        task_name="run", config_search_path=create_config_search_path(str(ROOT / "conf"))
    )
    master = [f"results_dir={tmp_path}"]
    composed = hydra.compose_config("config", master, run_mode=RunMode.MULTIRUN)
    composer = CellComposer(hydra.config_loader, composed)
    cells = [
        ["model=m", "eval=ppl", "eval.limit=5", "eval.batch_size=3"],
        ["model=m", "eval.limit=5", "bits=3", "eval.limit=7"],  # the last one wins
        ["model=m", "method=proxy", "method.outlier_fraction=0.05", "method.outlier_fraction=0.1"],
        ["model=m", "eval.limit=5", "eval.batch_size=-1"],  # composes; the rules refuse later
    ]
    got = [composer.plain([*c, *master]) for c in cells]
    assert all(g is not None for g in got)  # no fallback to composing each cell
    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for cell, plain in zip(cells, got, strict=True):
            want = OmegaConf.to_container(compose("config", overrides=[*cell, *master]),
                                          resolve=True, enum_to_str=True)  # fmt: skip
            assert plain == want, cell
    GlobalHydra.instance().clear()
    assert got[1]["eval"]["limit"] == 7 and got[2]["method"]["outlier_fraction"] == 0.1
    with pytest.raises(Exception, match=r"eval\.batch_size"):  # fails as compose does
        composer.plain(["model=m", "eval.batch_size=abc", "eval.limit=5", *master])


# ----------------------------------------------------------------------------- real Slurm
def _squeue(name: str) -> list[tuple[str, str]]:
    out = subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", "%i %T"], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return [tuple(line.split()) for line in out.stdout.splitlines() if line.strip()]


def _wait_drained(name: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while _squeue(name) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert not _squeue(name), f"jobs of {name} still queued after {timeout}s"


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    from harness.cluster import slurm

    if not slurm.is_up():
        pytest.skip("no Slurm cluster is up (python -m harness.cluster.slurm up)")


def _slurm_grid(model: Path, text: Path, results: Path, name: str) -> list[str]:
    """One tiny model, 17 cells, 2 per job: 9 jobs, one at a time (the sweep lasts minutes)."""
    return [
        "hydra/sweeper=kbit", f"model={model}", "dtype=int,float", "bits=3,4,5,6,16",
        "block_size=8,16", "sweep=race", f"results_dir={results}", "eval=ppl",
        f"eval.perplexity=[{{name:tiny,path:'{text}',seqlen:32,max_tokens:64}}]", "device=cpu",
        "hydra/launcher=slurm", "hydra.launcher.partition=debug", f"hydra.launcher.name={name}",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=20", "hydra.launcher.array_parallelism=1",
        "hydra.sweeper.jobs.cells_per_job=2",
    ]  # fmt: skip


# Runs kbit-run in this process with both reads wrapped: whichever of "ask the scheduler" and
# "read the store" comes first snapshots the running tasks; the second waits until one of them
# has ended (its cells finished DURING planning) before it reads.
_RACE_DRIVER = """
import json, os, subprocess, sys, time
from hydra.core.plugins import Plugins
Plugins.instance()  # Hydra's plugin scan first, as kbit-run does (it re-executes BasicSweeper)
import harness.cluster.leases as claims
import harness.sweep.plan as sweep
name, report = os.environ["RACE_NAME"], os.environ["RACE_REPORT"]
seen = {"order": [], "running": [], "ended": []}

def live():
    out = subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", "%i %T"],
                         capture_output=True, text=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())

def between(which):
    seen["order"].append(which)
    if len(seen["order"]) == 1:  # (before the first read: a task of the sweep running)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and live() and "RUNNING" not in live().values():
            time.sleep(0.2)
        seen["running"] = sorted(t for t, s in live().items() if s == "RUNNING")
    elif len(seen["order"]) == 2 and seen["running"]:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            ended = [t for t in seen["running"] if t not in live()]
            if ended:
                seen["ended"] = ended
                break
            time.sleep(0.2)
    with open(report, "w") as fh:
        json.dump(seen, fh)

real_states, real_read = claims.scheduler_states, sweep.read_statuses
def states(*a, **k):
    between("scheduler")
    return real_states(*a, **k)
def read(cells):
    between("store")
    return real_read(cells)
claims.scheduler_states, sweep.read_statuses = states, read
sys.argv = ["kbit-run", "--multirun", *sys.argv[1:]]
from harness.run.execute import main
main()
"""


@pytest.mark.slurm
@pytest.mark.slow
def test_rerun_during_live_jobs_never_resubmits_a_cell_finishing_during_planning(
    slurm_cluster, tmp_path
):
    from test_sweep_e2e import WORDS, make_tiny_models

    (model,) = make_tiny_models(tmp_path / "models", n=1)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(300)))
    results = tmp_path / "results"
    name = f"kbit-race-{uuid.uuid4().hex[:8]}"
    args = _slurm_grid(model, text, results, name)
    first = _kbit_run(args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    arrays = {p.stem for p in (results / "race" / ".jobs").glob("*.json")}
    assert arrays and "submitted 9 jobs" in first.stdout + first.stderr
    try:
        deadline = time.monotonic() + 600  # a task running, and cells still to come
        while time.monotonic() < deadline:
            states = [s for _, s in _squeue(name)]
            if "RUNNING" in states:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no task of the sweep was seen running")
        driver = tmp_path / "race_driver.py"
        driver.write_text(_RACE_DRIVER)
        report = tmp_path / "race.json"
        env = {**os.environ, "RACE_NAME": name, "RACE_REPORT": str(report),
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
        again = subprocess.run([sys.executable, str(driver), *args], env=env,
                               capture_output=True, text=True, timeout=900)  # fmt: skip
        out = again.stdout + again.stderr
        assert again.returncode == 0 and report.is_file(), out[-3000:]
        seen = json.loads(report.read_text())
        assert seen["order"][:2] == ["scheduler", "store"], seen  # the scheduler first
        assert seen["ended"], seen  # a task ended between the two reads: the race happened
        assert "submitted" not in out, out[-3000:]  # nothing done or running went out again
        assert {p.stem for p in (results / "race" / ".jobs").glob("*.json")} <= arrays
    finally:
        _wait_drained(name)
    rows = read_store(results, "race").to_pylist()
    per_cell: dict[str, set] = {}
    for r in rows:
        per_cell.setdefault(r["cell_id"], set()).add(r["job_id"])
    assert len(per_cell) == len(cell_files(results, "race")) == 17
    assert all(len(jobs) == 1 for jobs in per_cell.values())  # each cell ran once
    assert {j.split("_")[0] for jobs in per_cell.values() for j in jobs} <= arrays


@pytest.mark.slurm
@pytest.mark.slow
def test_a_submission_the_scheduler_refuses_writes_no_manifest(slurm_cluster, tmp_path):
    from test_sweep_e2e import WORDS, make_tiny_models

    (model,) = make_tiny_models(tmp_path / "models", n=1)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(300)))
    results = tmp_path / "results"
    name = f"kbit-refused-{uuid.uuid4().hex[:8]}"
    args = [a.replace("partition=debug", "partition=no_such_partition")
            for a in _slurm_grid(model, text, results, name)]  # fmt: skip
    proc = _kbit_run(args)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "nothing was queued" in proc.stderr and not _squeue(name)
    assert not (results / "race").exists(), sorted((results / "race").rglob("*"))


def test_the_plan_reads_and_writes_the_expanded_results_folder(plan_bench, tmp_path, monkeypatch):
    """``results_dir='~/res'``: the fast plan equals the cell-by-cell plan, both look the
    store up (and would write the manifest) under $HOME/res, never a literal ``./~``."""
    from huggingface_hub import constants

    from harness.config.identity import cell_id
    from harness.run.execute import validate_cell
    from harness.sweep.compose import CellComposer
    from harness.sweep.plan import plan_sweep

    hub = plan_bench.build_fake_hub(tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from harness.config.schema import register_schema

    register_schema()
    GlobalHydra.instance().clear()
    hydra = Hydra.create_main_hydra2(
        task_name="run", config_search_path=create_config_search_path(str(ROOT / "conf"))
    )
    master = ["results_dir='~/res'", "sweep=home", "eval=ppl", "device=cpu"]
    composed = hydra.compose_config("config", master, run_mode=RunMode.MULTIRUN)
    grid = [["model=facebook/opt-125m", f"bits={b}", *master] for b in (3, 4, 16)]
    try:
        fast = plan_sweep(grid, CellComposer(hydra.config_loader, composed).compose)
        slow = plan_sweep(grid, CellComposer(hydra.config_loader, composed).compose,
                          cell_id=cell_id, validate=validate_cell)  # fmt: skip
    finally:
        GlobalHydra.instance().clear()
    assert not fast.problems, fast.problems
    assert [(c.cell_id, c.results_dir) for c in fast.cells] == [
        (c.cell_id, c.results_dir) for c in slow.cells
    ]
    assert {c.results_dir for c in fast.cells} == {str(home / "res")}
    write_manifest(fast)
    assert (home / "res" / "home" / MANIFEST).is_file() and not (tmp_path / "~").exists()
