"""Command-line overrides of ``kbit-run``, checked and normalised before Hydra composes.

Why before composition: some inputs are lost or acted on by the time a config exists.
OmegaConf turns ``quantize_head=2`` (or ``yes``) into ``True``; a config-group option such as
``+sweeps@_global_=../../../x`` is a file path Hydra loads; a ``_target_`` inside an override
*value* is an import path Hydra calls; and a format (``format=nvfp4``) loses to a field set
beside it (``block_size=64``) without a trace in the composed config. Each is refused here in
one line (:class:`harness.config.schema.ConfigError`).

Paths: ``results_dir``, ``data_root`` and ``zoo_dir`` given on the command line, and the
``KBIT_*`` path variables, are rewritten to the path :func:`harness.files.user_path` reads
(``$VAR`` then ``~`` expanded). The rewritten overrides are what Hydra composes, in this
process and in every job a launcher starts, so Hydra's own folders (``hydra.run.dir``,
``hydra.sweep.dir``: ``${results_dir}/.hydra/...``), the planner and the cell files all use
the one expanded path, never a literal ``./~`` folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from harness.config.axes import flagged
from harness.config.schema import CellConfig, ConfigError
from harness.dtypes.spec import DtypeSpec
from harness.files import PathError, user_path

# cell fields that are user paths (declared in the schema: harness.config.axes), and the
# environment variables conf/config.yaml reads them from
PATH_FIELDS = flagged(CellConfig, "user_path")
PATH_ENV = ("KBIT_RESULTS_DIR", "KBIT_DATA_ROOT", "KBIT_ZOO_DIR", "KBIT_DTYPE_DIR")
# what a format (conf/format/<name>.yaml) fixes: no other value of these may be set beside it
# (the schema's fields declared with format=True)
FORMAT_FIELDS = flagged(CellConfig, "format")
BOOL_ALLOWED = "true or false"
_OPTION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
_PREFIX = {"ADD": "+", "FORCE_ADD": "++", "CHANGE": "", "DEL": "~"}


def conf_dir() -> Path:
    """The repository's ``conf/`` folder (what ``kbit-run`` composes from)."""
    import harness

    return Path(harness.__file__).resolve().parents[1] / "conf"


def expand_path_env(environ: MutableMapping[str, str] | None = None) -> None:
    """Rewrite each set ``KBIT_*`` path variable to the path :func:`user_path` reads.

    Jobs started by a launcher inherit the environment, so they read the same path. An unset
    variable inside one (``KBIT_RESULTS_DIR='$NOPE/x'``) raises :class:`ConfigError`.
    """
    env = os.environ if environ is None else environ
    for name in PATH_ENV:
        value = env.get(name)
        if value:
            try:
                env[name] = str(user_path(value, name))
            except PathError as err:
                raise ConfigError(str(err)) from err


def command_overrides(argv: Sequence[str]) -> list[str]:
    """The override arguments of a Hydra command line (flags and their values left out)."""
    from hydra._internal.utils import get_args_parser

    try:
        args = get_args_parser().parse_args(list(argv))
    except SystemExit:  # a bad flag: Hydra reports it itself
        return []
    return list(args.overrides or [])


def plugin_modules(overrides: Sequence[str]) -> list[str]:
    """The modules named by ``plugins=`` among ``overrides`` (each once, in order; every
    value of a sweep ``plugins=a,b``): what the entry point loads before Hydra composes."""
    out: list[str] = []
    for o in parse(overrides):
        if o.key_or_group != "plugins" or o.is_delete():
            continue
        values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
        for value in values:
            for item in value if isinstance(value, list | tuple) else [value]:
                if item is not None and str(item) not in out:
                    out.append(str(item))
    return out


def parse(overrides: Sequence[str]) -> list[Any]:
    """Hydra's parse of ``overrides``; a grammar error is one :class:`ConfigError` line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except OverrideParseException as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ConfigError(
                f"{text!r} is not a valid override ({first}); allowed: key=value, a value with "
                "special characters quoted, e.g. results_dir='~/x'"
            ) from exc
    return parsed


def _values(override: Any) -> list[Any] | None:
    """The values an override sets (a sweep: each one), or None when it lists no values."""
    if override.is_delete():
        return []
    value = override.value()
    if not override.is_sweep_override():
        return [value]
    if not hasattr(value, "list"):  # range/glob: not a list of values
        return None
    from hydra.core.override_parser.types import QuotedString

    return [v.text if isinstance(v, QuotedString) else v for v in value.list]


def _text(value: Any) -> str:
    """A parsed value as it is written on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def config_groups() -> set[str]:
    """Every config group of ``conf/`` (``dtype``, ``sweeps``, ``hydra/launcher``, ...)."""
    root = conf_dir()
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}


