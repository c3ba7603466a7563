"""Plugins from outside the repository: a data-type family registered by a user's package.

The plugin packages are written to a temporary folder (never inside the checkout): one
imported by name (``plugins=[kbit_h6_power]`` with the folder on ``PYTHONPATH``), one
installed as a ``kbit.plugins`` entry point through a ``.dist-info`` folder on ``sys.path``
(what ``pip install`` leaves behind). Each registers a family with an option of its own (a
:class:`DtypeSpec` subclass) and ships an entry for it. Loading happens in subprocesses, so
this test session's registries stay as they were.

Expected codebooks are computed here from the family's definition (sign(x) |x|^p on the
symmetric integer grid), expected digests from the files written here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.plugins import ENTRY_POINT_GROUP, PluginError, load_plugins, loaded

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]

FAMILY = '''
"""A kbit plugin: the ``{family}`` family, sign(x) |x|^power on the symmetric int grid."""
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.dtypes import DtypeSpec, register_dtype_dir, register_family


@dataclass
class {cls}(DtypeSpec):
    power: float = 2.0


def validate(spec, bits):
    if not spec.power > 0:
        raise ValueError(f"power={{spec.power}} (dtype {{spec.name!r}}); allowed: > 0")


@register_family("{family}", bits=range(2, 9), validate=validate, options=("power",),
                 schema={cls})
def codebook(spec, bits, tensor=None):
    half = 2 ** (bits - 1) - 1
    grid = torch.arange(-half, half + 1, dtype=torch.float64) / half
    return grid.sign() * grid.abs() ** spec.power


register_dtype_dir(Path(__file__).parent / "dtypes")
'''


def write_plugin(root: Path, package: str, family: str, entry: str, power: float) -> Path:
    folder = root / package
    (folder / "dtypes").mkdir(parents=True)
    (folder / "__init__.py").write_text(FAMILY.format(family=family, cls=f"{family.title()}Spec"))
    (folder / "dtypes" / f"{entry}.yaml").write_text(
        f"# {entry}: sign(x) |x|^{power}\nname: {entry}\nfamily: {family}\npower: {power}\n"
    )
    return folder


def package_digest(folder: Path) -> str:
    """sha256 over the package's .py files (relative path, NUL, bytes, NUL), sorted."""
    digest = hashlib.sha256()
    for f in sorted(folder.rglob("*.py")):
        digest.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes() + b"\0")
    return f"sha256:{digest.hexdigest()}"


@pytest.fixture(scope="module")
def plugins(tmp_path_factory) -> dict[str, Path]:
    """{"path": a PYTHONPATH folder with kbit_h6_power, "site": a site folder with the
    entry-point plugin kbit_h6_cube 0.3.1}; both outside the repository."""
    root = tmp_path_factory.mktemp("plugins")
    assert REPO not in root.parents
    path, site = root / "path", root / "site"
    write_plugin(path, "kbit_h6_power", "power", "power2", 2.0)
    write_plugin(site, "kbit_h6_cube", "cube", "cube3", 3.0)
    info = site / "kbit_h6_cube-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kbit-h6-cube\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nh6cube = kbit_h6_cube\n")
    (info / "RECORD").write_text("kbit_h6_cube/__init__.py,,\n")
    return {"path": path, "site": site}


def env_with(*folders: Path) -> dict[str, str]:
    extra = os.pathsep.join(str(f) for f in folders)
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": extra + (os.pathsep + old if old else "")}  # fmt: skip


def python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def expected(power: float, bits: int) -> list[float]:
    half = 2 ** (bits - 1) - 1
    return [(1 if i > 0 else -1 if i < 0 else 0) * (abs(i) / half) ** power
            for i in range(-half, half + 1)]  # fmt: skip


# ----------------------------------------------------------------------------- the loader
def test_a_named_module_registers_its_family_and_entries(plugins):
    proc = python(
        """
        import json
        from harness.plugins import load_plugins, loaded
        from harness.dtypes import check, codebook, families
        first = load_plugins(["kbit_h6_power"])
        again = load_plugins(["kbit_h6_power"])  # once: a second import would re-register
        try:
            check("power2", 3, exponent_bits=2)
            refused = None
        except ValueError as exc:
            refused = str(exc)
        print(json.dumps({"first": first, "again": again, "loaded": loaded(),
                          "code": codebook("power2", 3).tolist(),
                          "code4": codebook("power2", 3, power=4.0).tolist(),
                          "options": list(families()["power"].options), "refused": refused}))
        """,
        env_with(plugins["path"]),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    digest = package_digest(plugins["path"] / "kbit_h6_power")
    assert out["first"] == out["again"] == out["loaded"] == {"kbit_h6_power": digest}
    assert out["code"] == pytest.approx(expected(2.0, 3), abs=1e-7)
    assert out["code4"] == pytest.approx(expected(4.0, 3), abs=1e-7)
    assert out["options"] == ["power"]
    assert "exponent_bits=2" in out["refused"] and "allowed fields of 'power'" in out["refused"]
    assert "power" in out["refused"].split("allowed fields of 'power':")[1]


def test_an_entry_point_plugin_is_loaded_with_its_distribution_version(plugins):
    proc = python(
        """
        import json
        from harness.plugins import load_plugins
        from harness.dtypes import codebook
        print(json.dumps({"loaded": load_plugins(), "code": codebook("cube3", 3).tolist()}))
        """,
        env_with(plugins["site"]),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == {"h6cube": "0.3.1"}
    assert out["code"] == pytest.approx(expected(3.0, 3), abs=1e-7)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("kbit_h6_no_such_module", "plugins: 'kbit_h6_no_such_module': no module"),
        ("not a/module", "is not a module name"),
        ("kbit_h6_no_such_package.sub", "no module 'kbit_h6_no_such_package'"),
    ],
)
def test_a_bad_plugin_name_is_refused_in_one_line(name, match):
    with pytest.raises(PluginError, match=match) as err:
        load_plugins([name])
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert name not in loaded()


