"""Packed local/Slurm jobs whose failures stay visible, a watch line that ends on the summary,
a refused submission that says one line, and the paper's documented launch planned on GPUs.

- a cell that cannot start inside its job (a data type family registered only in the
  launching process; a job whose ``import harness`` fails) ends with a ``failed`` record under
  its planned id holding the error line, shown by ``kbit-status --errors``; the job does not
  end "completed successfully" and the launch exits 1 (local launcher, and the real local
  Slurm for the tests marked ``slurm``);
- the progress line counts every cell of the sweep (done before this launch + done now) and
  its last value equals the summary's; a cell written while the jobs were still being
  submitted counts;
- a submission ``sbatch`` refuses prints kbit's one line on stderr, nothing of sbatch's own;
- the first line of ``sweeps/paper.yaml`` (the documented launch) plans GPU jobs, and a hub
  model planned onto CPU Slurm jobs without asking for it is refused in one line.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from harness import progress
from harness.records import Record, read_store, write_cell

ROOT = Path(__file__).resolve().parents[1]
KBIT_RUN = str(Path(sys.executable).parent / "kbit-run")
KBIT_STATUS = str(Path(sys.executable).parent / "kbit-status")

# A launching script that registers a data type family in its own process only, as a user's
# wrapper around kbit-run might: the jobs (fresh processes) do not have it.
LAUNCH_WITH_FAMILY = """
import sys
import torch
from harness.dtypes.registry import register_family

@register_family("onlyhere", bits=range(2, 9))
def onlyhere(spec, bits, tensor=None):
    return torch.linspace(-1, 1, 2**bits - 1, dtype=torch.float64)

from harness.run.execute import main
sys.argv = ["kbit-run", *sys.argv[1:]]
main()
"""
ONLYHERE_ENTRY = """defaults:
  - dtype_schema
  - _self_
