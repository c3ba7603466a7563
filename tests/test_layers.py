"""The module graph of harness/ and analysis/ has no cycle and runs one way, read with ``ast``.

The layers, lowest first, are :data:`LAYERS` (docs/architecture.md draws the same list): a
module may import its own layer and the layers below, never one above. analysis/ reads
results, so from harness it imports only the bottom layer (the record schema, the store
helpers, files and names). The graph counts every import, nested (function-level) and
``TYPE_CHECKING`` ones included; importing ``a.b.c`` also imports the packages ``a.b`` and
``a`` (whose ``__init__`` runs); a name a package re-exports lazily (a PEP 562 ``__getattr__``
with a name -> module map) is an import of the module the map names, by whoever imports the
name; and ``importlib.import_module("harness...")`` with a constant name is an import. A
registry's list of its built-in entry modules (``BUILTIN_METHOD_MODULES``) is not: the
entries import the registry, the registry only loads them when asked, as it loads a plugin's.

Also: harness.kernels (C, torch.compile, eager torch) imports only torch, numpy and the
standard library; no module imports a private (underscore) name or module of another harness
module; and no module is longer than :data:`MAX_LINES` lines unless its docstring has a line
starting with :data:`LONG_MODULE_MARKER` saying why it is one module.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "harness"
ANALYSIS = ROOT / "analysis"

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


# --- the module graph ---------------------------------------------------------------------

# The layers, lowest first: (name, package prefixes or module names). A module belongs to the
# layer with the longest entry that is the module or one of its packages ("harness" itself
# matches only the package __init__).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "bottom: the record schema, the store and small helpers",
        (
            "harness",
            "harness.files",
            "harness.names",
            "harness.numerics",
            "harness.records",
            "harness.store_index",
            "harness.store_cli",
            "harness.provenance",
            "harness.progress",
            "harness.error_lines",
            "harness.plugins",
            "harness.reexport",
        ),
    ),
    ("kernels", ("harness.kernels",)),
    ("data types and their bits per weight", ("harness.dtypes", "harness.bits")),
    ("zoo family files: configs, corpus, paths, zoo: specs", ("harness.zoo",)),
    ("models: files, loading, placement", ("harness.models",)),
    ("quantize: the quantizer and the methods", ("harness.quantize",)),
    ("evaluate: datasets, perplexity, zero-shot tasks", ("harness.evaluate",)),
    ("config: the cell schema, identity, overrides, refusals", ("harness.config",)),
    (
        "zoo builder: kbit-zoo",
        (
            "harness.zoo.build",
            "harness.zoo.train",
            "harness.zoo.tokenizer",
            "harness.zoo.card",
            "harness.zoo.evalsets",
            "harness.zoo.request",
            "harness.zoo.cli",
        ),
    ),
    ("run: one cell", ("harness.run",)),
    ("sweep and cluster: many cells, launchers", ("harness.sweep", "harness.cluster")),
    ("analysis: results into tables, fits, claims, figures", ("analysis",)),
    ("entry points", ("harness.api", "harness.demo", "harness.cli_help")),
]
ROOTS = ("harness",)  # the package itself, not everything under it
BOTTOM = 0

# (importing module, imported module) -> why the upward edge is tolerated: none.
KNOWN_LAYER_EXCEPTIONS: dict[tuple[str, str], str] = {}

MAX_LINES = 450
LONG_MODULE_MARKER = "Why one module:"


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in _sources(HARNESS) + _sources(ANALYSIS)}


def _lazy_map(tree: ast.Module, modules: dict[str, Path]) -> dict[str, str]:
    """name -> module of a package's PEP 562 re-exports ({} without a ``__getattr__``).

    Read from a ``{name: "module"}`` dict (a value may be a module-level constant holding the
    module's name), or from one module-level ``"module"`` string that holds every name of a
    literal ``__all__`` not in such a dict (harness.run's ``_HOME``)."""
    body = tree.body
    hooks = {n.name for n in body if isinstance(n, ast.FunctionDef)}  # def __getattr__(name)
    for node in body:  # __getattr__, __dir__ = harness.reexport.lazy_names(__name__, _HOMES)
        if isinstance(node, ast.Assign):
            hooks.update(e.id for t in node.targets for e in ast.walk(t) if isinstance(e, ast.Name))
    if "__getattr__" not in hooks:
        return {}
    strings: dict[str, str] = {}  # module-level NAME = "harness.x" constants
    dicts: list[ast.Dict] = []
    names: list[str] = []
    for node in body:
        if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        ids = [t.id for t in targets if isinstance(t, ast.Name)]
        value = node.value
        if isinstance(value, ast.Constant) and value.value in modules:
            strings.update(dict.fromkeys(ids, value.value))
        elif isinstance(value, ast.Dict):
            dicts.append(value)
        elif isinstance(value, ast.List | ast.Tuple) and "__all__" in ids:
            names = [e.value for e in value.elts if isinstance(e, ast.Constant)]
    found: dict[str, str] = {}
    for value in dicts:
        for key, item in zip(value.keys, value.values, strict=True):
            module = item.value if isinstance(item, ast.Constant) else None
            module = strings.get(item.id) if isinstance(item, ast.Name) else module
            if isinstance(key, ast.Constant) and module in modules:
                found[key.value] = module
    if len(set(strings.values())) == 1:
        home = next(iter(strings.values()))
        found.update({name: home for name in names if name not in found})
    return found


def _graph() -> dict[str, set[str]]:
    """module -> the harness/analysis modules it imports (see the module docstring)."""
    modules = _all_modules()
    trees = {m: ast.parse(p.read_text(), filename=str(p)) for m, p in modules.items()}
    lazy = {m: _lazy_map(t, modules) for m, t in trees.items() if modules[m].name == "__init__.py"}
    edges: dict[str, set[str]] = {m: set() for m in modules}

    def add(importer: str, target: str, name: str | None = None) -> None:
        full = f"{target}.{name}" if name else target
        if full in modules:  # a submodule: ``from harness.zoo import config``
            target, name = full, None
        while target and target not in modules:  # ``import torch.nn``-like prefixes
            target = target.rpartition(".")[0]
        if not target:
            return
        if lazy.get(target):  # the module a lazily re-exported name lives in
            edges[importer].update(
                [lazy[target][name]] if name in lazy[target] else
                [] if name is not None else lazy[target].values()
            )  # fmt: skip
        while target:  # the module and every package above it (their __init__ runs)
            if target != importer and not importer.startswith(target + "."):
                edges[importer].add(target)
            target = target.rpartition(".")[0]

    for module, tree in trees.items():
        path = modules[module]
        for module_name, name in _imports(path):
            add(module, module_name, name)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                add(module, node.args[0].value)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10_000))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(old)
    return found


