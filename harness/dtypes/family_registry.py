"""Family registry: each family's codebook function, its legal k and the fields it reads.

*Families are code, data types are data*: a family is one function registered here with
:func:`register_family` (the built-ins of :data:`BUILTIN_FAMILY_MODULES`, or a plugin's: see
``docs/plugins.md``). Each declares its options (``options=``, and a :class:`DtypeSpec`
subclass as ``schema=`` when it needs fields the flat class lacks); a field outside them,
set away from its default, is refused with the family's allowed fields
(:func:`foreign_fields`, :func:`foreign_line`). The entries (YAML) and codebooks are
:mod:`harness.dtypes.registry`'s.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from harness.dtypes.spec import COMMON_FIELDS, DtypeSpec
from harness.names import unknown_name

# Modules whose import registers the built-in families (imported lazily on first lookup).
BUILTIN_FAMILY_MODULES = (
    "harness.dtypes.integer",
    "harness.dtypes.floating",
    "harness.dtypes.dynamic",
    "harness.dtypes.normal",
    "harness.dtypes.quantile",
    "harness.dtypes.table",
)

BuildFn = Callable[[DtypeSpec, int, "torch.Tensor | None"], torch.Tensor]
ValidateFn = Callable[[DtypeSpec, int], None]


@dataclass(frozen=True)
class Family:
    """A registered family: how to build its codebook and which k it supports."""

    name: str
    build: BuildFn  # (spec, k, tensor) -> codebook values (any float dtype, any order)
    bits: tuple[int, ...]  # every k the family can build in principle
    needs_tensor: bool = False  # data-dependent codebook (quantile): built from the tensor
    validate: ValidateFn | None = None  # extra (spec, k) checks, raising ValueError
    options: tuple[str, ...] = ()  # the entry fields this family reads, besides COMMON_FIELDS
    schema: type[DtypeSpec] = DtypeSpec  # the entry class: DtypeSpec or a subclass of it

    @property
    def allowed_fields(self) -> tuple[str, ...]:
        """Every field an entry of this family may set: the common ones, then its options."""
        return COMMON_FIELDS + self.options


_FAMILIES: dict[str, Family] = {}
_GENERATION = 0  # bumped by each registration: parsed entries are cached per generation


def generation() -> int:
    """How many registrations this process has seen (a cache key for parsed entries: an
    entry parsed before its family was registered is parsed again after)."""
    return _GENERATION


def register_family(
    name: str,
    bits: Sequence[int],
    *,
    needs_tensor: bool = False,
    validate: ValidateFn | None = None,
    options: Sequence[str] = (),
    schema: type[DtypeSpec] = DtypeSpec,
) -> Callable[[BuildFn], BuildFn]:
    """Decorator: register ``fn(spec, k, tensor) -> values`` as family ``name``.

    ``options``: the entry fields the family reads besides ``name``, ``family`` and ``bits``;
    any other field set away from its default is refused (:func:`check`). ``schema``: the
    entry class, :class:`DtypeSpec` or a dataclass subclass adding the family's own fields
    (``harness.dtypes.table.TableSpec``); every option must be one of its fields. Registering
    the same function twice is a no-op (a plugin imported again); another function under a
    taken name is refused.
    """
    if not (isinstance(schema, type) and issubclass(schema, DtypeSpec)):
        raise TypeError(f"family {name!r}: schema={schema!r} must be DtypeSpec or a subclass")
    fields = {f.name for f in dataclasses.fields(schema)}
    unknown = [o for o in options if o not in fields or o in COMMON_FIELDS]
    if unknown:
        raise ValueError(f"family {name!r}: options {unknown} are not fields of "
                         f"{schema.__name__} (besides {list(COMMON_FIELDS)})")  # fmt: skip

    def wrap(fn: BuildFn) -> BuildFn:
        if name in _FAMILIES and _FAMILIES[name].build is not fn:
            raise ValueError(f"family {name!r} is already registered")
        _FAMILIES[name] = Family(
            name, fn, tuple(bits), needs_tensor, validate, tuple(options), schema
        )
        global _GENERATION
        _GENERATION += 1  # an entry of this family parsed before it existed is usable now
        return fn

    return wrap


def families() -> dict[str, Family]:
    """All registered families by name (built-ins imported on first use)."""
    for module in BUILTIN_FAMILY_MODULES:
        importlib.import_module(module)
    return dict(_FAMILIES)


def get_family(name: str) -> Family:
    """The registered family ``name``; a ValueError naming the registered ones otherwise."""
    fams = families()
    if name not in fams:
        raise unknown_name("family", name, fams)
    return fams[name]


def family_or_none(name: Any) -> Family | None:
    """The registered family of an entry's ``family:`` value, or None (unknown: refused later,
    naming the registered families)."""
    if not isinstance(name, str):
        return None
    return families().get(name)


def any_family_fields() -> set[str]:
    """Every field some registered family's entry class has: a key outside this set is a
    typo (named with its closest field), a key inside it belongs to another family."""
    return {f.name for fam in families().values() for f in dataclasses.fields(fam.schema)}


def foreign_line(what: str, family: Family, key: str, value: Any) -> str:
    """The one line refusing field ``key`` on an entry of ``family``."""
    shown = getattr(value, "value", value)  # an enum's text
    if isinstance(shown, DictConfig | ListConfig):
        shown = OmegaConf.to_container(shown)
    return (
        f"{what}: {key}={shown!r} does not belong to family {family.name!r}; "
        f"allowed fields of {family.name!r}: {', '.join(family.allowed_fields)}"
    )


def foreign_fields(spec: DtypeSpec) -> list[tuple[str, Any]]:
    """(field, value) of every field of ``spec`` that its family does not declare and that is
    not at its default: the settings that would be ignored (and yet change the cell id)."""
    family = get_family(spec.family)
    out = []
    for f in dataclasses.fields(spec):
        if f.name in family.allowed_fields:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        value = getattr(spec, f.name)
        if getattr(value, "value", value) != getattr(default, "value", default):
            out.append((f.name, getattr(value, "value", value)))
    return out