name: onlyhere
family: onlyhere
bits: null
"""
# A launching script whose jobs import a broken harness (PYTHONPATH set for the children only).
LAUNCH_WITH_BROKEN_JOBS = """
import os
import sys
os.environ["PYTHONPATH"] = sys.argv.pop(1)
from harness.run.execute import main
sys.argv = ["kbit-run", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny GPT-2 model folder and a perplexity text."""
    from test_sweep_e2e import WORDS, make_tiny_models

    root = tmp_path_factory.mktemp("doors_jobs")
    model = make_tiny_models(root / "models", n=1)[0]
    text = root / "text.txt"
    text.write_text(" ".join(random.Random(1).choice(WORDS) for _ in range(400)))
    return model, text


def _grid(model: Path, text: Path, results: Path, dtypes: str, bits: str = "4") -> list[str]:
    return [
        "--multirun", "hydra/sweeper=kbit", f"model={model}", f"dtype={dtypes}", f"bits={bits}",
        "block_size=16", "sweep=doors", f"results_dir={results}", "eval=ppl",
        f"eval.perplexity=[{{name:tiny,path:'{text}',seqlen:32,max_tokens:64}}]", "device=cpu",
    ]  # fmt: skip


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 900):
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", **(env or {})}  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def _messages(stderr: str) -> list[str]:
    """stderr without the planner's progress bar (tqdm, \\r-redrawn) and torch's import-time
    warnings (``W1207 ... torch/...``): the lines kbit and the scheduler print."""
    noise = re.compile(r"validating cells|^[WI]\d{4} .*(torch|_pytree)|Enum subclass")
    return [ln for ln in stderr.splitlines() if ln.strip() and not noise.search(ln)]


def _status_errors(results: Path) -> tuple[int, str]:
    out = subprocess.run([KBIT_STATUS, str(results), "--errors"], capture_output=True, text=True)
    return out.returncode, out.stdout + out.stderr


def _manifest_id(results: Path, word: str) -> str:
    """The planned cell id whose overrides contain ``word`` (the plan's own record of it)."""
    cells = json.loads((results / "doors" / "sweep_manifest.json").read_text())["cells"]
    ids = [cid for cid, overrides in cells.items() if word in overrides]
    assert len(ids) == 1, cells
    return ids[0]


def _job_logs(results: Path) -> str:
    logs = [p for p in (results / ".hydra").rglob("*_log.*") if ".submitit" in str(p)]
    assert logs, "no submitit job logs"
    return "\n".join(p.read_text(errors="replace") for p in logs)


def _launch_with_family(tmp_path: Path, tiny, results: Path, *launcher: str):
    model, text = tiny
    entries = tmp_path / "dtypes"
    entries.mkdir()
    (entries / "onlyhere.yaml").write_text(ONLYHERE_ENTRY)
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH_WITH_FAMILY)
    cmd = [sys.executable, str(script), *_grid(model, text, results, "int,onlyhere"), *launcher]
    return _run(cmd, cwd=tmp_path, env={"KBIT_DTYPE_DIR": str(entries)})


def _assert_unrun_cell_recorded(results: Path, out) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    rows = {r["cell_id"]: r for r in read_store(results, "doors").to_pylist()}
    bad, good = _manifest_id(results, "dtype=onlyhere"), _manifest_id(results, "dtype=int")
    assert set(rows) == {bad, good}
    assert rows[good]["status"] == "ok"  # the job went on with the rest of its chunk
    assert rows[bad]["status"] == "failed"
    assert "onlyhere" in rows[bad]["error"].splitlines()[0]  # the error line comes first
    assert rows[bad]["dtype"] == "onlyhere" and rows[bad]["bits"] == 4
    assert rows[bad]["job_id"]  # written inside the job
    rc, listing = _status_errors(results)
    assert rc == 1 and f"doors/{bad}" in listing and "onlyhere" in listing, listing
    logs = _job_logs(results)
    assert "completed successfully" not in logs and "could not run" in logs
    assert re.search(r"sweep doors: 2/2 cells, 1 failed", out.stderr), out.stderr[-2000:]


@pytest.mark.slow
def test_local_job_records_a_cell_that_cannot_start_in_it(tmp_path, tiny):
    results = tmp_path / "results"
    out = _launch_with_family(tmp_path, tiny, results, "hydra/launcher=local")
    _assert_unrun_cell_recorded(results, out)


@pytest.mark.slow
def test_local_job_that_cannot_import_is_recorded_by_the_launcher(tmp_path, tiny):
    """The job dies before kbit's code runs in it: the waiting launcher reads its error from
    the job's result and writes the failed records (the results folder is fine)."""
    model, text = tiny
    broken = tmp_path / "broken" / "harness"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("harness is broken in this job")\n')
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH_WITH_BROKEN_JOBS)
    results = tmp_path / "results"
    grid = _grid(model, text, results, "int", bits="4,16")
    cmd = [sys.executable, str(script), str(broken.parent), *grid, "hydra/launcher=local"]
    out = _run(cmd, cwd=tmp_path)
    text_out = out.stdout + out.stderr
    assert out.returncode == 1, text_out[-3000:]
    assert "ImportError: harness is broken in this job" in out.stderr, text_out[-3000:]
    rows = read_store(results, "doors").to_pylist()
    planned = json.loads((results / "doors" / "sweep_manifest.json").read_text())["cells"]
    assert {r["cell_id"] for r in rows} == set(planned) and len(rows) == 2
    assert all(r["status"] == "failed" and "harness is broken" in r["error"] for r in rows)
    rc, listing = _status_errors(results)
    assert rc == 1 and listing.count("harness is broken in this job") == 2, listing


