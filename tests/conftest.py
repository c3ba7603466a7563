"""Shared test setup: offline Hugging Face, the shared data root, small deterministic torch."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

# A hub lookup without these hangs ~45 s before failing on machines with no network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
_SHARED = REPO_ROOT.parent / "shared" / "data"
if "KBIT_DATA_ROOT" not in os.environ and _SHARED.is_dir():
    os.environ["KBIT_DATA_ROOT"] = str(_SHARED)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The evaluation data root (shared/data layout); tests needing it are skipped without it."""
    root = os.environ.get("KBIT_DATA_ROOT")
    if not root or not Path(root).is_dir():
        pytest.skip("KBIT_DATA_ROOT not set and ../shared/data not found")
    return Path(root)


@pytest.fixture(scope="session")
def plan_bench():
    """``benchmarks/plan_bench.py`` as a module: its fake hub cache of the paper models'
    config.json files (``build_fake_hub``) is shared by the planning tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "plan_bench", REPO_ROOT / "benchmarks" / "plan_bench.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Undo what a test's in-process ``kbit-run``/CLI did to the root logger.

    Hydra's job logging (and ``logging.basicConfig`` in a CLI) binds a handler to the
    ``sys.stderr`` of the moment, pytest's capture stream; a later test would then log into a
    closed stream and see "--- Logging error ---" on its stderr. pytest's own handlers are
    left alone.
    """
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in before and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(level)