def test_a_plugin_that_fails_on_import_is_named(tmp_path):
    (tmp_path / "kbit_h6_broken.py").write_text("raise RuntimeError('no GPU here')\n")
    proc = python(
        """
        from harness.plugins import load_plugins, PluginError
        try:
            load_plugins(["kbit_h6_broken"])
        except PluginError as exc:
            print(exc)
        """,
        env_with(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "plugins: 'kbit_h6_broken' failed to import: no GPU here"


# ----------------------------------------------------------------------------- end to end
# These run kbit-run; they need the wiring of helpers h1 (kbit-run loads `plugins=[...]`
# before composing, the record column `plugins`) and h3 (local/Slurm jobs load them too).
def kbit_run(args: list[str], env: dict[str, str], multirun: bool = False):
    cmd = [str(BIN / "kbit-run"), *(["--multirun"] if multirun else []), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    from test_sweep_e2e import make_tiny_models

    root = tmp_path_factory.mktemp("tiny")
    [model] = make_tiny_models(root, n=1)
    text = root / "text.txt"
    text.write_text(" ".join(["the cat sat on the mat while old dogs ran"] * 40))
    return model, text


def cell_args(model: Path, text: Path, results: Path, *extra: str) -> list[str]:
    return [f"model={model}", "bits=4", "block_size=16", f"results_dir={results}", "eval=ppl",
            f"eval.perplexity=[{{name:tiny,path:'{text}',seqlen:32,max_tokens:128}}]",
            "device=cpu", *extra]  # fmt: skip


def store_rows(results: Path, sweep: str) -> list[dict]:
    from harness.records import read_store

    return read_store(results, sweep).to_pylist()


@pytest.mark.slow
def test_kbit_run_a_named_plugin_family_and_its_record_names_it(plugins, tiny, tmp_path):
    model, text = tiny
    results = tmp_path / "results"
    proc = kbit_run(cell_args(model, text, results, "plugins=[kbit_h6_power]", "dtype=power2"),
                    env_with(plugins["path"]))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = store_rows(results, "adhoc")
    assert rows and {r["status"] for r in rows} == {"ok"}
    assert {r["dtype"] for r in rows} == {"power2"} and {r["dtype_family"] for r in rows} == {
        "power"
    }
    digest = package_digest(plugins["path"] / "kbit_h6_power")
    assert {json.dumps(json.loads(r["plugins"]), sort_keys=True) for r in rows} == {
        json.dumps({"kbit_h6_power": digest})
    }


@pytest.mark.slow
def test_kbit_run_an_entry_point_plugin_family(plugins, tiny, tmp_path):
    model, text = tiny
    results = tmp_path / "results"
    proc = kbit_run(cell_args(model, text, results, "dtype=cube3"), env_with(plugins["site"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = store_rows(results, "adhoc")
    assert rows and {r["status"] for r in rows} == {"ok"}
    assert {r["dtype_family"] for r in rows} == {"cube"}
    assert all(json.loads(r["plugins"]) == {"h6cube": "0.3.1"} for r in rows)


@pytest.mark.slow
def test_kbit_run_refuses_a_missing_plugin_in_one_line(tiny, tmp_path):
    model, text = tiny
    results = tmp_path / "results"
    proc = kbit_run(cell_args(model, text, results, "plugins=[kbit_h6_absent]"), env_with())
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kbit-run: ")
    assert "kbit_h6_absent" in lines[0]
    assert not results.exists() or not any(results.rglob("*"))


@pytest.mark.slow
def test_a_plugin_family_sweeps_on_the_local_launcher(plugins, tiny, tmp_path):
    """Every job the local launcher starts loads the plugin before composing its cell."""
    model, text = tiny
    results = tmp_path / "results"
    args = cell_args(model, text, results, "plugins=[kbit_h6_power]", "dtype=power2,int",
                     "bits=3,4", "sweep=plug", "hydra/sweeper=kbit", "hydra/launcher=local")  # fmt: skip
    args.remove("bits=4")
    proc = kbit_run(args, env_with(plugins["path"]), multirun=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = store_rows(results, "plug")
    assert {r["status"] for r in rows} == {"ok"}
    assert {(r["dtype"], r["bits"]) for r in rows} == {
        ("power2", 3),
        ("power2", 4),
        ("int", 3),
        ("int", 4),
    }
    digest = package_digest(plugins["path"] / "kbit_h6_power")
    assert all(json.loads(r["plugins"]) == {"kbit_h6_power": digest} for r in rows)