def _layer(module: str) -> int:
    best, rank = "", None
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            exact = module == entry
            below = entry not in ROOTS and module.startswith(entry + ".")
            if (exact or below) and len(entry) > len(best):
                best, rank = entry, i
    assert rank is not None, f"{module} is in no layer of LAYERS; add it where it belongs"
    return rank


def _cycle_path(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the component's first module, for the failure message."""
    inside = set(component)
    start = component[0]
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(edges[v] & inside):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                todo.append(w)
    return component


def test_the_graph_reads_every_kind_of_import():
    """Lazy re-exports, parent packages, function-level imports and registry strings count."""
    edges = _graph()
    # models.files resolves zoo: specs with ``from harness.zoo import resolve_model``
    # (function-level): the package and the module its lazy map names.
    assert {"harness.zoo", "harness.zoo.resolve"} <= edges["harness.models.files"]
    assert "harness.zoo.build" not in edges["harness.models.files"]
    # a submodule imports its parent packages, except its own
    assert "harness.models" in edges["harness.zoo.build"]
    assert "harness.zoo" not in edges["harness.zoo.build"]
    # a package's lazy map, from a {name: module} dict or one home module for all of __all__
    modules = _all_modules()
    zoo = _lazy_map(ast.parse((HARNESS / "zoo" / "__init__.py").read_text()), modules)
    assert (
        zoo["build_family"] == "harness.zoo.build" and zoo["resolve_model"] == "harness.zoo.resolve"
    )
    models = _lazy_map(ast.parse((HARNESS / "models" / "__init__.py").read_text()), modules)
    assert models["load_model"] == "harness.models.loading"


def test_cycles_are_found():
    """The cycle finder on a made-up graph: a -> b -> c -> a is one cycle, d is not in it."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycle_path(edges, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_a_module_is_in_the_layer_of_its_longest_entry():
    """The zoo straddles the models: its family files below, its builder above."""
    assert _layer("harness.zoo.resolve") < _layer("harness.models.files")
    assert _layer("harness.models.loading") < _layer("harness.zoo.build")
    assert _layer("harness.zoo") == _layer("harness.zoo.config")  # the package __init__
    assert _layer("harness") == BOTTOM < _layer("harness.api")  # "harness" is not a prefix
    with pytest.raises(AssertionError, match="in no layer"):
        _layer("elsewhere.module")


def test_the_module_graph_has_no_cycle():
    edges = _graph()
    cycles = [" -> ".join(_cycle_path(edges, c)) for c in _cycles(edges)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_module_is_in_one_layer():
    for module in _all_modules():
        _layer(module)


def test_no_module_imports_a_higher_layer():
    edges = _graph()
    bad = []
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            if _layer(target) > _layer(module) and (module, target) not in KNOWN_LAYER_EXCEPTIONS:
                bad.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {target} "
                           f"({LAYERS[_layer(target)][0]})")  # fmt: skip
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_analysis_imports_only_the_bottom_of_harness():
    """analysis/ reads stores: the record schema and store helpers, never the runner's code."""
    bad = [
        f"{module} imports {target}"
        for module, targets in sorted(_graph().items())
        if _within(module, "analysis")
        for target in sorted(targets)
        if _within(target, "harness") and _layer(target) != BOTTOM
    ]
    assert not bad, "\n".join(bad)


def test_the_known_layer_exceptions_still_exist():
    """Drop an entry of KNOWN_LAYER_EXCEPTIONS once the upward import is gone."""
    edges = _graph()
    for (module, target), reason in KNOWN_LAYER_EXCEPTIONS.items():
        assert target in edges.get(module, ()), (module, target, reason)
        assert reason.strip(), (module, target)


def test_the_layer_list_is_the_one_in_the_architecture_page():
    """docs/architecture.md's "Layers" section names the same layers in the same order."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    items = [line for line in section.splitlines() if line[:1].isdigit() and ". **" in line]
    named = [line.split("**")[1] for line in items]
    assert named == [name.split(":")[0] for name, _ in LAYERS]


# --- module length -------------------------------------------------------------------------


def _long_without_reason() -> list[str]:
    found = []
    for path in _sources(HARNESS) + _sources(ANALYSIS):
        lines = len(path.read_text().splitlines())
        if lines <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        reasons = [ln for ln in doc.splitlines() if ln.strip().startswith(LONG_MODULE_MARKER)]
        if not any(ln.strip() != LONG_MODULE_MARKER for ln in reasons):
            found.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    return found


def test_no_module_is_long_without_a_reason():
    """A module over MAX_LINES lines says in its docstring why it is one module.

    Write a docstring line starting with LONG_MODULE_MARKER and the reason (what would be
    lost by splitting it), or split the module along the jobs it does."""
    long = _long_without_reason()
    assert not long, f"over {MAX_LINES} lines without a '{LONG_MODULE_MARKER}' line:\n" + (
        "\n".join(long)
    )
