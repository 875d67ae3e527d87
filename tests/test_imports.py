"""The imports run downhill: no cycle between nmtrain's modules, and no import back up a floor.

Floors, top to bottom: ``api`` (the package ``nmtrain`` itself: the public API), ``cli`` → ``experiments`` →
``data``, ``sparsity`` (the engine knows nothing of
files, specs or commands; the data sets nothing of masks). Every import counts, also one written inside a
function to keep ``--help`` free of torch: a lazy import is still a dependency, and a cycle hidden in one
is still a cycle. A package's ``__init__`` that imports its modules to register them is above them; the
modules import the registry from its own module, never from the package.
"""

import ast
from pathlib import Path

from helpers import ROOT

FLOORS = {"api": 3, "cli": 2, "experiments": 1, "data": 0, "sparsity": 0}


def _modules() -> dict[str, Path]:
    mods = {}
    for top in FLOORS:
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _target(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The module an ``import from`` names, as a dotted name under ``nmtrain`` (None: outside nmtrain)."""
    if node.level == 0:
        name = node.module or ""
        return name[len("nmtrain."):] if name.startswith("nmtrain.") else None
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module → the nmtrain modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    mods = _modules()
    graph = {}
    for module, path in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name[len("nmtrain."):] for a in node.names if a.name.startswith("nmtrain.")} & set(mods)
            elif isinstance(node, ast.ImportFrom):
                target = _target(module, path.name == "__init__.py", node)
                if target is None:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in mods else target)
        graph[module] = edges - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_scanner_sees_a_cycle_and_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    real = import_graph()
    assert "experiments.runner" in real["cli.train"]      # imported inside the command function


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_import_runs_back_up_a_floor():
    upward = [f"{m} imports {t}" for m, targets in import_graph().items() for t in targets
              if FLOORS[t.split(".")[0]] > FLOORS[m.split(".")[0]]]
    assert upward == []


def test_the_engine_and_the_data_do_not_import_each_other():
    graph = import_graph()
    across = [f"{m} imports {t}" for m, targets in graph.items() for t in targets
              if {m.split(".")[0], t.split(".")[0]} == {"data", "sparsity"}]
    assert across == []
