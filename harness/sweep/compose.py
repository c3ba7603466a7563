"""Compose each cell's config exactly as its job will, fast enough for 35,000 cells.

:class:`CellComposer` composes once per distinct combination of config-group choices (Hydra's
public ``ConfigLoader.load_sweep_config``) and applies a cell's plain values to a copy, the way
Hydra applies command-line overrides after composition (:func:`apply_value_overrides`, the one
place that uses a Hydra internal: see there). :meth:`CellComposer.plain` gives a cell's plain
data without composing it at all, for the planner's fast path.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


def apply_value_overrides(overrides: Sequence[Override], cfg: DictConfig) -> None:
    """Apply parsed value overrides (``bits=4``, ``+x=1``, ``~y``) to a composed ``cfg``, in
    place, exactly as Hydra applies the command line's after composing.

    Why a Hydra internal: hydra-core has no public API that applies overrides to a config it
    has already composed (the public compose API composes from scratch: tens of milliseconds a
    cell, minutes for a paper grid). ``ConfigLoaderImpl._apply_overrides_to_config`` is that
    step of Hydra's own composition, so the values mean exactly what they mean to ``kbit-run``.
    This is the only use; hydra-core's tested range is pinned in pyproject.toml and checked by
    tests/test_versions.py.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    with read_write(cfg):
        ConfigLoaderImpl._apply_overrides_to_config(list(overrides), cfg)


_DELETED = object()  # an override's effect: the field is gone (``~key``)


