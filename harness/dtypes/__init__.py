"""Data types: k-bit codebooks (sorted values in [-1, 1] with max |v| = 1).

A *family* (int, float, dynamic, quantile, normal, table, or a plugin's) is a function
registered in :mod:`harness.dtypes.registry` with the options it reads; a *data type* is a
YAML entry in ``conf/dtype/`` naming a family and its options (see ``docs/dtypes.md``). :func:`codebook` turns a name and k into
values; :func:`check` / :func:`legal_bits` validate a (name, k) pair before any work starts.
"""

from __future__ import annotations

import logging

from harness.dtypes.registry import (
    Family,
    bad_entries,
    check,
    clear_cache,
    codebook,
    entries,
    families,
    foreign_fields,
    get_family,
    get_spec,
    is_data_dependent,
    legal_bits,
    register_dtype_dir,
    register_family,
    user_entries,
)
from harness.dtypes.spec import COMMON_FIELDS, DtypeSpec, Estimator

log = logging.getLogger(__name__)


def register_configs() -> None:
    """Store the data type schemas and the user's entries in Hydra's ConfigStore.

    ``dtype/dtype_schema``: each ``conf/dtype/*.yaml`` lists it first in its defaults, so
    Hydra checks the entry's keys and types against :class:`DtypeSpec` at compose time.
    ``dtype/<family>_schema`` for every family whose entries need a subclass of it
    (``table_schema``: :class:`harness.dtypes.table.TableSpec`; a plugin family's): its
    entries list that one first instead. Plugins must be loaded before this is called
    (``harness.plugins.load_plugins``) for their schemas and entries to be registered.
    ``dtype/<name>`` for every usable entry found only in ``$KBIT_DTYPE_DIR``: Hydra's search
    path knows only ``conf/``, and this is how ``kbit-run dtype=<user entry>`` composes the
    same entry :func:`codebook` reads. A bad entry there is registered as a bare name, so
    ``dtype=<it>`` composes and the run's validation refuses it with the entry's own problem
    (file, field, what is allowed); it blocks nothing else. Called by the ``kbit-run`` entry point
    before composing (nothing is registered at import time); calling it again re-reads
    ``$KBIT_DTYPE_DIR``.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="dtype", name="dtype_schema", node=DtypeSpec)
    for family in families().values():
        if family.schema is not DtypeSpec:
            store.store(group="dtype", name=f"{family.name}_schema", node=family.schema)
    clear_cache()  # the folder may have changed since the last call
    group = store.repo.get("dtype", {})
    for name in _REGISTERED - set(user_entries()):  # an entry removed since the last call
        group.pop(f"{name}.yaml", None)
    _REGISTERED.clear()
    for name, spec in user_entries().items():
        store.store(group="dtype", name=name, node=spec)
        _REGISTERED.add(name)
    for name, reason in bad_entries().items():
        log.debug("data type %r cannot be used: %s", name, reason)
        if name not in entries():  # a placeholder: composes, then validation names the problem
            store.store(group="dtype", name=name, node={"name": name})
            _REGISTERED.add(name)


_REGISTERED: set[str] = set()  # user entries this process put in the ConfigStore


__all__ = [
    "COMMON_FIELDS",
    "DtypeSpec",
    "Estimator",
    "Family",
    "bad_entries",
    "check",
    "clear_cache",
    "codebook",
    "entries",
    "families",
    "foreign_fields",
    "get_family",
    "get_spec",
    "is_data_dependent",
    "legal_bits",
    "register_configs",
    "register_dtype_dir",
    "register_family",
    "user_entries",
]
