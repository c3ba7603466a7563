"""Data types declared as entries reach Slurm jobs: a YAML-only lookup table and a plugin family.

Both are declared OUTSIDE the repository: the table is one YAML file in ``$KBIT_DTYPE_DIR``
(no code), the family a plugin package on ``PYTHONPATH`` named by ``plugins=[...]`` and another
installed as a ``kbit.plugins`` entry point. The sweeps run on the real local Slurm (the
environment reaches the jobs as ``sbatch --export=ALL`` gives it), and every record is checked
against the same cells run in-process, value for value; each record names the plugin.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import test_plugins as plug
import test_slurm as ts
from test_slurm import _rows, _slurm_args, _values
from test_sweep_e2e import run_to_end

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
cluster, tiny_models, eval_text = ts.cluster, ts.tiny_models, ts.eval_text  # the same fixtures

# a published 3-bit table would do as well; this one is the user's own (uneven on purpose)
TABLE = "name: my_table3\nfamily: table\nbits: 3\nvalues: [-1.0, -0.45, -0.1, 0.0, 0.08, 0.3, 0.62, 1.0]\n"


def _grid(
    model: Path, text: Path, results: Path, sweep: str, dtypes: str, *extra: str
) -> list[str]:
    return [
        "hydra/sweeper=kbit",
        f"model={model}",
        f"dtype={dtypes}",
        "bits=3",
        "block_size=16",
        f"sweep={sweep}",
        f"results_dir={results}",
        "eval=ppl",
        f"eval.perplexity=[{{name:tiny,path:'{text}',seqlen:32,max_tokens:128}}]",
        "device=cpu",
        *extra,
    ]


def _env(monkeypatch, **env: str) -> None:
    """run_to_end passes os.environ to kbit-run; Slurm passes it on to the jobs."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_a_yaml_only_table_type_sweeps_on_slurm(
    cluster, tiny_models, eval_text, tmp_path, monkeypatch
):
    folder = tmp_path / "user_dtypes"
    folder.mkdir()
    (folder / "my_table3.yaml").write_text(TABLE)
    _env(monkeypatch, KBIT_DTYPE_DIR=str(folder))
    slurm_dir, local_dir = tmp_path / "slurm", tmp_path / "inproc"
    name = f"kbit-table-{uuid.uuid4().hex[:8]}"
    args = _grid(tiny_models[0], eval_text, slurm_dir, "tables", "my_table3,int")
    rc, out = run_to_end([*args, *_slurm_args(name, "hydra.launcher.wait=true")], timeout=900)
    assert rc == 0, out[-3000:]
    rows = _rows(slurm_dir, "tables")
    assert {(r["dtype"], r["dtype_family"]) for r in rows} == {
        ("my_table3", "table"),
        ("int", "int"),
    }
    assert all(r["job_id"] for r in rows), [r["job_id"] for r in rows]  # ran as Slurm jobs
    rc, out = run_to_end(_grid(tiny_models[0], eval_text, local_dir, "tables", "my_table3,int"))
    assert rc == 0, out[-3000:]
    assert _values(rows) == _values(_rows(local_dir, "tables"))


def test_plugin_families_sweep_on_slurm_and_records_name_them(
    cluster, tiny_models, eval_text, tmp_path, monkeypatch
):
    root = tmp_path / "plugins"
    path, site = root / "path", root / "site"
    plug.write_plugin(path, "kbit_s_power", "spower", "spower2", 2.0)
    plug.write_plugin(site, "kbit_s_cube", "scube", "scube3", 3.0)
    info = site / "kbit_s_cube-1.2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kbit-s-cube\nVersion: 1.2.0\n")
    (info / "entry_points.txt").write_text("[kbit.plugins]\nscube = kbit_s_cube\n")
    (info / "RECORD").write_text("kbit_s_cube/__init__.py,,\n")
    old = os.environ.get("PYTHONPATH")
    _env(monkeypatch, PYTHONPATH=os.pathsep.join(filter(None, [str(path), str(site), old])))
    slurm_dir, local_dir = tmp_path / "slurm", tmp_path / "inproc"
    name = f"kbit-plug-{uuid.uuid4().hex[:8]}"
    grid = ("spower2,scube3", "plugins=[kbit_s_power]")
    args = _grid(tiny_models[0], eval_text, slurm_dir, "plug", *grid)
    rc, out = run_to_end([*args, *_slurm_args(name, "hydra.launcher.wait=true")], timeout=900)
    assert rc == 0, out[-3000:]
    rows = _rows(slurm_dir, "plug")
    assert {r["dtype_family"] for r in rows} == {"spower", "scube"}
    assert all(r["job_id"] for r in rows), [r["job_id"] for r in rows]
    expected = {"kbit_s_power": plug.package_digest(path / "kbit_s_power"), "scube": "1.2.0"}
    assert all(json.loads(r["plugins"]) == expected for r in rows), [r["plugins"] for r in rows]
    rc, out = run_to_end(_grid(tiny_models[0], eval_text, local_dir, "plug", *grid))
    assert rc == 0, out[-3000:]
    assert _values(rows) == _values(_rows(local_dir, "plug"))
