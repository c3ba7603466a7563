"""The libraries kbit uses through interfaces a new release may change run in a tested range.

Why: hydra-core (an internal in the sweeper's composition, its command-line parser),
hydra-submitit-launcher (its launcher's job), submitit (the sbatch text of a dry run), lm-eval
(its task format, HFLM) and transformers are used beyond their most stable surface. Their
ranges are declared once, in pyproject.toml's dependencies (lower bound: what the code needs;
upper bound: the next version not tested); this test fails, naming the package, the installed
version and the tested range, when the environment holds a version outside it.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# Distributions with a tested range (their requirement in pyproject.toml has an upper bound).
RANGED = ("hydra-core", "hydra-submitit-launcher", "submitit", "lm-eval", "transformers")


def declared_ranges(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, Requirement]:
    """Each dependency of ``pyproject`` by its normalised name (``lm_eval`` -> ``lm-eval``)."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return {_normal(Requirement(d).name): Requirement(d) for d in deps}


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def version_problem(package: str, installed: str | None, requirement: Requirement) -> str | None:
    """Why ``installed`` (None: not installed) is outside ``requirement``'s tested range, as
    one line naming the package, the version and the range; None when it is inside."""
    tested = str(requirement.specifier) or "any version"
    if installed is None:
        return f"{package} is not installed; tested range: {tested} (pyproject.toml)"
    if requirement.specifier.contains(Version(installed), prereleases=True):
        return None
    return (
        f"{package} {installed} is installed, outside its tested range {tested} "
        f"(pyproject.toml): install a version in the range (pip install '{package}{tested}'), "
        "or test this version and move the range"
    )


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- the check
def test_a_version_inside_the_range_passes():
    req = Requirement("hydra-core>=1.3.2,<1.4")
    assert version_problem("hydra-core", "1.3.2", req) is None
    assert version_problem("hydra-core", "1.3.8", req) is None


@pytest.mark.parametrize("installed", ["1.4.0", "1.3.1", "2.0.0", "1.4.0.dev1"])
def test_a_version_outside_the_range_is_named_with_the_range(installed):
    req = Requirement("hydra-core>=1.3.2,<1.4")
    line = version_problem("hydra-core", installed, req)
    assert line is not None and "\n" not in line
    assert f"hydra-core {installed} is installed" in line
    assert "<1.4" in line and ">=1.3.2" in line


def test_a_missing_package_is_named():
    line = version_problem("submitit", None, Requirement("submitit>=1.5,<1.6"))
    assert line is not None and "submitit is not installed" in line and "<1.6" in line


def test_extras_and_names_are_read_as_pip_reads_them(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\ndependencies = ["lm_eval[hf]>=0.4.5,<0.5", "Hydra-Core>=1.3.2,<1.4"]\n'
    )
    ranges = declared_ranges(tmp_path / "pyproject.toml")
    assert set(ranges) == {"lm-eval", "hydra-core"}
    assert version_problem("lm-eval", "0.5.0", ranges["lm-eval"]) is not None
    assert version_problem("lm-eval", "0.4.13", ranges["lm-eval"]) is None


# ----------------------------------------------------------------------------- this environment
@pytest.mark.parametrize("package", RANGED)
def test_each_ranged_package_has_an_upper_bound(package):
    """A range, not only a floor: the next untested release is outside it."""
    requirement = declared_ranges()[package]
    assert any(s.operator in ("<", "<=", "==", "~=") for s in requirement.specifier), (
        f"{package}: pyproject.toml declares {requirement}, without an upper bound"
    )


def test_the_installed_environment_is_in_the_tested_ranges():
    ranges = declared_ranges()
    problems = [version_problem(p, installed_version(p), ranges[p]) for p in RANGED]
    problems = [p for p in problems if p]
    assert not problems, "; ".join(problems)
