"""Every command written in the comment header of a YAML file (sweeps/, conf/) still works.

Why: these headers are where users copy commands from, and they rot silently when a CLI
changes (``kbit-zoo build micro`` once stayed there long after it stopped working). Checked
the way ``test_readme.py`` checks the README, short of running the work: the program is an
installed entry point, its Hydra overrides compose against the config it reads (and a
single ``kbit-run`` cell's data type and bits are legal), a sweep it names exists, and every
repository path the header mentions exists.
"""

from __future__ import annotations

import re
import shlex
from importlib.metadata import distribution
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_readme import BIN, REPO

CONF = REPO / "conf"
HEADER_FILES = sorted(
    {p.resolve() for p in [*(REPO / "sweeps").glob("*.yaml"), *CONF.rglob("*.yaml")]}
)
SCRIPTS = {
    ep.name for ep in distribution("kbit-harness").entry_points if ep.group == "console_scripts"
}
# Hydra app of each entry point that takes overrides: the config it composes.
HYDRA_APPS = {"kbit-run": "config", "kbit-zoo": "zoo_build"}

# A command starts at "kbit-<name> " and runs to the end of the line or to a character that
# cannot be part of one in a comment: '#' (a trailing comment), '|' (an alternative), a
# parenthesis or a backtick around it.
_COMMAND = re.compile(r"(?<![\w/-])(kbit-[a-z]+(?:[ \t]+[^#|()`\s][^#|()`]*)?)(?=$|[#|()`])")
_PATH = re.compile(r"(?<![\w/.-])((?:conf|sweeps|harness|analysis|docs)/[\w./-]*\w/?)")


def header(path: Path) -> list[str]:
    """The comment lines before the first line that is not a comment, '#' removed."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:])
    return lines


def header_commands(path: Path) -> list[str]:
    """Every ``kbit-*`` command written in ``path``'s header."""
    found = [m.strip() for line in header(path) for m in _COMMAND.findall(line)]
    return [c for c in found if c.split()[0] != "kbit-"]


def header_paths(path: Path) -> list[str]:
    return [m for line in header(path) for m in _PATH.findall(line)]


CASES = [(p, c) for p in HEADER_FILES for c in header_commands(p)]


def _id(case: tuple[Path, str]) -> str:
    return f"{case[0].relative_to(REPO.resolve())}: {case[1][:60]}"


def test_the_headers_hold_commands():
    """The extraction finds the commands it is meant to check (a broken regex fails here)."""
    files = {p.relative_to(REPO.resolve()).as_posix() for p, _ in CASES}
    assert {f"sweeps/{p.name}" for p in (REPO / "sweeps").glob("*.yaml")} <= files
    assert {"conf/config.yaml", "conf/zoo_build.yaml", "conf/zoo/micro.yaml"} <= files
    assert header_commands(REPO / "sweeps" / "demo.yaml") == [
        "kbit-run --multirun +sweeps@_global_=demo",
        "kbit-zoo zoo=demo",
    ]
    assert header_paths(REPO / "sweeps" / "dtypes.yaml") == ["conf/dtype/"]


@pytest.mark.parametrize(
    ("line", "commands"),
    [
        ("# kbit-zoo: build it. kbit-zoo zoo=demo | kbit-zoo zoo=nano zoo.corpus=/x",
         ["kbit-zoo zoo=demo", "kbit-zoo zoo=nano zoo.corpus=/x"]),
        ("#   kbit-run bits=4 eval=zoo     # one cell", ["kbit-run bits=4 eval=zoo"]),
        ("# the family (build it first: kbit-zoo build micro) x", ["kbit-zoo build micro"]),
        ("# `kbit-status results`, then", ["kbit-status results"]),
    ],
)  # fmt: skip
def test_command_extraction(tmp_path, line, commands):
    path = tmp_path / "x.yaml"
    path.write_text(f"{line}\nkey: 1\n# not a header: kbit-run x=1\n")
    assert header_commands(path) == commands


def _overrides(argv: list[str]) -> list[str]:
    """Hydra overrides of a command line: everything but its flags."""
    return [a for a in argv[1:] if not a.startswith("-")]


def _compose(config: str, overrides: list[str]):
    from harness.config.schema import register_schema

    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            return compose(config, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_header_command_works(case):
    path, cmd = case
    argv = shlex.split(cmd)
    program = argv[0]
    assert program in SCRIPTS, f"{path}: {program!r} is no entry point; known: {sorted(SCRIPTS)}"
    assert (BIN / program).is_file(), f"{program} is not installed beside {BIN}"
    if program not in HYDRA_APPS:
        return
    cfg = _compose(HYDRA_APPS[program], _overrides(argv))
    for override in _overrides(argv):
        if override.startswith("+sweeps@_global_="):
            name = override.split("=", 1)[1]
            assert (REPO / "sweeps" / f"{name}.yaml").is_file(), override
            assert cfg.sweep == name
    if program == "kbit-run" and "--multirun" not in argv and "-m" not in argv:
        from harness.dtypes import check

        if cfg.bits != 16:
            check(cfg.dtype.name, cfg.bits)


def test_a_stale_command_fails_the_check():
    """The check above is not vacuous: the command these headers once held is refused."""
    with pytest.raises(Exception, match="build"):
        _compose("zoo_build", ["build", "micro"])


@pytest.mark.parametrize("path", HEADER_FILES, ids=lambda p: str(p.relative_to(REPO.resolve())))
def test_header_paths_exist(path):
    missing = [p for p in header_paths(path) if not (REPO / p).exists()]
    assert not missing, f"{path}: the header names {missing}, which do not exist"
