"""No import circles inside ``debias/``.

The graph is read from the source with :mod:`ast` (nothing is imported). Its rule:

- an edge ``A -> B`` for every ``import B`` / ``from B import x`` in module ``A`` that names a ``debias`` module,
  wherever the statement stands: at module level **or inside a function** (a lazy import still runs, only later, and
  a circle through it is a circle all the same). ``from P import x`` where ``P.x`` is a module adds ``A -> P.x`` too;
- importing ``P.x`` from a module outside package ``P`` also runs ``P/__init__.py``: an edge to ``P`` as well. From
  inside ``P`` no such edge is added: a module of ``P`` only runs after ``P/__init__`` has started, so it never
  triggers it;
- a registry imports its entries by name (``importlib.import_module("debias.data.folder")``): a string literal that
  is exactly a ``debias`` module's dotted name is an edge to that module;
- imports under ``if TYPE_CHECKING:`` are left out: they are never executed (type annotations only).

The test fails on any cycle and names its modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "debias"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """``{module: {debias modules it imports}}`` by the rule in the module docstring."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    packages = {name for name, p in files.items() if p.name == "__init__.py"}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        own_package = name if name in packages else name.rpartition(".")[0]
        targets: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets.update(node.value for node in ast.walk(tree)
                       if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in files)
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            if node.level:
                base = own_package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)
        for target in targets:
            if target not in files or target == name:
                continue
            graph[name].add(target)
            parts = target.split(".")
            for i in range(1, len(parts)):  # the packages the import runs on the way (outside the importer's own)
                parent = ".".join(parts[:i])
                if parent in packages and not (name == parent or name.startswith(parent + ".")):
                    graph[name].add(parent)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in components:  # the shortest closed path through the component's first module, for the message
        members, start = set(comp), min(comp)
        parent: dict[str, str] = {}
        frontier, end = [start], None
        while frontier and end is None:
            nxt_frontier = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        end = v
                        break
                    if w not in parent:
                        parent[w] = v
                        nxt_frontier.append(w)
                if end is not None:
                    break
            frontier = nxt_frontier
        path = [end]
        while path[-1] != start:
            path.append(parent[path[-1]])
        cycles.append(path[::-1] + [start])
    return cycles


def test_the_graph_sees_lazy_imports_and_registry_entries():
    graph = import_graph()
    assert "debias.models.clip" in graph["debias.preflight"]  # a function-level import
    assert "debias.data.colored_digits" in graph["debias.data.registry"]
    assert "debias.data" in graph["debias.recipe"]  # importing debias.data.registry runs debias/data/__init__.py


def test_no_import_cycles_in_debias():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in debias/: " + "; ".join(
        " -> ".join(c) + f" (edges among {sorted(set(c))}: "
        + ", ".join(f"{a} -> {b}" for a in sorted(set(c)) for b in sorted(graph[a] & set(c))) + ")"
        for c in cycles)


def test_data_modules_do_not_import_preflight_or_recipe():
    graph = import_graph()
    offenders = {m: sorted(t & {"debias.preflight", "debias.recipe"}) for m, t in graph.items()
                 if m.startswith("debias.data") and t & {"debias.preflight", "debias.recipe"}}
    assert not offenders, offenders
