"""Data types: k-bit codebooks (sorted values in [-1, 1] with max |v| = 1).

A *family* (int, float, dynamic, quantile, normal) is a function registered in
:mod:`harness.dtypes.registry`; a *data type* is a YAML entry in ``conf/dtype/`` naming a
family and its options (see ``docs/dtypes.md``). :func:`codebook` turns a name and k into
values; :func:`check` / :func:`legal_bits` validate a (name, k) pair before any work starts.
"""

from __future__ import annotations

from harness.dtypes.registry import (
    check,
    clear_cache,
    codebook,
    entries,
    families,
    get_spec,
    is_data_dependent,
    legal_bits,
    register_family,
)
from harness.dtypes.spec import DtypeSpec, Estimator


def register_configs() -> None:
    """Store the entry schema in Hydra's ConfigStore as ``dtype/dtype_schema``.

    Each ``conf/dtype/*.yaml`` lists ``dtype_schema`` first in its defaults, so Hydra checks
    the entry's keys and types against :class:`DtypeSpec` at compose time. Called by the
    ``kbit-run`` entry point before composing (nothing is registered at import time).
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="dtype", name="dtype_schema", node=DtypeSpec)


__all__ = [
    "DtypeSpec",
    "Estimator",
    "check",
    "clear_cache",
    "codebook",
    "entries",
    "families",
    "get_spec",
    "is_data_dependent",
    "legal_bits",
    "register_configs",
    "register_family",
]
