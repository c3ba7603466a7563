"""Every command the README shows is exercised: here, by .ci/run, or by the test named below.

- install + demo: .ci/run runs the install part verbatim; ``test_demo.py`` runs ``kbit-demo``;
- the test command: .ci/run runs it verbatim;
- the Slurm sweep command: composed and validated here verbatim (the family is not built in
  CI, so it must stop before queuing with the build command); ``test_slurm.py`` runs real
  Slurm sweeps through the same launcher config;
- ``kbit-plot`` / ``kbit-status`` / ``kbit-advise``: run verbatim here on a store;
- ``kbit-run`` one cell: ``test_run_cli.py``; ``kbit-zoo``: ``test_zoo.py``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.synthetic import write_synthetic_store

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent


def bash_commands(text: str) -> list[str]:
    """Non-comment lines of the README's ```bash blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [
        line.strip() for b in blocks for line in b.splitlines() if line.strip() and line[0] != "#"
    ]


COMMANDS = bash_commands(README)


def command(program: str) -> str:
    matches = [c for c in COMMANDS if program in c]
    assert len(matches) == 1, f"README shows {len(matches)} commands with {program}: {matches}"
    return matches[0]


def run(cmd: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    """A README line as a user types it in the checkout (.venv/bin/X -> this interpreter's X)."""
    argv = shlex.split(cmd)
    argv[0] = str(BIN / argv[0].removeprefix(".venv/bin/"))  # kbit-* live beside the interpreter
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, **kw)


def ci_lines() -> list[str]:
    return [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]


def test_readme_opens_with_the_two_commands():
    assert COMMANDS[0].endswith("&& .venv/bin/kbit-demo"), COMMANDS[0]
    assert COMMANDS[1] == ".venv/bin/python -m pytest"
    first_screen = README.split("## ")[0]
    assert "docs/img/demo_scaling.png" in first_screen
    assert (REPO / "docs" / "img" / "demo_scaling.png").stat().st_size > 10_000


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    install = COMMANDS[0].removesuffix(" && .venv/bin/kbit-demo")
    assert install in ci_lines()
    assert COMMANDS[1] in ci_lines()
    # The README's install must not let a dependency replace the CPU torch it pinned first.
    assert "torch==2.13.0" in install.split("&&")[1]


def test_readme_slurm_command_composes_and_fails_fast_when_the_family_is_missing(tmp_path):
    cmd = command("hydra/launcher=slurm")
    zoo = tmp_path / "empty_zoo"
    # bits/block_size trim the 1,615-cell grid to one slice: validation composes every cell.
    extra = f"zoo_dir={zoo} results_dir={tmp_path / 'results'} bits=4 block_size=64"
    proc = run(f"{cmd} {extra}", REPO, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "Sweep not launched" in out, out[-2000:]
    assert "kbit-zoo zoo=micro" in out, out[-2000:]  # the fix, named in the message
    assert not (tmp_path / "results").exists()  # nothing written, nothing queued


@pytest.fixture
def results_cwd(tmp_path: Path) -> Path:
    """A working folder holding ``results/`` as the README's commands expect."""
    write_synthetic_store(
        tmp_path / "results",
        families=("pythia",),
        sizes=(125e6, 1.3e9),
        ks=(3, 4, 16),
        dtypes=("int",),
        block_sizes=(64,),
        variants=(("blockwise", False, 0.0),),
        n_examples=40,
    )
    return tmp_path


def test_readme_plot_command(results_cwd):
    proc = run(command("kbit-plot"), results_cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = results_cwd / "figures"
    assert (figures / "scaling_acc.png").stat().st_size > 10_000
    assert (figures / "bit_optimal_k.md").read_text().count("|") > 4


def test_readme_table_commands(results_cwd):
    rows = re.findall(r"^\| `(kbit-(?:status|advise)[^`]*)` \|", README, flags=re.M)
    assert len(rows) == 2, rows
    for row in rows:
        proc = run(row, results_cwd, timeout=300)
        assert proc.returncode == 0, (row, proc.stderr[-2000:])
        assert proc.stdout.strip(), row


def test_readme_report_command(results_cwd):
    (row,) = re.findall(r"^\| `(kbit-plot [^`]*--report)` \|", README, flags=re.M)
    proc = run(row + " --jobs 1", results_cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    findings = (results_cwd / "figures" / "findings.md").read_text()
    assert findings.count("verdict") >= 4 or findings.count("Verdict") >= 4, findings[:2000]


def test_readme_data_type_yaml_works_as_shown(tmp_path):
    import torch

    from harness.dtypes import codebook

    (block,) = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)
    name = re.search(r"^name: (\w+)", block, flags=re.M).group(1)
    (tmp_path / f"{name}.yaml").write_text(block)
    got = codebook(name, 6, dtype_dir=tmp_path)
    assert torch.equal(got, codebook("float", 6, exponent_bits=3))
    assert got.numel() == 2**6 - 1 and got.abs().max() == 1  # +0 and -0 are one code