# ----------------------------------------------------------------------------- the watch line
def test_a_cell_written_during_submission_counts(tmp_path):
    """The baseline is taken before submitting: a record that appears before the watch begins
    (a fast job) is this launch's result, not an old file."""
    (tmp_path / "s").mkdir()
    keys = [(tmp_path, "s", f"c{i}") for i in range(3)]
    fields = dict(sweep="s", model="m", task="t", metric="ppl", value=1.0)
    write_cell([Record(cell_id="c2", status="failed", **fields)], tmp_path / "s" / "c2.parquet")
    baseline = progress.store_snapshot(keys)  # c2: an old failed record
    write_cell([Record(cell_id="c0", **fields)], tmp_path / "s" / "c0.parquet")  # "during submit"
    line = progress.SweepProgress(total=5, already_done=2, name="s", stream=io.StringIO())
    counts = progress.watch_store(keys, line, poll_s=0.01, until=lambda: True, baseline=baseline)
    assert counts == {"ok": 1} and line.done == 3
    assert progress.new_records(keys, baseline) == {keys[0]}
    write_cell([Record(cell_id="c2", **fields)], tmp_path / "s" / "c2.parquet")  # retried: new
    assert progress.new_records(keys, baseline) == {keys[0], keys[2]}


@pytest.mark.slow
def test_local_watch_line_counts_the_whole_sweep_and_ends_on_the_summary(tmp_path, tiny):
    model, text = tiny
    results = tmp_path / "results"
    first = _run([KBIT_RUN, *_grid(model, text, results, "int", bits="4")], cwd=tmp_path)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    grid = _grid(model, text, results, "int,float", bits="3,4,16")  # 5 cells, 1 done before
    out = _run([KBIT_RUN, *grid, "hydra/launcher=local", "hydra.launcher.poll_s=0.5"], cwd=tmp_path)
    text_out = out.stdout + out.stderr
    assert out.returncode == 0, text_out[-3000:]
    assert re.search(r"5 cells in total.*: 1 done, 0 failed, 4 to run", text_out), text_out[-3000:]
    lines = re.findall(r"sweep doors: (\d+)/(\d+) cells, (\d+) failed", out.stderr)
    assert lines, out.stderr[-2000:]
    summary = re.search(r"sweep doors: (\d+)/(\d+) cells finished: (\d+) ok", text_out)
    assert summary, text_out[-3000:]
    assert lines[-1][:2] == summary.groups()[:2] == ("5", "5")
    cells = {r["cell_id"]: r["status"] for r in read_store(results, "doors").to_pylist()}
    assert int(summary.group(3)) == len(cells) == 5 and set(cells.values()) == {"ok"}


# ----------------------------------------------------------------------------- the paper plan
PAPER = ROOT / "sweeps" / "paper.yaml"


def _documented_paper_command() -> list[str]:
    """The launch command of the paper sweep, as its first line prints it."""
    first = PAPER.read_text().splitlines()[0]
    assert first.startswith("# kbit-run --multirun"), first
    words = first[2:].split()[1:]
    return [w.replace("YOUR_PARTITION", "gpu") for w in words]


def _paper_env(tmp_path: Path, plan_bench) -> dict[str, str]:
    hub = plan_bench.build_fake_hub(tmp_path / "hf" / "hub")
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(hub)}


def test_the_two_paper_files_are_one_sweep():
    assert (ROOT / "conf" / "sweeps" / "paper.yaml").read_text() == PAPER.read_text()
    docs = (ROOT / "docs" / "sweeps.md").read_text()
    documented = " ".join(_documented_paper_command())
    assert "gpus_per_node" not in documented  # the rule gives the GPUs, not the command
    assert documented.replace("=gpu", "=") in docs.replace("=gpu", "=")


@pytest.mark.slow
def test_documented_paper_command_plans_gpu_jobs(tmp_path, data_root, plan_bench):
    results = tmp_path / "results"
    cmd = [KBIT_RUN, *_documented_paper_command(), f"results_dir={results}",
           "hydra.sweeper.dry_run=true"]  # fmt: skip
    out = _run(cmd, cwd=tmp_path, env=_paper_env(tmp_path, plan_bench))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    plan = re.search(r"plan: 19994 cells in (\d+) jobs", text)
    assert plan and 1000 <= int(plan.group(1)) <= 8000, text[-3000:]
    classes = [ln for ln in text.splitlines() if ln.startswith("  - ")]
    assert classes
    for line in classes:
        gpus = int(re.match(r"  - (\d+) GPU", line).group(1))
        numerics = re.search(r"numerics: ([^;]+);", line).group(1).split(", ")
        assert gpus >= 1, line
        assert numerics and all(n in ("cuda/bfloat16", "cuda/float16") for n in numerics), line
    assert "cpu" not in " ".join(classes)
    assert not results.exists() or not any(results.rglob("*.parquet"))


