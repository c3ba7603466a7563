"""The model zoo: families of small causal LMs that differ only in size, trained locally.

``kbit-zoo zoo=<family>`` builds a family from ``conf/zoo/<family>.yaml``;
``resolve_model("zoo:<family>/<size>", zoo_dir)`` finds a built model for ``kbit-run``.
See docs/zoo.md.
"""

from harness.zoo.build import ZooModelNotBuiltError, build_family, family_sizes
from harness.zoo.config import FamilyConfig, ZooConfigError, family_names, load_family_config
from harness.zoo.resolve import resolve_model

__all__ = [
    "FamilyConfig",
    "ZooConfigError",
    "ZooModelNotBuiltError",
    "build_family",
    "family_names",
    "family_sizes",
    "load_family_config",
    "resolve_model",
]
