"""The source keeps its shape: an acyclic module import graph that only points down (``vllm2 -> decoders ->
superlink``), and no function longer than :data:`MAX_FUNCTION_LINES`.

The graph is read from the source with :mod:`ast`: every ``import`` and ``from ... import`` of a module, at module
level or inside a function, except those under ``if TYPE_CHECKING:`` (annotations only, never executed). An import of
``a.b.c`` is an edge to ``a.b.c`` and to each package above it (``a.b``, ``a``), since Python runs those
``__init__`` files first; ``from a.b import x`` is an edge to ``a.b.x`` when that is a module. Edges from a module to
the packages that contain it are left out: a package ``__init__`` importing its submodules, whose code then
imports a sibling, is the normal shape of a package and not a cycle between distinct modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("vllm2", "decoders", "superlink")  # each may import only the ones after it
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every module of the three packages."""
    modules = {}
    for package in LAYERS:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, (ast.Name, ast.Attribute)) and (
        getattr(node.test, "id", None) == "TYPE_CHECKING" or getattr(node.test, "attr", None) == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """All import statements of a tree outside ``if TYPE_CHECKING:`` blocks."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """The dotted names an import statement may load, relative imports resolved against ``package``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    return [module] + [f"{module}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (with their parent packages; see the module docstring)."""
    modules = _modules()
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, package):
                while target and target not in modules:  # ``from m import function`` -> m
                    target = target.rpartition(".")[0]
                while target:  # the module and the packages above it
                    if target != name and not name.startswith(target + "."):
                        edges.add(target)
                    target = target.rpartition(".")[0]
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_graph_sees_relative_and_nested_imports():
    graph = import_graph()
    assert "vllm2.device" in graph["vllm2.chat"]  # from .device import to_device
    assert "superlink" in graph["decoders.gdino.model"]
    assert "vllm2.bench" in graph["vllm2.cli.bench"] or "vllm2.bench.runner" in graph["vllm2.cli.bench"]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_imports_point_down():
    rank = {package: i for i, package in enumerate(LAYERS)}
    upward = [f"{source} -> {target}" for source, targets in import_graph().items() for target in sorted(targets)
              if rank[target.split(".")[0]] < rank[source.split(".")[0]]]
    assert upward == []


def test_no_long_functions():
    long = []
    for path, _ in _modules().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
    assert long == []
