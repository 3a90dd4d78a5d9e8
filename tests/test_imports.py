"""The package's import graph: no cycle, and the engine never imports its plugins.

Every module of the installed package (``trimkit`` and the folders installed under it:
``adapters/`` as ``trimkit.adapters``, ``recipes/`` as ``trimkit.recipes``, ...) is read
with `ast`; nothing is imported. Every import counts: at module level, inside functions and
classes, and under ``if TYPE_CHECKING:``, because an import moved into a function or behind
a type-checking guard is how a cycle hides. Only the body of ``if __name__ == "__main__":``
is left out (it runs when the file is a script, not when it is imported).
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "trimkit"
#: installed under trimkit, but not the engine: they import the engine, never the reverse
PLUGINS = ("trimkit.adapters", "trimkit.recipes", "trimkit.benchmarks")
#: the one function of the engine that imports the plugins: the registry's loader, which
#: runs at the first lookup (after the engine is imported) so that the built-in adapters,
#: recipes and commands register themselves, as third-party ones do through entry points
LOADER = ("trimkit.registry", "_load_builtins")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    function: str | None  # the enclosing function, None at module level


def _packages() -> dict[str, Path]:
    """Every package the distribution installs, with the folder it is installed from."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools.get("package-dir", {})
    found: dict[str, Path] = {}
    for name in sorted(setuptools["packages"], key=lambda n: n.count(".")):
        parent, _, last = name.rpartition(".")
        if name in mapped or parent not in found:
            spec = importlib.util.find_spec(name)  # imports the parent package only
            assert spec is not None and spec.submodule_search_locations, name
            found[name] = Path(next(iter(spec.submodule_search_locations)))
        else:
            found[name] = found[parent] / last
    return found


def _modules() -> dict[str, tuple[Path, bool]]:
    """``module name -> (file, is a package)`` for every module installed."""
    modules = {}
    for package, folder in _packages().items():
        for path in sorted(folder.glob("*.py")):
            if path.stem == "__init__":
                modules[package] = (path, True)
            else:
                modules[f"{package}.{path.stem}"] = (path, False)
    return modules


def _is_main_guard(node: ast.stmt) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__"
                    for c in test.comparators))


def _imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, str | None]]:
    """Every import statement in ``tree`` with the function it is in (None at module
    level), ``if __name__ == "__main__":`` bodies left out."""
    found = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_main_guard(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, function))
            inner = child.name if isinstance(child, (ast.FunctionDef,
                                                     ast.AsyncFunctionDef)) else function
            visit(child, inner)

    visit(tree, None)
    return found


def _edges(modules: dict[str, tuple[Path, bool]]) -> list[Edge]:
    edges = []
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, function in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    origin = f"{base}.{node.module}" if node.module else base
                else:
                    origin = node.module or ""
                for alias in node.names:
                    # ``from pkg import sub`` imports the submodule; ``from pkg import name``
                    # the package itself
                    sub = f"{origin}.{alias.name}"
                    targets.append(sub if sub in modules else origin)
            for target in targets:
                if target in modules:
                    edges.append(Edge(name, target, node.lineno, function))
    return edges


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _is_loader(edge: Edge) -> bool:
    return (edge.source, edge.function) == LOADER and _in(edge.target, PLUGINS)


def _cycles(edges: list[Edge]) -> list[tuple[set[str], list[Edge]]]:
    """Each strongly connected component that has a cycle (Tarjan), with a shortest cycle
    through its first module."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)
        graph.setdefault(e.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        start = min(component)
        # breadth-first from start back to start, inside the component: a shortest cycle
        paths: dict[str, list[Edge]] = {start: []}
        queue = [start]
        cycle = None
        while queue and cycle is None:
            v = queue.pop(0)
            for w, e in sorted(graph[v].items()):
                if w == start:
                    cycle = [*paths[v], e]
                    break
                if w in component and w not in paths:
                    paths[w] = [*paths[v], e]
                    queue.append(w)
        assert cycle is not None
        cycles.append((component, cycle))
    return cycles


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _describe(component: set[str], cycle: list[Edge],
              modules: dict[str, tuple[Path, bool]]) -> str:
    lines = [" -> ".join([cycle[0].source, *(e.target for e in cycle)])
             + f"  (one of the cycles among {', '.join(sorted(component))})"]
    for e in cycle:
        where = f"in {e.function}()" if e.function else "at module level"
        lines.append(f"    {_where(modules[e.source][0])}:{e.line} imports {e.target} {where}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, tuple[Path, bool]], list[Edge]]:
    modules = _modules()
    return modules, _edges(modules)


def test_every_installed_module_is_read(graph) -> None:
    modules, edges = graph
    for name in ("trimkit", "trimkit.api", "trimkit.testing.cases", "trimkit.adapters",
                 "trimkit.adapters.hf.adapter", "trimkit.adapters.meter.model",
                 "trimkit.recipes.tome", "trimkit.benchmarks.demo"):
        assert name in modules, f"{name} not found among {sorted(modules)}"
    # relative, absolute and function-level imports all resolve
    assert any(e.source == "trimkit.tools.viz" and e.target == "trimkit.api" for e in edges)
    assert any(e.source == "trimkit.adapters.hf.blip" and e.target == "trimkit.adapters.layouts"
               for e in edges)
    assert any(_is_loader(e) for e in edges), "the registry's loader imports no plugin"


def test_no_import_cycle(graph) -> None:
    """The registry's loader is the one edge left out: it imports the plugins when a name is
    first looked up, not when the engine is imported, and
    `test_the_engine_imports_no_plugin` checks that it is the only way in."""
    modules, edges = graph
    cycles = _cycles([e for e in edges if not _is_loader(e)])
    assert not cycles, "import cycles in the package:\n" + "\n".join(
        _describe(component, cycle, modules) for component, cycle in cycles)


def test_the_engine_imports_no_plugin(graph) -> None:
    """The engine (``trimkit`` less `PLUGINS`) imports no adapter, recipe or benchmark, at
    any level, except in the registry's loader; adapters and recipes register themselves."""
    modules, edges = graph
    wrong = [e for e in edges
             if not _in(e.source, PLUGINS) and _in(e.target, PLUGINS) and not _is_loader(e)]
    assert not wrong, "the engine imports its plugins:\n" + "\n".join(
        f"    {_where(modules[e.source][0])}:{e.line} imports {e.target} "
        f"{'in ' + e.function + '()' if e.function else 'at module level'}" for e in wrong)


def test_the_core_imports_no_tool(graph) -> None:
    """The core (``trimkit`` less its tools, the testing kit and the plugins) imports nothing
    of `trimkit.tools`, at any level: tools are built on the core. Only the package's
    ``__init__`` re-exports them."""
    modules, edges = graph
    tools, kit = ("trimkit.tools",), ("trimkit.testing",)
    wrong = [e for e in edges
             if e.source != "trimkit" and not _in(e.source, (*tools, *kit, *PLUGINS))
             and _in(e.target, tools)]
    assert not wrong, "the core imports a tool:\n" + "\n".join(
        f"    {_where(modules[e.source][0])}:{e.line} imports {e.target}" for e in wrong)
    assert any(e.source == "trimkit" and _in(e.target, tools) for e in edges)