def _is_group(override: Any, groups: set[str]) -> bool:
    key = str(override.key_or_group)
    return override.package is not None or "/" in key or key in groups


def check_group_options(parsed: Iterable[Any], groups: set[str] | None = None) -> None:
    """A config-group option is a plain name (``/`` into a subfolder at most): never ``..``
    or an absolute path, which would make Hydra load YAML from outside ``conf/``."""
    groups = config_groups() if groups is None else groups
    for o in parsed:
        if not _is_group(o, groups):
            continue
        for value in _values(o) or []:
            if value is not None and not _OPTION.match(str(value)):
                group = str(o.key_or_group)
                raise ConfigError(
                    f"{group}={str(value)!r} is not a config name; allowed: a name of "
                    f"conf/{group}/ (letters, digits, '_', '.', '-'; '/' into a subfolder), "
                    "no '..', no absolute path"
                )


def bool_fields() -> set[str]:
    """Dotted names of every boolean setting: the cell's, the data type's, each method's."""
    from harness.quantize.methods import methods

    def of(cls: Any, prefix: str) -> set[str]:
        # nested structured configs too (eval.limit_perplexity): one rule for every level
        hints = get_type_hints(cls)
        names = set()
        for f in fields(cls):
            hint = hints.get(f.name, f.type)
            if hint is bool:
                names.add(prefix + f.name)
            elif is_dataclass(hint):
                names |= of(hint, f"{prefix}{f.name}.")
        return names

    names = of(CellConfig, "") | of(DtypeSpec, "dtype.")
    for entry in methods().values():
        names |= of(entry.settings, "method.")
    return names


def check_bools(parsed: Iterable[Any], names: set[str] | None = None) -> None:
    """A boolean setting takes ``true`` or ``false`` only (OmegaConf would read ``2``,
    ``yes`` or ``on`` as true)."""
    names = bool_fields() if names is None else names
    for o in parsed:
        key = str(o.key_or_group)
        if key not in names or o.package is not None:
            continue
        values = _values(o)
        bad = [v for v in values or [] if not isinstance(v, bool)]
        if values is None or bad:
            shown = _text(bad[0]) if bad else o.input_line.split("=", 1)[-1]
            raise ConfigError(f"{key}={shown} is not a boolean; allowed: {BOOL_ALLOWED}")


def format_fixes(name: str) -> dict[str, Any] | None:
    """What ``conf/format/<name>.yaml`` fixes: ``dtype`` (the entry name) and
    :data:`FORMAT_FIELDS`; None when there is no such format (Hydra names the choices)."""
    from omegaconf import OmegaConf

    path = conf_dir() / "format" / f"{name}.yaml"
    if not _OPTION.match(name) or not path.is_file():
        return None
    raw = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(raw, dict)
    fixed = {k: raw[k] for k in FORMAT_FIELDS if k in raw}
    for item in raw.get("defaults") or []:
        if isinstance(item, dict) and "override /dtype" in item:
            fixed["dtype"] = item["override /dtype"]
    return fixed


def check_format(parsed: Sequence[Any], groups: set[str] | None = None) -> None:
    """``format=<name>`` fixes the data type, bits, block size and scale format: another
    value of any of them beside it (``format=nvfp4 block_size=64``) would record a cell that
    is not the format, so it is refused (the same value is allowed)."""
    groups = config_groups() if groups is None else groups
    formats = [o for o in parsed if str(o.key_or_group) == "format" and not o.is_delete()]
    chosen = [str(v) for o in formats for v in (_values(o) or []) if v is not None]
    for name in chosen:
        fixed = format_fixes(name)
        if fixed is None:
            continue
        for o in parsed:
            key = str(o.key_or_group)
            if key.startswith("dtype.") or (key == "dtype" and o.is_delete()):
                raise ConfigError(
                    f"format={name} fixes dtype={fixed.get('dtype')}; got {o.input_line}; "
                    "allowed: format= alone, or dtype/bits/block_size/scale_format without it"
                )
            if key not in (*FORMAT_FIELDS, "dtype") or key not in fixed:
                continue
            values = _values(o)
            if values is None or any(_text(v) != _text(fixed[key]) for v in values):
                raise ConfigError(
                    f"format={name} fixes {key}={_text(fixed[key])}; got {o.input_line}; "
                    "allowed: format= alone, or dtype/bits/block_size/scale_format without it"
                )


