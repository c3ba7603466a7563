"""What ``kbit-run --help`` lists: the config groups a user sets for a cell, and their options.

Why: Hydra's default help lists every group on the config search path, so ``kbit-run --help``
showed the typed schemas Hydra's ConfigStore holds (``dtype_schema``, ``<method>_schema``:
internal, never chosen by a user) and ``zoo`` (``conf/zoo/``: ``kbit-zoo``'s families, which
``conf/config.yaml`` never reads). ``conf/hydra/help/kbit.yaml`` asks this module instead:

* the cell's groups are those of ``conf/config.yaml``'s defaults tree, as Hydra records them
  in ``hydra.runtime.choices`` (``dtype``, ``eval``, ``method``, ``format``; ``hydra/...``
  left out), plus any group the template names (``sweeps``, used as ``+sweeps@_global_=``);
* each group's options are what Hydra's config loader finds on the search path (``conf/``,
  ``--config-dir``, the entries of ``$KBIT_DTYPE_DIR`` registered in the ConfigStore), less
  the schema entries (names ending in ``_schema``).

Nothing is kept by hand: a new ``conf/dtype/<name>.yaml`` shows up in the help by itself.
The resolver is registered when Hydra starts (``hydra_plugins/kbit_help``), before any
config is composed, so ``kbit-run --help`` and the compose API both find it.
"""

from __future__ import annotations

from typing import Any

RESOLVER = "kbit.help_groups"
SCHEMA_SUFFIX = "_schema"  # ConfigStore entries of harness.config.schema.register_schema


def group_options(group: str) -> list[str]:
    """The options of ``group`` on the running Hydra's search path, schema entries left out."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    gh = GlobalHydra.instance()
    if not gh.is_initialized():  # composed outside Hydra: nothing to list
        return []
    options = gh.config_loader().get_group_options(group, results_filter=ObjectType.CONFIG)
    return [o for o in options if not o.endswith(SCHEMA_SUFFIX)]


def help_groups(*groups: str, _root_: Any) -> str:
    """``group: option, option, ...`` lines: ``groups`` if given, else the cell's groups
    (the non-Hydra keys of ``hydra.runtime.choices``, sorted); a group without options is
    left out."""
    if not groups:
        choices = _root_.hydra.runtime.choices
        groups = tuple(sorted(str(g) for g in choices if not str(g).startswith("hydra")))
    lines = []
    for group in groups:
        options = group_options(str(group))
        if options:
            lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


def register_resolver() -> None:
    """Register :data:`RESOLVER` (idempotent), which ``conf/hydra/help/kbit.yaml`` calls."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(RESOLVER, help_groups, replace=True)
