"""``kbit-zoo``: build a model family (a Hydra app over conf/zoo_build.yaml).

Refused input follows ``kbit-run``'s contract: one line ``kbit-zoo: <field>=<value> ...;
allowed: ...`` on stderr, exit status 2, before any work, nothing written. Why a check before
Hydra's run: Hydra creates the run's log folder (under ``zoo_dir``) before the task starts,
prints composition errors over several lines and task errors as tracebacks. So :func:`main`
first composes the same config with Hydra's compose API and checks every value
(:func:`check_build`); only then does Hydra run the build. ``HYDRA_FULL_ERROR=1`` shows the
traceback of a refusal. A ``--multirun`` has each of its jobs checked the same way first.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from harness.config.refusals import EXIT_FAILED, EXIT_REFUSED, input_error_line, target_overrides
from harness.files import PathError, user_path
from harness.names import did_you_mean
from harness.zoo.config import CONF_DIR, ZooConfigError, check_keys, family_names
from harness.zoo.paths import default_zoo_dir
from harness.zoo.request import BuildRequest, check_request

log = logging.getLogger(__name__)

PROG = "kbit-zoo"
CONFIG_NAME = "zoo_build"
BUILD_KEYS = ("zoo", "zoo_dir", "device", "sizes", "threads")  # conf/zoo_build.yaml
PATH_RESOLVER = "kbit.user_path"  # ${kbit.user_path:${zoo_dir}} in conf/zoo_build.yaml


def check_build(cfg: DictConfig) -> BuildRequest:
    """Every value rule of a composed ``kbit-zoo`` config; raises :class:`ZooConfigError`.

    The keys of ``conf/zoo_build.yaml`` (a ``+key=...`` Hydra accepts without a schema is
    refused here), then :func:`harness.zoo.request.check_request`: the family, the sizes, the
    device, the threads and the zoo folder. Writes nothing.
    """
    from omegaconf.errors import OmegaConfBaseException

    if cfg.get("zoo") is None:  # ~zoo or zoo=null
        raise ZooConfigError(f"zoo is not set; allowed: zoo=<family>, one of {family_names()}")
    for key in BUILD_KEYS:
        if key not in cfg:  # ~device: deleted
            raise ZooConfigError(f"{key} is not set; allowed: a value (conf/zoo_build.yaml)")
    for key in cfg:
        if key not in BUILD_KEYS and key != "hydra":
            value = OmegaConf.select(cfg, str(key), throw_on_resolution_failure=False)
            raise _unknown_key(str(key), value)
    try:
        family = OmegaConf.to_container(cfg.zoo, resolve=True)
        sizes = cfg.sizes
        if isinstance(sizes, ListConfig):
            sizes = OmegaConf.to_container(sizes, resolve=True)
        zoo_dir, device, threads = cfg.zoo_dir, cfg.device, cfg.threads
    except OmegaConfBaseException as err:  # e.g. an interpolation of an unset variable
        raise ZooConfigError(input_error_line(err) or str(err).splitlines()[0]) from err
    if not isinstance(family, dict):
        raise ZooConfigError(f"zoo={family!r}; allowed: a family name (conf/zoo/<name>.yaml)")
    return check_request(family, zoo_dir=zoo_dir, device=device, sizes=sizes, threads=threads)


def _unknown_key(key: str, value: Any) -> ZooConfigError:
    """A key ``kbit-zoo`` does not have: named, with the closest allowed keys (one line)."""
    head, _, rest = key.partition(".")
    if head == "zoo" and rest:  # a family field: the family's schema names the closest
        nested: Any = value
        for part in reversed(rest.split(".")):
            nested = {part: nested}
        try:
            check_keys(nested)
        except ZooConfigError as err:
            return err
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return ZooConfigError(
        f"{key}={shown} is not a setting of {PROG}; allowed keys: {', '.join(BUILD_KEYS)} "
        f"(and zoo.<field> of the family){did_you_mean(head, BUILD_KEYS)}"
    )


def _composition_line(exc: BaseException, overrides: list[str]) -> str:
    """One line for an override Hydra could not compose (a key, a group, a syntax error)."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = exc.__cause__
    key = getattr(cause, "full_key", None)
    unknown = isinstance(cause, ConfigKeyError | ConfigAttributeError)
    if unknown and key and "not in struct" in str(cause):
        value = next((o.split("=", 1)[1] for o in overrides
                      if o.lstrip("+~").split("=", 1)[0] == key and "=" in o), None)  # fmt: skip
        return str(_unknown_key(str(key), value))
    line = input_error_line(exc)
    if line is None:  # e.g. a syntax error, or zoo=nan (a number, not a group name)
        lines = str(exc).strip().splitlines()
        line = lines[0] if lines else type(exc).__name__
        if "group override" in line:
            line += f"; allowed: zoo=<family>, one of {family_names()}"
    return line


