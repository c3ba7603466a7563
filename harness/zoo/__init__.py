"""The model zoo: families of small causal LMs that differ only in size, trained locally.

``kbit-zoo zoo=<family>`` builds a family from ``conf/zoo/<family>.yaml``;
``resolve_model("zoo:<family>/<size>", zoo_dir)`` finds a built model for ``kbit-run``.
See docs/zoo.md. The names below are imported on first use (PEP 562), so that checking a
``kbit-zoo`` command line (``harness.zoo.cli``) does not wait for ``transformers``.
"""

from __future__ import annotations

from harness.reexport import lazy_names

_HOMES = {
    "FamilyConfig": "harness.zoo.config",
    "ZooConfigError": "harness.zoo.config",
    "family_names": "harness.zoo.config",
    "load_family_config": "harness.zoo.config",
    "ZooModelNotBuiltError": "harness.zoo.paths",
    "build_family": "harness.zoo.build",
    "family_sizes": "harness.zoo.paths",
    "resolve_model": "harness.zoo.resolve",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_names(__name__, _HOMES)
