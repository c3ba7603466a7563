"""Packing cells into jobs, claims of live jobs, and the plan printed before submitting.

Pure functions, checked against brute-force expectations: every cell lands in exactly one job,
jobs never mix models, a chunk never exceeds its cap or (with more than one cell) its time
target, and held cells are exactly those of live tasks.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from harness.cluster import leases as claims
from harness.cluster.jobs import JobsError, Settings, check_settings, describe_jobs
from harness.cluster.launcher import JobSpec
from harness.cluster.packing import (
    JobsConf,
    check_jobs_conf,
    estimate_cell_seconds,
    eval_tokens,
    pack,
)


def _cells(models: dict[str, int]) -> list[tuple[str, int]]:
    return [(m, i) for m, n in models.items() for i in range(n)]


@pytest.mark.parametrize("n, c", [(5, 2), (7, 7), (1, 3), (12, 5), (10, 1)])
def test_cells_per_job_gives_ceil_n_over_c_jobs_per_model(n, c):
    cells = _cells({"a": n, "b": n})
    jobs = pack(
        cells, lambda x: x[0], lambda x: 1.0, JobsConf(cells_per_job=c, minutes_per_job=None)
    )
    for model in "ab":
        mine = [j for j in jobs if j.model == model]
        assert len(mine) == math.ceil(n / c)
        assert all(cell[0] == model for j in mine for cell in j.cells)
    assert sorted(x for j in jobs for x in j.cells) == sorted(cells)  # each cell exactly once
    assert [x for j in jobs for x in j.cells] == cells  # grid order kept


def test_minutes_target_against_brute_force():
    rng = random.Random(0)
    cells = [("m", i, rng.uniform(10, 900)) for i in range(200)]
    target = 30.0
    jobs = pack(cells, lambda x: x[0], lambda x: x[2], JobsConf(minutes_per_job=target))
    # greedy reference: close a chunk when the next cell would take it over the target
    expected, chunk, total = [], [], 0.0
    for cell in cells:
        if chunk and total + cell[2] > target * 60:
            expected.append(chunk)
            chunk, total = [], 0.0
        chunk.append(cell)
        total += cell[2]
    expected.append(chunk)
    assert [j.cells for j in jobs] == expected
    for job in jobs:
        assert len(job.cells) == 1 or job.seconds <= target * 60
        assert job.seconds == pytest.approx(sum(c[2] for c in job.cells))


def test_a_cell_longer_than_the_target_gets_its_own_job():
    cells = [("m", 0, 10.0), ("m", 1, 99_999.0), ("m", 2, 10.0)]
    jobs = pack(cells, lambda x: x[0], lambda x: x[2], JobsConf(minutes_per_job=1.0))
    assert [len(j.cells) for j in jobs] == [1, 1, 1]


@pytest.mark.parametrize(
    "conf, words",
    [
        ({"cells_per_job": 0}, ["cells_per_job=0", "integer >= 1"]),
        ({"cells_per_job": 2.5}, ["cells_per_job=2.5"]),
        ({"minutes_per_job": -1}, ["minutes_per_job=-1", "> 0"]),
        ({"cell_per_job": 3}, ["cell_per_job", "allowed: cells_per_job, minutes_per_job"]),
    ],
)
def test_bad_jobs_settings_name_the_field(conf, words):
    with pytest.raises(ValueError) as err:
        check_jobs_conf(conf)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_bad_resource_settings_name_the_field():
    with pytest.raises(ValueError) as err:
        check_settings(None, {"gpu_memory_gbb": 80})
    assert "gpu_memory_gbb" in str(err.value)
    assert check_settings({"cells_per_job": 3}, None).resources is None
    rule = check_settings(None, {"gpu_memory_gb": 40}).resources
    assert rule.gpu_memory_gb == 40


def test_eval_tokens_follow_limits_and_caps():
    full = {"perplexity": [{"max_tokens": None}], "tasks": ["piqa"], "limit": None}
    capped = {"perplexity": [{"max_tokens": 1000}], "tasks": ["piqa"], "limit": 10}
    assert eval_tokens(full) > eval_tokens(capped)
    assert eval_tokens({"perplexity": [{"max_tokens": 1000}], "tasks": []}) == 1000
    # twice the parameters: twice the forward FLOPs above the fixed overhead
    base = estimate_cell_seconds(0, 1e6, "cuda")
    assert estimate_cell_seconds(2_000_000, 1e6, "cuda") - base == pytest.approx(
        2 * (estimate_cell_seconds(1_000_000, 1e6, "cuda") - base)
    )


def test_parse_squeue_array_tasks_and_plain_jobs():
    text = "1234 0 RUNNING\n1234 1 PENDING\n99 N/A RUNNING\nbad line\n"
    assert claims.parse_squeue(text) == {"1234_0": "RUNNING", "1234_1": "PENDING", "99": "RUNNING"}


def test_held_cells_are_those_of_live_tasks_and_dead_claims_are_removed(tmp_path):
    claims.write_claims(tmp_path, "s", "10", [["a", "b"], ["c"], ["d"]])
    claims.write_claims(tmp_path, "s", "11", [["e"]])
    states = {"10_0": "RUNNING", "10_1": "COMPLETED", "10_2": "PENDING", "11_0": "CANCELLED"}
    held = claims.held_cells(tmp_path, "s", states)
    assert set(held) == {"a", "b", "d"}
    assert held["a"].running and not held["d"].running
    assert not (tmp_path / "s" / ".jobs" / "11.json").exists()  # no live task: forgotten
    assert (tmp_path / "s" / ".jobs" / "10.json").exists()
    body = json.loads((tmp_path / "s" / ".jobs" / "10.json").read_text())
    assert body["tasks"][2] == ["d"]


def test_a_single_job_submission_is_held_under_its_plain_job_id(tmp_path):
    claims.write_claims(tmp_path, "s", "158", [["x", "y"]])  # submitit: one job, no array
    held = claims.held_cells(tmp_path, "s", claims.parse_squeue("158 N/A PENDING\n"))
    assert set(held) == {"x", "y"} and held["x"].task == "158"


def test_no_claims_means_no_scheduler_call(tmp_path, monkeypatch):
    def boom():
        raise AssertionError("squeue asked without claims")

    monkeypatch.setattr(claims, "scheduler_states", boom)
    assert claims.held_cells(tmp_path, "s") == {}


def test_held_by_live_jobs_refuses_when_the_scheduler_cannot_answer(tmp_path, monkeypatch):
    from harness.cluster import jobs
    from harness.sweep.plan import Cell

    claims.write_claims(tmp_path, "s", "10", [["a"]])

    def unavailable():
        raise claims.SchedulerUnavailable("squeue: not found")

    monkeypatch.setattr(claims, "scheduler_states", unavailable)
    cell = Cell(["x=1"], "a", "s", str(tmp_path))
    with pytest.raises(JobsError) as err:
        jobs.held_by_live_jobs([cell])
    assert "nothing was launched" in str(err.value) and ".jobs" in str(err.value)


def test_plan_description_counts_arrays_per_class():
    class Launcher:
        def __init__(self):
            self.params = {"mem_gb": 8, "timeout_min": 60}

        def _array_limit(self):
            return 50

    big = {"gpus_per_node": 2, "mem_gb": 184}
    specs = [JobSpec([["model=a"]] * 3, [], {}, "small", 10.0, "a") for _ in range(120)]
    specs += [JobSpec([["model=b"]], [], big, "big", 100.0, "b") for _ in range(3)]
    text = describe_jobs(specs, Launcher())
    assert "363 cells in 123 jobs" in text
    assert "4 array(s) of at most 50 tasks" in text  # ceil(120/50) + ceil(3/50)
    assert "small: 120 jobs, 360 cells" in text and "big: 3 jobs, 3 cells" in text


def test_settings_default_is_the_launcher_resources():
    assert Settings(JobsConf()).resources is None


@pytest.mark.slow
def test_local_launcher_packs_cells_and_loads_once_per_job(tmp_path):
    """``hydra/launcher=local``: 5 cells in jobs of 2 -> 3 processes, 3 model loads (from the
    store), each job's cells in one process, one progress line."""
    from test_sweep_e2e import WORDS, grid_args, make_tiny_models, run_to_end

    from harness.records import read_store

    models = make_tiny_models(tmp_path / "models", n=1)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(random.Random(1).choice(WORDS) for _ in range(400)))
    results = tmp_path / "results"
    args = [*grid_args(models, text, results, sweep="local"), "hydra/launcher=local"]
    rc, out = run_to_end([*args, "hydra.sweeper.jobs.cells_per_job=2"], timeout=600)
    assert rc == 0, out[-3000:]
    assert "plan: 5 cells in 3 jobs (1-2 cells per job" in out, out[-3000:]
    assert "sweep local: 5/5 cells, 0 failed" in out, out[-3000:]
    cells = {r["cell_id"]: r for r in read_store(results, "local").to_pylist()}
    assert len(cells) == 5 and all(r["status"] == "ok" for r in cells.values())
    jobs = {r["job_id"] for r in cells.values()}
    assert len(jobs) == 3 and all(j.startswith("local:") for j in jobs)
    assert sum(not r["model_reused"] for r in cells.values()) == 3
    for job in jobs:  # the job's first cell loaded the model, the next one reused it
        mine = [r for r in cells.values() if r["job_id"] == job]
        assert sum(not r["model_reused"] for r in mine) == 1


def test_measured_cell_seconds_is_the_mean_of_ok_cells_without_load(tmp_path):
    from harness.cluster.packing import measured_cell_seconds
    from harness.records import Record, cell_path, write_cell

    def cell(cid, model, wall, load, status="ok", rows=1):
        recs = [Record(sweep="s", cell_id=cid, model=model, wall_s=wall, load_s=load,
                       status=status, task=f"t{i}") for i in range(rows)]  # fmt: skip
        write_cell(recs, cell_path(tmp_path, "s", cid))

    cell("a", "m1", 10.0, 4.0, rows=2)  # 6 s of work (one row per task: same wall time)
    cell("b", "m1", 8.0, 0.0)  # a reused model: 8 s
    cell("c", "m1", 100.0, 0.0, status="failed")  # not a cost to plan with
    cell("d", "m2", 3.0, 1.0)
    assert measured_cell_seconds(tmp_path, "s") == pytest.approx({"m1": (6 + 8) / 2, "m2": 2.0})
    assert measured_cell_seconds(tmp_path, "nothing") == {}
