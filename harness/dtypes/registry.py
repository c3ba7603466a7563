"""The catalogue of named data type entries, their checks, and their codebooks.

*Families are code, data types are data*: a family is one function registered with
:func:`register_family` (:mod:`harness.dtypes.family_registry`, re-exported here); a named data type
is one YAML file in ``conf/dtype/`` (or a plugin's folder, or ``$KBIT_DTYPE_DIR``) that picks
a family and its options. :func:`codebook` is the single lookup that turns a name into values.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.dtypes.family_registry import (
    BUILTIN_FAMILY_MODULES,
    Family,
    any_family_fields,
    families,
    family_or_none,
    foreign_fields,
    foreign_line,
    generation,
    get_family,
    register_family,
)
from harness.dtypes.spec import DtypeSpec
from harness.files import user_path
from harness.names import unknown_name

log = logging.getLogger(__name__)

DTYPE_DIR_ENV = "KBIT_DTYPE_DIR"


# --------------------------------------------------------------------------- entries (YAML)
_PLUGIN_DIRS: list[Path] = []  # folders of entries registered by plugins, in load order


def register_dtype_dir(folder: str | os.PathLike) -> None:
    """Add a folder of data type entries (``<name>.yaml``) shipped by a plugin beside its
    family: searched after ``conf/dtype`` and before ``$KBIT_DTYPE_DIR``, composed by
    ``kbit-run dtype=<name>`` like a ``$KBIT_DTYPE_DIR`` entry. Registering it again is a no-op.
    """
    from harness.plugins import add_plugin_folder

    if add_plugin_folder(_PLUGIN_DIRS, folder, "dtype folder", "data type entries (<name>.yaml)"):
        clear_cache()


def default_dtype_dirs(dtype_dir: str | os.PathLike | None = None) -> tuple[Path, ...]:
    """Folders searched for entries: the repo's ``conf/dtype``, the plugins' folders
    (:func:`register_dtype_dir`), then ``$KBIT_DTYPE_DIR`` if set, then ``dtype_dir`` if
    given, so a user can add data types without touching the checkout. A name defined in two
    of them is refused when used (docs/dtypes.md).
    """
    import harness

    dirs = [Path(harness.__file__).resolve().parents[1] / "conf" / "dtype", *_PLUGIN_DIRS]
    if os.environ.get(DTYPE_DIR_ENV):
        dirs.append(dtype_dir_from_env())
    if dtype_dir is not None:
        dirs.append(Path(dtype_dir))
    return tuple(dict.fromkeys(d.resolve() for d in dirs))  # a folder named twice counts once


def dtype_dir_from_env() -> Path:
    """``$KBIT_DTYPE_DIR`` as :func:`harness.files.user_path` reads it; a ValueError naming
    the variable and its value when it is not a folder (every ``kbit-run`` reads it)."""
    value = os.environ[DTYPE_DIR_ENV]
    folder = user_path(value, DTYPE_DIR_ENV)
    if not folder.is_dir():
        raise ValueError(f"{DTYPE_DIR_ENV}={value!r} is not a folder; allowed: a folder of "
                         "data type entries (<name>.yaml, docs/dtypes.md), or unset")  # fmt: skip
    return folder


def parse_entry(path: Path) -> DtypeSpec:
    """One YAML file -> a validated :class:`DtypeSpec` (the Hydra schema, applied by hand).

    Raises a one-line ValueError naming the file, the field and what is allowed.
    """
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax, unreadable file
        raise ValueError(f"dtype entry {path}: not readable YAML: {_first_line(exc)}") from exc
    if not isinstance(raw, DictConfig):
        raise ValueError(f"dtype entry {path}: must be a mapping of DtypeSpec fields")
    raw.pop("defaults", None)
    family = family_or_none(raw.get("family"))
    schema = family.schema if family is not None else DtypeSpec
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in raw:
        if key not in fields:
            if family is not None and key in any_family_fields():
                raise ValueError(foreign_line(f"dtype entry {path}", family, str(key), raw[key]))
            raise unknown_name(f"dtype entry {path}: field", key, fields)
    try:
        spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw))
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "key", None) or getattr(exc, "full_key", "") or "")
        if key in fields:
            raise ValueError(
                f"dtype entry {path}: field {key!r}: {_first_line(exc)}; "
                f"allowed: {fields[key].type}"
            ) from exc
        raise ValueError(f"dtype entry {path}: {_first_line(exc)}") from exc
    if spec.name != path.stem:
        raise ValueError(f"dtype entry {path}: name={spec.name!r} must equal the file stem")
    if family is not None:
        for key, value in foreign_fields(spec)[:1]:
            raise ValueError(foreign_line(f"dtype entry {path}", family, key, value))
    return spec


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@dataclass(frozen=True)
class _Catalogue:
    """Every entry of a set of folders: the usable ones and, by name, why others are not."""

    good: dict[str, DtypeSpec]
    bad: dict[str, str]  # name -> one-line reason (a parse error, or a name defined twice)
    where: dict[str, Path]  # name -> the file it came from (good and bad)


def _load_entries(dirs: tuple[Path, ...]) -> _Catalogue:
    """:func:`_parse_folders` of ``dirs``, once per family registration generation."""
    return _parse_folders(dirs, generation())


@lru_cache(maxsize=16)
def _parse_folders(dirs: tuple[Path, ...], generation: int) -> _Catalogue:
    """Parse every file once; a bad file only spoils its own name (others stay usable)."""
    good: dict[str, DtypeSpec] = {}
    bad: dict[str, str] = {}
    where: dict[str, Path] = {}
    for folder in dirs:
        if not folder.is_dir():
            raise ValueError(f"dtype folder {folder} does not exist")
        for path in sorted(folder.glob("*.yaml")):
            name = path.stem
            if name in where:  # one name, one definition: see docs/dtypes.md
                good.pop(name, None)
                bad[name] = (
                    f"dtype {name!r} is defined twice: {where[name]} and {path}; an entry "
                    "cannot shadow another (kbit-run would compose one, codebook() read the "
                    "other): rename one (its file and its name: field)"
                )
                continue
            where[name] = path
            try:
                good[name] = parse_entry(path)
            except ValueError as exc:
                bad[name] = str(exc)
    return _Catalogue(good, bad, where)


def _catalogue(
    dtype_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, DtypeSpec], dict[str, str]]:
    """(usable entries as fresh copies, bad entries' reasons) of the default folders."""
    cat = _load_entries(default_dtype_dirs(dtype_dir))
    return {k: dataclasses.replace(v) for k, v in cat.good.items()}, dict(cat.bad)


def entries(dtype_dir: str | os.PathLike | None = None) -> dict[str, DtypeSpec]:
    """Every usable named data type entry, parsed once per set of folders (see ``clear_cache``).

    A file that does not parse is left out (see :func:`bad_entries`); using its name raises
    its parse error.
    """
    return _catalogue(dtype_dir)[0]


def bad_entries(dtype_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Entries that cannot be used, by name: the one-line reason (file, field, what is allowed)."""
    return _catalogue(dtype_dir)[1]


def user_entries() -> dict[str, DtypeSpec]:
    """Usable entries found only in ``$KBIT_DTYPE_DIR``: the ones Hydra does not see in conf/."""
    builtin = _load_entries(default_dtype_dirs()[:1]).where
    return {name: spec for name, spec in entries().items() if name not in builtin}


def clear_cache() -> None:
    """Forget parsed entries and built codebooks (after editing YAML files in a session, or
    registering a family)."""
    _parse_folders.cache_clear()
    _STATIC_CODEBOOKS.clear()


def get_spec(name: str, dtype_dir: str | os.PathLike | None = None, **overrides: Any) -> DtypeSpec:
    """The entry ``name`` with ``overrides`` applied and type-checked by the schema."""
    known, bad = _catalogue(dtype_dir)
    if name not in known:
        if name in bad:
            raise ValueError(bad[name])
        raise unknown_name("dtype", name, known)
    spec = known[name]
    if not overrides:
        return spec
    fields = [f.name for f in dataclasses.fields(spec)]
    family = family_or_none(spec.family)
    for key in overrides:
        if key not in fields:
            if family is not None and key in any_family_fields():
                raise ValueError(foreign_line(f"dtype {name!r}", family, key, overrides[key]))
            raise unknown_name(f"dtype {name!r} override", key, fields)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(spec), overrides)
    except OmegaConfBaseException as exc:
        raise ValueError(f"dtype {name!r} overrides {overrides}: {exc}") from exc
    return OmegaConf.to_object(merged)


# --------------------------------------------------------------------------- checks
def _check_spec(spec: DtypeSpec, bits: int) -> Family:
    family = get_family(spec.family)
    for key, value in foreign_fields(spec)[:1]:
        raise ValueError(foreign_line(f"dtype {spec.name!r}", family, key, value))
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bits={bits!r} must be an int; allowed for {spec.name!r}: {_legal(spec)}")
    if spec.bits is not None and bits != spec.bits:
        raise ValueError(
            f"bits={bits} is not allowed for dtype {spec.name!r}: it only exists at bits={spec.bits}"
        )
    if bits not in family.bits:
        raise ValueError(
            f"bits={bits} is outside the range of family {family.name!r} (dtype {spec.name!r}); "
            f"allowed: {list(family.bits)}"
        )
    if family.validate is not None:
        family.validate(spec, bits)
    return family


def _legal(spec: DtypeSpec) -> list[int]:
    family = get_family(spec.family)
    candidates = [spec.bits] if spec.bits is not None else list(family.bits)
    legal = []
    for k in candidates:
        try:
            _check_spec(spec, k)
        except ValueError:
            continue
        legal.append(k)
    return legal


def legal_bits(
    name: str, dtype_dir: str | os.PathLike | None = None, **overrides: Any
) -> list[int]:
    """Every k at which entry ``name`` (with ``overrides``) exists, ascending."""
    return _legal(get_spec(name, dtype_dir, **overrides))


def check(
    name: str, bits: int, dtype_dir: str | os.PathLike | None = None, **overrides: Any
) -> None:
    """Raise a ValueError naming the field, the value and what is allowed, unless legal."""
    _check_spec(get_spec(name, dtype_dir, **overrides), bits)


def is_data_dependent(name: str, dtype_dir: str | os.PathLike | None = None) -> bool:
    """True when the codebook is fitted per tensor (and so must be stored with it)."""
    return get_family(get_spec(name, dtype_dir).family).needs_tensor


# --------------------------------------------------------------------------- codebooks
def validate_codebook(values: torch.Tensor, bits: int, what: str) -> torch.Tensor:
    """Sorted, unique, at most 2^k finite values in [-1, 1] with max |v| = 1, or ValueError."""
    values = values.detach().to(torch.float32).flatten()
    if values.numel() == 0 or not bool(torch.isfinite(values).all()):
        raise ValueError(f"{what}: codebook is empty or not finite")
    if values.numel() > 2**bits:
        raise ValueError(f"{what}: {values.numel()} values exceed 2^{bits}")
    if bool((values[1:] <= values[:-1]).any()):
        raise ValueError(f"{what}: codebook must be strictly increasing")
    if float(values.abs().max()) != 1.0:
        raise ValueError(f"{what}: max |v| is {float(values.abs().max())}, must be 1")
    return values


def _finish(values: torch.Tensor, bits: int, what: str) -> torch.Tensor:
    """Family output -> the canonical codebook: float32, unique, sorted, max |v| = 1."""
    values = torch.unique(values.detach().to(torch.float64).flatten().cpu())
    values = (values / values.abs().max()).to(torch.float32) + 0.0  # -0.0 -> +0.0
    return validate_codebook(torch.unique(values), bits, what)


_STATIC_CODEBOOKS: dict[tuple, torch.Tensor] = {}  # (spec key, bits) -> codebook


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a field value (a table's ``values`` list)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list | tuple) else value


def _static_codebook(spec: DtypeSpec, bits: int) -> torch.Tensor:
    """A fixed family's codebook, built once per (entry class, field values, k)."""
    key = (type(spec), tuple((f.name, _frozen(getattr(spec, f.name)))
                             for f in dataclasses.fields(spec)), bits)  # fmt: skip
    if key not in _STATIC_CODEBOOKS:
        if len(_STATIC_CODEBOOKS) >= 256:
            _STATIC_CODEBOOKS.clear()
        values = get_family(spec.family).build(spec, bits, None)
        _STATIC_CODEBOOKS[key] = _finish(values, bits, f"dtype {spec.name!r} at bits={bits}")
    return _STATIC_CODEBOOKS[key]


def codebook(
    name: str,
    bits: int,
    tensor: torch.Tensor | None = None,
    *,
    dtype_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> torch.Tensor:
    """The sorted float32 codebook of data type ``name`` at ``k = bits`` (on the CPU).

    ``tensor`` is required by data-dependent families (``quantile``), which fit their
    values to ``tensor / max|tensor|``; pass the block-absmax-normalised values to fit what
    is quantised (``fake_quantize`` does). Other families ignore it. ``overrides`` replace
    entry fields, e.g. ``codebook("float", 6, exponent_bits=2)``.
    """
    spec = get_spec(name, dtype_dir, **overrides)
    family = _check_spec(spec, bits)
    if not family.needs_tensor:
        return _static_codebook(spec, bits).clone()
    if tensor is None:
        raise ValueError(
            f"tensor=None: dtype {name!r} (family {family.name!r}) is fitted to a tensor; pass one"
        )
    values = family.build(spec, bits, tensor)
    return _finish(values, bits, f"dtype {name!r} at bits={bits}")


__all__ = [
    "BUILTIN_FAMILY_MODULES",
    "DTYPE_DIR_ENV",
    "Family",
    "any_family_fields",
    "bad_entries",
    "check",
    "clear_cache",
    "codebook",
    "default_dtype_dirs",
    "dtype_dir_from_env",
    "entries",
    "families",
    "foreign_fields",
    "foreign_line",
    "get_family",
    "get_spec",
    "is_data_dependent",
    "legal_bits",
    "parse_entry",
    "register_dtype_dir",
    "register_family",
    "user_entries",
    "validate_codebook",
]
