"""Plugins: a user's package that registers data-type families, methods and figures.

A plugin is an ordinary Python module or package. Importing it registers what it defines,
with the public registration functions (``harness.dtypes.register_family``,
``harness.dtypes.register_dtype_dir``, ``harness.quantize.methods.register_method``,
``analysis.figure_registry.register_figure``); see ``docs/plugins.md``. A process finds
plugins two ways, and loads each once:

* installed: every entry point of group ``kbit.plugins`` (``[project.entry-points."kbit.plugins"]
  name = "package.module"`` in the plugin's pyproject). An entry point naming a callable
  (``"package.module:register"``) is called once, without arguments, after the import.
* named: ``plugins: [module, ...]`` in a cell's config (``kbit-run plugins=[mypkg.kbit]``),
  imported from ``sys.path`` (``PYTHONPATH``).

Every process that composes or runs a cell (``kbit-run``, the sweeper, local and Slurm jobs)
calls :func:`load_plugins` with the cell's list *before composing*, so the plugins' data types
are options of the config and pass the same checks as the built-in ones. Records name each
plugin with :func:`loaded`: the version of the distribution it came from, or, for a module
that is not part of an installed distribution, ``sha256:<digest>`` of its source (every
``.py`` file of a package), so a cell says exactly which plugin code produced it.

Nothing is imported when this module is imported; :func:`load_plugins` does the work.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kbit.plugins"
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_LOADED: dict[str, str] = {}  # plugin name -> version or sha256 digest, in load order


class PluginError(ValueError):
    """A plugin that cannot be loaded: one line naming it and what is allowed."""


def loaded() -> dict[str, str]:
    """Every plugin this process has loaded: name -> version or ``sha256:<hex>`` digest."""
    return dict(_LOADED)


def load_plugins(modules: Sequence[str] = ()) -> dict[str, str]:
    """Import every ``kbit.plugins`` entry point and each module of ``modules``, each once.

    Returns :func:`loaded` (every plugin of this process, not only the ones of this call).
    Raises :class:`PluginError` (a ValueError, one line) for a name that is not a module
    name, a module that cannot be found, or a plugin that fails while it is imported.
    """
    if isinstance(modules, str):  # a lone name, not a list of its characters
        modules = [modules]
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _LOADED:
            _load_entry_point(ep)
    for name in modules:
        name = str(name)
        if name not in _LOADED:
            _LOADED[name] = _version_or_digest(_import(name, f"plugins: {name!r}"))
            log.info("plugin %s loaded (%s)", name, _LOADED[name])
    return loaded()


def _load_entry_point(ep: metadata.EntryPoint) -> None:
    what = f"entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP})"
    module = _import(ep.module, what)
    if ep.attr:
        target = module
        for part in ep.attr.split("."):
            target = getattr(target, part, None)
        if not callable(target):
            raise PluginError(f"{what}: {ep.attr!r} is not a callable of {ep.module}; allowed: "
                              "'module' or 'module:function'")  # fmt: skip
        try:
            target()
        except Exception as exc:
            raise PluginError(f"{what}: {ep.attr}() failed: {_first_line(exc)}") from exc
    dist = getattr(ep, "dist", None)
    _LOADED[ep.name] = dist.version if dist is not None else _version_or_digest(module)
    log.info("plugin %s loaded (%s)", ep.name, _LOADED[ep.name])


def _import(name: str, what: str) -> ModuleType:
    if not _MODULE_NAME.match(name):
        raise PluginError(f"{what} is not a module name; allowed: a dotted Python module name "
                          "(package.module) on sys.path, or an installed kbit.plugins entry "
                          "point")  # fmt: skip
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise PluginError(f"{what}: no module {exc.name!r} on sys.path; allowed: a module "
                              "importable here (set PYTHONPATH, or install it)") from exc  # fmt: skip
        raise PluginError(f"{what} failed to import: {_first_line(exc)}") from exc
    except Exception as exc:  # the plugin's own error while registering
        raise PluginError(f"{what} failed to import: {_first_line(exc)}") from exc


def _version_or_digest(module: ModuleType) -> str:
    """The version of the installed distribution holding ``module``, else its source digest."""
    top = module.__name__.split(".")[0]
    dists = metadata.packages_distributions().get(top) or []
    for dist in dists:
        try:
            files = metadata.distribution(dist).files or []
        except metadata.PackageNotFoundError:
            continue
        # an editable install of a checkout also maps its top-level name: only a module file
        # the distribution lists is "from" it
        origin = Path(module.__file__ or "").resolve()
        if any(Path(str(f.locate())).resolve() == origin for f in files):
            return metadata.version(dist)
    return source_digest(module)


def source_digest(module: ModuleType) -> str:
    """``sha256:<hex>`` of a module's source file, or of every ``.py`` file of a package
    (relative path and bytes, in sorted order): changes whenever the plugin's code does."""
    file = getattr(module, "__file__", None)
    if not file:
        raise PluginError(f"plugins: {module.__name__!r} has no source file (a namespace "
                          "package?); allowed: a module or a package with __init__.py")  # fmt: skip
    path = Path(file)
    digest = hashlib.sha256()
    if path.name == "__init__.py":
        for f in sorted(path.parent.rglob("*.py")):
            digest.update(str(f.relative_to(path.parent)).encode() + b"\0")
            digest.update(f.read_bytes() + b"\0")
    else:
        digest.update(path.read_bytes())
    return f"sha256:{digest.hexdigest()}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


__all__ = ["ENTRY_POINT_GROUP", "PluginError", "load_plugins", "loaded", "source_digest"]


def add_plugin_folder(
    folders: list[Path], folder: str | os.PathLike, what: str, holds: str
) -> bool:
    """Append ``folder`` (resolved) to a registry's list of plugin folders; False when it is
    there already (registering twice is a no-op). One rule for every registry a plugin ships
    folders to (data-type entries, task definitions): ``what`` names the folder kind and
    ``holds`` what it holds, for the one-line refusal of a path that is not a folder."""
    path = Path(folder).resolve()
    if not path.is_dir():
        raise ValueError(f"{what} {folder} is not a folder; allowed: a folder of {holds}")
    if path in folders:
        return False
    folders.append(path)
    return True
