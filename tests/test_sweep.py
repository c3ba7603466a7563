"""Grid expansion, planning (validate, dedupe, resume) and the results-folder check, without models."""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from harness.records import STATUS_FAILED, cell_path, empty_record, write_cell
from harness.sweep.expand import expand_grid
from harness.sweep.plan import (
    SweepError,
    SweepPlan,
    plan_sweep,
    raise_on_problems,
    read_manifest,
    results_dir_problem,
    write_manifest,
)


def _grid(*overrides: str) -> list[list[str]]:
    return expand_grid(OverridesParser.create().parse_overrides(list(overrides)))


def test_expand_is_the_cartesian_product_with_model_slowest():
    grid = _grid("bits=3,4,8", "dtype=int,float", "model=a,b,c", "block_size=64")
    brute = {
        (f"bits={b}", f"dtype={d}", f"model={m}", "block_size=64")
        for b, d, m in itertools.product([3, 4, 8], ["int", "float"], "abc")
    }
    assert {tuple(c) for c in grid} == brute and len(grid) == len(brute)
    models = [next(x for x in c if x.startswith("model=")) for c in grid]
    # each model's cells are contiguous, in the order given: a loaded model is reused
    assert [m for m, _ in itertools.groupby(models)] == ["model=a", "model=b", "model=c"]


def _stub_id(cfg) -> str:
    """Independent stand-in for harness.config.identity.cell_id: the 16-bit baseline ignores the dtype."""
    d = OmegaConf.to_container(cfg, resolve=True)
    if d["bits"] == 16:
        d["dtype"] = "none"
    return hashlib.sha1(repr(sorted(d.items())).encode()).hexdigest()[:12]


def _stub_validate(cfg) -> None:
    if cfg.bits not in (3, 4, 5, 6, 8, 16):
        raise ValueError(f"bits={cfg.bits} is not legal for dtype={cfg.dtype!r}; allowed: 3..8, 16")


def _composer(results_dir: Path):
    base = OmegaConf.create(
        {"model": "m", "dtype": "int", "bits": 4, "sweep": "t", "results_dir": str(results_dir)}
    )

    def compose(overrides):
        return OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))

    return compose


def test_plan_counts_dedupes_and_resumes(tmp_path):
    grid = _grid("model=a,b", "dtype=int,float", "bits=4,16")
    compose = _composer(tmp_path)
    # one cell done, one failed before this launch
    done, failed = (compose(c) for c in (grid[0], grid[1]))
    write_cell(
        [empty_record(task="x", metric="ppl", value=1.0)], cell_path(tmp_path, "t", _stub_id(done))
    )
    write_cell(
        [empty_record(status=STATUS_FAILED, error="E")], cell_path(tmp_path, "t", _stub_id(failed))
    )
    plan = plan_sweep(grid, compose, _stub_id, _stub_validate)
    # 2 models x (2 dtypes x bits 4 + one shared 16-bit baseline) = 6 unique cells of 8
    assert plan.duplicates == 2 and not plan.problems
    assert plan.counts() == {"total": 6, "done": 1, "failed": 1, "to_run": 5}
    assert len({c.cell_id for c in plan.cells}) == 6
    assert grid[1] in [c.overrides for c in plan.to_run()]  # failed cells are retried
    assert (
        "6 cells in total (2 duplicate cells merged): 1 done, 1 failed, 5 to run" in plan.summary()
    )


def test_problems_are_grouped_into_one_error(tmp_path):
    grid = _grid("model=a,b", "bits=2,4,7")
    plan = plan_sweep(grid, _composer(tmp_path), _stub_id, _stub_validate)
    assert len(plan.problems) == 2  # bits=2 and bits=7, each for two models
    assert all("[2 cell(s)" in p for p in plan.problems)
    with pytest.raises(SweepError) as err:
        raise_on_problems(plan, len(grid))
    msg = str(err.value)
    assert (
        "2 problem(s) in a grid of 6 cells" in msg
        and "bits=2 is not legal" in msg
        and "bits=7" in msg
    )
    assert not any(tmp_path.iterdir())  # nothing written


def test_unwritable_results_dir_is_a_problem_and_nothing_is_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = blocker / "results"
    assert "is not a folder" in results_dir_problem(target)
    plan = plan_sweep(_grid("bits=3,4"), _composer(target), _stub_id, _stub_validate)
    assert len(plan.problems) == 1 and "results_dir=" in plan.problems[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    assert results_dir_problem(tmp_path / "new" / "deeper") is None
    assert not (tmp_path / "new").exists()


def test_read_only_results_dir(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes into read-only folders: make the probe fail as it would
        import tempfile

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    problem = results_dir_problem(ro / "results")
    assert "not writable" in problem and "Permission denied" in problem and "ro" in problem
    assert not (ro / "results").exists()


def test_manifest_merges_launches(tmp_path):
    compose = _composer(tmp_path)
    first = plan_sweep(_grid("bits=3,4"), compose, _stub_id, _stub_validate)
    second = plan_sweep(_grid("bits=4,5"), compose, _stub_id, _stub_validate)
    (path,) = write_manifest(first)
    write_manifest(second)
    assert set(read_manifest(path)) == {c.cell_id for c in first.cells + second.cells}
    assert len(read_manifest(path)) == 3


def test_empty_plan_summary():
    assert SweepPlan().counts() == {"total": 0, "done": 0, "failed": 0, "to_run": 0}


def test_union_of_grids_against_brute_force():
    from harness.sweep.expand import expand_union

    parser = OverridesParser.create()
    params = {"model": "a,b", "block_size": "64,128"}
    grids = [{"dtype": "int,float", "bits": "3,4"}, {"dtype": "nf4", "bits": "4"}, {"bits": "16"}]
    cells = expand_union(parser, params, grids, ["block_size=32,64"])  # command line wins
    got = sorted(tuple(sorted(c)) for c in cells)
    want = []
    for m, bs in itertools.product("ab", [32, 64]):
        parts = [(d, b) for d in ("int", "float") for b in (3, 4)] + [("nf4", 4)]
        want += [(f"bits={b}", f"block_size={bs}", f"dtype={d}", f"model={m}") for d, b in parts]
        want.append(("bits=16", f"block_size={bs}", f"model={m}"))
    assert got == sorted(want)
    models = [c[0] for c in cells]
    assert models == sorted(models, key=lambda m: m != "model=a")  # model-major, first seen first