def _refuse(line: str) -> None:
    sys.stderr.write(f"{PROG}: {line}\n")
    sys.exit(EXIT_REFUSED)


def _sweep_jobs(overrides: list[str]) -> list[list[str]] | None:
    """The overrides of each job of a ``--multirun`` (Hydra's basic sweeper), or None.

    None when another sweeper is chosen (its jobs are checked one by one in :func:`_run`).
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return [overrides]  # composing them names the syntax error in one line
    if any(o.get_key_element().lstrip("+~").startswith("hydra/sweeper") for o in parsed):
        return None
    try:
        return BasicSweeper.split_arguments(parsed, None)[0]
    except Exception:  # a sweep the basic sweeper refuses: Hydra reports it
        return None


def _checks_a_run(argv: list[str]) -> list[list[str]] | None:
    """The overrides of each job ``argv`` runs (checked before Hydra starts), or None.

    None for what runs no build here (``--help``, ``--cfg``, ``--info``, ...) and for another
    config folder; a multirun gives one list per job.
    """
    from hydra._internal.utils import get_args_parser

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # an unknown flag: Hydra prints its usage itself
        return None
    other = (args.help, args.hydra_help, args.cfg, args.info, args.shell_completion,
             args.config_path, args.config_dir, args.experimental_rerun)  # fmt: skip
    if any(other) or (args.config_name not in (None, CONFIG_NAME)):
        return None
    return _sweep_jobs(list(args.overrides)) if args.multirun else [list(args.overrides)]


def preflight(argv: list[str]) -> str | None:
    """Compose ``argv``'s config and check it as the run will; the refusal line, or None."""
    from hydra import compose, initialize_config_dir

    jobs = _checks_a_run(argv)
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    for overrides in jobs or []:
        try:
            with initialize_config_dir(str(CONF_DIR.parent), version_base="1.3"):
                cfg = compose(CONFIG_NAME, overrides=overrides)
        except Exception as exc:  # composition reads only the overrides and conf/: their fault
            if full_error:
                raise
            return _composition_line(exc, overrides)
        try:
            check_build(cfg)
        except ZooConfigError as err:
            if full_error:
                raise
            return str(err)
    return None


def _expand(value: Any) -> str:
    """``${kbit.user_path:...}``: the zoo folder Hydra's log folder goes in, expanded."""
    if value is None:
        return str(default_zoo_dir())
    try:
        return str(user_path(str(value), "zoo_dir"))
    except PathError as err:
        raise ZooConfigError(str(err)) from None


def register_resolver() -> None:
    """Register ``kbit.user_path`` (idempotent), which ``conf/zoo_build.yaml``'s log folder uses."""
    OmegaConf.register_new_resolver(PATH_RESOLVER, _expand, replace=True)


def _run(cfg: DictConfig) -> None:
    try:
        request = check_build(cfg)
    except ZooConfigError as err:  # checked already, unless a --multirun job
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _refuse(str(err))
    from harness.zoo.build import build  # transformers: only once a build is sure to run

    try:
        paths = build(request)
    except ZooConfigError as err:  # what only the build can tell (a vocabulary too large)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.stderr.write(f"{PROG}: {err}\n")
        sys.exit(EXIT_FAILED)
    for path in paths:
        log.info("ready: %s", path)


def main() -> None:
    """Entry point of ``kbit-zoo`` (config: conf/zoo_build.yaml; groups: conf/zoo/).

    Exit status: 0 built (or cached); 2 the input was refused before any work (one line on
    stderr); 1 the build failed (a config error only the build finds: one line too).
    """
    argv = sys.argv[1:]
    bad = target_overrides(argv)
    if bad:
        _refuse(f"{bad[0]!r}: overriding a _target_ (an import path Hydra would call) is not "
                "allowed; allowed: the fields of conf/zoo_build.yaml and of a family")  # fmt: skip
    register_resolver()
    line = preflight(argv)
    if line is not None:
        _refuse(line)
    app = hydra.main(version_base="1.3", config_path=str(CONF_DIR.parent), config_name=CONFIG_NAME)
    app(_run)()


if __name__ == "__main__":
    main()