@pytest.mark.slow
def test_hub_model_on_cpu_slurm_jobs_is_refused_without_opt_in(tmp_path, data_root, plan_bench):
    results = tmp_path / "results"
    cmd = [KBIT_RUN, *_documented_paper_command(), f"results_dir={results}",
           "hydra.sweeper.dry_run=true", "hydra.sweeper.resources=null"]  # fmt: skip
    out = _run(cmd, cwd=tmp_path, env=_paper_env(tmp_path, plan_bench))
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    lines = _messages(out.stderr)
    assert len(lines) == 1 and lines[0].startswith("kbit-run: "), out.stderr[-3000:]
    assert (
        "facebook/opt-125m" in lines[0] and "device=cpu" in lines[0] and "gpus_per_node" in lines[0]
    )
    assert not results.exists()


def test_launch_target_follows_the_resource_rule():
    from omegaconf import OmegaConf

    from harness.sweep.sweeper import launch_target

    slurm = OmegaConf.create({"_target_": "hydra_plugins.kbit_launcher.PackedSlurmLauncher",
                              "gpus_per_node": None})  # fmt: skip
    assert launch_target(slurm).cuda_available is False
    assert launch_target(slurm, {"gpu_memory_gb": 80}).cuda_available is True
    assert launch_target(slurm, {"device": "cpu"}).cuda_available is False
    basic = OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_launcher.X"})
    assert launch_target(basic, {"gpu_memory_gb": 80}).cuda_available is None  # this machine


def test_cpu_plan_problem_only_for_unasked_hub_models_on_slurm(tmp_path):
    from harness.cluster.jobs import Settings, cpu_plan_problem
    from harness.cluster.packing import JobsConf
    from harness.cluster.resources import ResourceConf
    from harness.sweep.plan import Cell

    class Slurm:
        _EXECUTOR = "slurm"

    class Local:
        _EXECUTOR = "local"

    def cell(model: str, device: str = "auto", device_class: str = "cpu") -> Cell:
        meta = {"model": model, "device": device, "device_class": device_class}
        return Cell([f"model={model}"], "id", "s", str(tmp_path), None, meta)

    plain = Settings(JobsConf())
    assert "hub/model" in cpu_plan_problem([cell("hub/model")], plain, Slurm())
    assert cpu_plan_problem([cell("hub/model", device="cpu")], plain, Slurm()) is None
    assert cpu_plan_problem([cell("hub/model", device_class="cuda")], plain, Slurm()) is None
    assert cpu_plan_problem([cell(str(tmp_path))], plain, Slurm()) is None  # a local folder
    assert cpu_plan_problem([cell("zoo:micro/l2d64")], plain, Slurm()) is None
    assert cpu_plan_problem([cell("hub/model")], plain, Local()) is None
    on_cpu = Settings(JobsConf(), ResourceConf(device="cpu"))
    assert cpu_plan_problem([cell("hub/model")], on_cpu, Slurm()) is None


# ----------------------------------------------------------------------------- on real Slurm
@pytest.fixture(scope="module")
def cluster() -> None:
    from harness.cluster import slurm

    if not slurm.is_up():
        pytest.skip("Slurm is not up: sudo python -m harness.cluster.slurm up --max-array-size 20")