def check_format_config(cfg: Any, name: str | None) -> None:
    """The composed cell ``cfg`` is the format ``name`` (``hydra.runtime.choices.format``):
    its data type entry unchanged, and bits, block size and scale format as the format fixes
    them. Catches what :func:`check_format` cannot see on the command line (a value set in a
    sweep file beside ``format=``)."""
    from harness.dtypes import entries

    fixed = format_fixes(str(name)) if name else None
    if fixed is None:
        return
    for key in FORMAT_FIELDS:
        if key in fixed and _text(cfg.get(key)) != _text(fixed[key]):
            raise ConfigError(f"format={name} fixes {key}={_text(fixed[key])}; got "
                              f"{key}={_text(cfg.get(key))}; allowed: format= alone")  # fmt: skip
    dtype = fixed.get("dtype")
    entry = entries().get(str(dtype)) if dtype else None
    if entry is None:
        return
    for f in fields(entry):
        got, want = cfg.dtype.get(f.name), getattr(entry, f.name)
        if _text(getattr(got, "value", got)) != _text(getattr(want, "value", want)):
            raise ConfigError(f"format={name} fixes dtype={dtype}; got dtype.{f.name}="
                              f"{_text(getattr(got, 'value', got))}; allowed: format= alone")  # fmt: skip


def _quote(text: str) -> str:
    """``text`` as one Hydra override value (quoted unless plainly safe)."""
    if re.fullmatch(r"[A-Za-z0-9_./:+@-]+", text) and text not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _environment_only(value: str) -> bool:
    """Whether every ``${...}`` in ``value`` names an environment variable (``${HOME}``), not
    a config key or an OmegaConf resolver, which OmegaConf resolves itself."""
    cell_keys = {f.name for f in fields(CellConfig)}
    inner = re.findall(r"\$\{([^}]*)\}", value)
    return all(re.fullmatch(r"\w+", name) and name not in cell_keys for name in inner)


def expand_path_overrides(overrides: Sequence[str]) -> list[str]:
    """``overrides`` with each ``results_dir`` / ``data_root`` / ``zoo_dir`` value replaced by
    the path :func:`user_path` reads (``~`` and ``$VAR`` expanded); others unchanged.

    ``${NAME}`` is the environment variable NAME unless NAME is a cell setting; another
    interpolation (``${oc.env:X}``) or a non-list sweep is left to OmegaConf. Raises
    :class:`ConfigError` for an unset variable.
    """
    out = []
    for text in overrides:
        o = parse([text])[0]
        key = str(o.key_or_group)
        values = _values(o)
        if key not in PATH_FIELDS or o.package is not None or o.is_delete() or not values:
            out.append(text)
            continue
        if any(not isinstance(v, str) or not _environment_only(v) for v in values if v):
            out.append(text)  # an OmegaConf interpolation (${oc.env:X}, ${results_dir}): its own
            continue
        try:
            new = [None if v is None else str(user_path(v, key)) for v in values]
        except PathError as err:
            raise ConfigError(str(err)) from err
        if new == values:
            out.append(text)
            continue
        joined = ",".join("null" if v is None else _quote(v) for v in new)
        rewritten = f"{_PREFIX.get(o.type.name, '')}{key}={joined}"
        if _values(parse([rewritten])[0]) != new:  # a path Hydra's grammar cannot carry
            raise ConfigError(f"{key}={text.split('=', 1)[-1]}: the expanded path {new!r} "
                              "cannot be passed as an override; allowed: a simpler path")  # fmt: skip
        out.append(rewritten)
    return out


def check_overrides(overrides: Sequence[str]) -> None:
    """Every rule on the command line's overrides (grammar, group options, booleans, format)."""
    parsed = parse(overrides)
    groups = config_groups()
    check_group_options(parsed, groups)
    check_bools(parsed)
    check_format(parsed, groups)
