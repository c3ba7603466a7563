"""Registers the resolver of ``kbit-run --help`` (:mod:`harness.cli_help`) when Hydra starts.

Hydra calls every search-path plugin before it composes anything (``--help`` included, and
the compose API); this one leaves the search path as it is and only registers
``kbit.help_groups``, which ``conf/hydra/help/kbit.yaml`` calls. Registering here rather than
in ``kbit-run``'s entry point makes the help work in every process that composes
``conf/config.yaml``, with nothing done at import time.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class KbitHelpResolver(SearchPathPlugin):
    """Registers ``kbit.help_groups`` (idempotent); the search path is not changed."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from harness.cli_help import register_resolver

        register_resolver()


__all__ = ["KbitHelpResolver"]