def _frozen(value: Any) -> Any:
    """Plain config data as a hashable value that tells 1, 1.0 and True apart."""
    if isinstance(value, dict):
        return ("dict", tuple((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("list", tuple(_frozen(v) for v in value))
    plain = isinstance(value, str | int | float | bool | None)
    return (type(value), value if plain else repr(value))


class CellComposer:
    """Compose cell configs exactly as each job will, but fast.

    Composing a full Hydra config takes tens of milliseconds; a 35,000-cell grid would take
    minutes. Config-group choices (``dtype=nf4``, ``+sweeps=demo``) need real composition;
    plain values (``bits=4``) are applied to a copy of the composed config the same way Hydra
    applies command-line overrides after composition. Cells are composed once per distinct
    combination of group choices.
    """

    def __init__(self, config_loader: Any, master_config: DictConfig) -> None:
        self.loader = config_loader
        self.master = master_config
        self.parser = OverridesParser.create(config_loader=config_loader)
        self._parsed: dict[str, Override] = {}
        self._composed: dict[tuple[str, ...], DictConfig] = {}
        self._is_group: dict[str, bool] = {}
        # for plain(): group choices -> (composed?, plain data | the error), and
        # (group choices, value overrides of one top-level field) -> their effect (_one_effect)
        self._bases: dict[tuple[str, ...], tuple[bool, Any]] = {}
        self._effects: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[Any, str, Any]] = {}

    def _parse(self, item: str) -> Override:
        if item not in self._parsed:
            self._parsed[item] = self.parser.parse_override(item)
        return self._parsed[item]

    def _group(self, override: Override) -> bool:
        key = override.key_or_group
        if key not in self._is_group:
            repo = getattr(self.loader, "repository", None)
            exists = repo.group_exists(key) if repo is not None else True
            self._is_group[key] = bool(exists) or key.startswith("hydra/")
        return self._is_group[key]

    def compose(self, overrides: Sequence[str]) -> DictConfig:
        """The cell config a job launched with ``overrides`` receives (without ``hydra``)."""
        parsed = [self._parse(o) for o in overrides]
        groups = tuple(o.input_line for o in parsed if self._group(o))
        if groups not in self._composed:
            cfg = self.loader.load_sweep_config(self.master, list(groups))
            with read_write(cfg), open_dict(cfg):
                cfg.pop("hydra", None)
            self._composed[groups] = cfg
        cfg = copy_config(self._composed[groups])
        values = [o for o in parsed if not self._group(o)]
        apply_value_overrides(values, cfg)
        return cfg

    def plain(self, overrides: Sequence[str]) -> dict[str, Any] | None:
        """``OmegaConf.to_container(self.compose(overrides), resolve=True, enum_to_str=True)``
        without composing, or None where that shortcut does not apply (then compose).

        Raises what :meth:`compose` raises. Why it is the same: the group composition is
        resolved to plain data once; the value overrides (``bits=4``, ``eval.limit=5``) of one
        top-level field are applied together, in their order, to a copy of the group
        composition, once per distinct combination, and their effect is the new value of that
        one field (overrides that change any other field, or whose value is an interpolation,
        are not used). Overrides of distinct top-level fields are independent, so a cell is
        the composition's plain data with each field's effect put in.
        """
        parsed = [self._parse(o) for o in overrides]
        groups = tuple(o.input_line for o in parsed if self._group(o))
        base = self._plain_base(groups)
        if base is None:
            return None
        by_top: dict[str, list[Override]] = {}
        for o in parsed:
            if not self._group(o):
                by_top.setdefault(o.key_or_group.split(".")[0], []).append(o)
        effects = [self._effect(groups, top, tuple(os)) for top, os in by_top.items()]
        if any(e[0] is None for e in effects):
            return None
        failed = [e for e in effects if not e[0]]
        if failed:  # the first failing override in the cell's order, as compose raises it
            position = {o.input_line: i for i, o in enumerate(parsed)}
            first = min(failed, key=lambda e: position.get(e[2][0], 0))
            raise first[2][1].with_traceback(None)
        cell = dict(base)
        for _ok, top, value in effects:
            if value is _DELETED:
                cell.pop(top, None)
            else:
                cell[top] = value
        return cell

    def _plain_base(self, groups: tuple[str, ...]) -> dict[str, Any] | None:
        if groups not in self._bases:
            try:
                self.compose(groups)  # composes the group choices (raises as compose does)
            except Exception as exc:
                self._bases[groups] = (False, exc)
            else:
                cfg = self._composed[groups]
                try:
                    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
                except Exception:  # e.g. an unset environment variable: cells find out
                    plain = None
                self._bases[groups] = (True, plain)
        ok, value = self._bases[groups]
        if not ok:
            raise value.with_traceback(None)
        return value

    def _effect(
        self, groups: tuple[str, ...], top: str, overrides: tuple[Override, ...]
    ) -> tuple[Any, str, Any]:
        """(True | False | None, top-level field, new plain value | _DELETED |
        (failing override's input line, its error))."""
        key = (groups, tuple(o.input_line for o in overrides))
        if key not in self._effects:
            self._effects[key] = self._one_effect(groups, top, overrides)
        return self._effects[key]

    def _one_effect(
        self, groups: tuple[str, ...], top: str, overrides: tuple[Override, ...]
    ) -> tuple[Any, str, Any]:
        if any("$" in str(o.input_line) for o in overrides):  # resolved in its cell's context
            return None, top, None
        cfg = copy_config(self._composed[groups])
        for override in overrides:  # one at a time: the failing one is the one compose names
            try:
                apply_value_overrides([override], cfg)
            except Exception as exc:
                return False, top, (override.input_line, exc)
        try:
            after = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        except Exception:
            return None, top, None
        before = self._bases[groups][1]
        changed = {k for k in {*before, *after} if k not in before or k not in after
                   or _frozen(before[k]) != _frozen(after[k])}  # fmt: skip
        order = [k for k in after if k != top] == [k for k in before if k != top]
        if not changed <= {top} or not order:
            return None, top, None  # it changed another field, or the order of the fields
        return True, top, after.get(top, _DELETED)


def copy_config(cfg: DictConfig) -> DictConfig:
    """A deep copy of a composed config, node for node (types, flags, interpolations).

    Why not ``copy.deepcopy``: OmegaConf's deepcopy walks every node in Python (~5 ms for a
    cell config); a pickle round trip gives the same nodes in less than half the time, and a
    plan copies the composition once per distinct group choices and check.
    """
    return pickle.loads(pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL))
