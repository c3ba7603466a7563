"""The quantization code's dependencies run one way, read from the source with ``ast``.

harness.kernels (C, torch.compile, eager torch; imports only torch, numpy and the standard
library) <- harness.dtypes (codebooks and the population they are fitted to) <-
harness.quantize (the block-wise quantizer, then the methods). And no module imports a
private (underscore) name or module of another harness module.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "harness"

# (importing file, imported private module) pairs tolerated for now: none.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) of every import in the file, nested ones included,
    relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found += [(base, alias.name) for alias in node.names]
    return found


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_sources_are_found():
    assert len(_sources(HARNESS / "kernels")) >= 3
    assert (HARNESS / "kernels" / "native.c").is_file()
    from harness.kernels import native

    assert native.SOURCE == HARNESS / "kernels" / "native.c"


@pytest.mark.parametrize("path", _sources(HARNESS / "kernels"), ids=lambda p: p.name)
def test_kernels_import_only_torch_numpy_and_the_standard_library(path):
    allowed = {"torch", "numpy", "__future__", *sys.stdlib_module_names}
    for module, _ in _imports(path):
        if _within(module, "harness"):  # harness.files: the one atomic-write helper (stdlib only)
            ok = _within(module, "harness.kernels") or module == "harness.files"
            assert ok, f"{path.name} imports {module}"
        else:
            assert module.split(".")[0] in allowed, f"{path.name} imports {module}"


@pytest.mark.parametrize("path", _sources(HARNESS / "dtypes"), ids=lambda p: p.name)
def test_dtypes_do_not_import_the_quantizer(path):
    for module, _ in _imports(path):
        assert not _within(module, "harness.quantize"), f"{path.name} imports {module}"


def _private_imports(path: Path) -> list[str]:
    """Private harness names/modules ``path`` imports from a module other than its own."""
    own = _module_name(path)
    bad = []
    for module, name in _imports(path):
        if not _within(module, "harness") or module == own:
            continue
        if any(part.startswith("_") for part in module.split(".")):
            bad.append(module)
        elif name is not None and name.startswith("_") and name != "__version__":
            bad.append(f"{module}.{name}")
    return bad


@pytest.mark.parametrize(
    "path", _sources(HARNESS) + _sources(ROOT / "benchmarks"), ids=lambda p: _module_name(p)
)
def test_no_module_imports_another_modules_private_names(path):
    rel = path.relative_to(ROOT).as_posix()
    bad = [m for m in _private_imports(path) if (rel, m) not in KNOWN_PRIVATE_IMPORTS]
    assert not bad, f"{rel} imports private {bad}"


def test_the_known_exceptions_still_exist():
    """Drop an entry of KNOWN_PRIVATE_IMPORTS once its file imports the public name."""
    for rel, module in KNOWN_PRIVATE_IMPORTS:
        path = ROOT / rel
        assert path.is_file() and module in _private_imports(path), (rel, module)


def test_the_file_helper_needs_only_the_standard_library():
    """harness.files sits below the kernels (they install their library through it)."""
    allowed = {"__future__", *sys.stdlib_module_names}
    for module, _ in _imports(HARNESS / "files.py"):
        assert module.split(".")[0] in allowed, f"files.py imports {module}"