def _slurm(name: str, *extra: str) -> list[str]:
    return ["hydra/launcher=slurm", "hydra.launcher.partition=debug", f"hydra.launcher.name={name}",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
            "hydra.launcher.timeout_min=20", "hydra.launcher.poll_s=1", *extra]  # fmt: skip


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_job_records_a_cell_that_cannot_start_in_it(cluster, tmp_path, tiny):
    name = f"kbit-doors-{uuid.uuid4().hex[:8]}"
    results = tmp_path / "results"
    out = _launch_with_family(tmp_path, tiny, results, *_slurm(name, "hydra.launcher.wait=true"))
    _assert_unrun_cell_recorded(results, out)
    state = subprocess.run(["sacct", "-n", "-X", "--name", name, "-o", "State%20"],
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    assert state and state[0] == "FAILED", state  # the scheduler sees the job fail


@pytest.mark.slurm
@pytest.mark.slow
def test_refused_submission_is_one_kbit_line(cluster, tmp_path, tiny):
    model, text = tiny
    results = tmp_path / "results"
    name = f"kbit-doors-{uuid.uuid4().hex[:8]}"
    args = [*_grid(model, text, results, "int"), *_slurm(name),
            "hydra.launcher.partition=no_such_partition"]  # fmt: skip
    out = _run([KBIT_RUN, *args], cwd=tmp_path, timeout=300)
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    lines = _messages(out.stderr)
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("kbit-run: submission failed") and "nothing was queued" in lines[0]
    assert "partition" in lines[0].lower()  # it quotes what the scheduler refused
    assert not any(ln.startswith("sbatch:") for ln in out.stdout.splitlines())
    assert shutil.which("squeue")


def test_ended_task_errors_reads_the_error_line_of_dead_tasks_only(tmp_path):
    """For ``kbit-status --errors`` on a sweep whose job died before it could write: the error
    line from the log of each ended task, for the cells that task held."""
    from harness.cluster.leases import ended_task_errors, write_claims

    logs = tmp_path / ".submitit" / "%j"
    write_claims(tmp_path, "s", "77", [["a", "b"], ["c"], ["d"]], logs=str(logs))
    for task, text in {
        "77_0": "Traceback (most recent call last):\n  File x\nImportError: no harness here\n",
        "77_1": "all fine\n",
    }.items():
        folder = tmp_path / ".submitit" / task
        folder.mkdir(parents=True)
        (folder / f"{task}_0_log.err").write_text(text)
    errors = ended_task_errors(tmp_path, "s", {"77_2": "RUNNING"})
    assert set(errors) == {"a", "b"}  # task 1 logged no error; task 2 is still running
    assert errors["a"].startswith("ImportError: no harness here (job 77_0")
    assert ended_task_errors(tmp_path, "s", {"77_0": "RUNNING", "77_2": "RUNNING"}) == {}


def test_status_errors_show_a_dead_task_line_for_its_cells_without_record(tmp_path, monkeypatch):
    """``kbit-status --errors``: a cell planned into a task that died before writing anything
    shows that task's error line (it stays counted as pending: the next launch runs it)."""
    import json

    from harness.cluster import leases as claims
    from harness.cluster.leases import write_claims
    from harness.sweep import status

    sweep = tmp_path / "s"
    sweep.mkdir()
    (sweep / "sweep_manifest.json").write_text(
        json.dumps({"sweep": "s", "cells": {"a": "bits=3", "b": "bits=4"}})
    )
    logs = tmp_path / ".submitit" / "%j"
    write_claims(tmp_path, "s", "91", [["a"], ["b"]], logs=str(logs))
    for task in ("91_0", "91_1"):
        folder = tmp_path / ".submitit" / task
        folder.mkdir(parents=True)
        (folder / f"{task}_0_log.err").write_text(
            "Traceback (most recent call last):\nModuleNotFoundError: No module named 'harness'\n"
        )
    monkeypatch.setattr(claims, "scheduler_states", lambda timeout=30: {})  # the task has ended
    (row,) = status.store_status(tmp_path)
    assert row.pending == 2 and row.failed == 0
    assert set(row.errors) == {"a", "b"}
    assert row.errors["a"].startswith("(no record) ModuleNotFoundError: No module named 'harness'")
    assert "91_0" in row.errors["a"] and "91_1" in row.errors["b"]
