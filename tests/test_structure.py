"""The package's import graph, read from the source with `ast` (nothing is imported): no import cycles between fa_jax
modules, and imports placed inside functions (the usual way to dodge a cycle) do not creep back.

Edges are the imports as written, at module level and inside functions alike: `import fa_jax.x`, `from fa_jax.x
import name`, `from fa_jax import x` (x a submodule: an edge to fa_jax.x, else to the package fa_jax) and relative
imports. That importing fa_jax.x runs the package's __init__ first is not counted as an edge.
"""
from __future__ import annotations

import ast
import collections
import os

PACKAGE = "fa_jax"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# The most function-level imports of fa_jax modules (statements) the package may hold; there were 144 when the
# package still had its cycles. The one left: fa_jax.compile_report's (fa_jax.aot brings optax and orbax, which
# `import fa_jax` does not need).
MAX_FUNCTION_LEVEL_IMPORTS = 1


def modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the package (a package is its __init__.py)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, PACKAGE)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(filenames):
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(dirpath, f)
    return out


def _targets(node, module: str, is_package: bool, known) -> list[str]:
    """The fa_jax modules an import statement of `module` names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
    if node.level:  # relative: from the module's package, one level up per extra dot
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)] + ([node.module] if node.module else [])
        target = ".".join(base)
    else:
        target = node.module or ""
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
        return []
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]


def imports() -> list[tuple[str, str, int, bool]]:
    """(module, imported fa_jax module, line, inside a function) for every import of an fa_jax module."""
    known = modules()
    found = []
    for module, path in known.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in dict.fromkeys(_targets(child, module, path.endswith("__init__.py"), known)):
                        found.append((module, target, child.lineno, in_function))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(tree, False)
    return found


def graph() -> dict[str, set[str]]:
    """{module: the fa_jax modules it imports} (a module importing itself, as a script re-importing its module
    does, is no cycle and left out)."""
    known = modules()
    edges = {m: set() for m in known}
    for module, target, _, _ in imports():
        if target in known and target != module:
            edges[module].add(target)
    return edges


def strongly_connected(edges) -> list[list[str]]:
    """The groups of modules that import each other, directly or round a loop (Tarjan); single modules left out."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return groups


def shortest_cycle(edges, start: str) -> list[str]:
    """The shortest import chain from `start` back to itself, as [start, ..., start]."""
    parent, queue = {start: None}, collections.deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges[v]):
            if w == start:
                chain = [v]  # v back to start through the parents, then turned round
                while parent[chain[-1]] is not None:
                    chain.append(parent[chain[-1]])
                return chain[::-1] + [start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    return []


def cycles() -> list[list[str]]:
    """A shortest cycle through each module that is on one, each cycle once."""
    edges = graph()
    out = {}
    for group in strongly_connected(edges):
        for module in group:
            chain = shortest_cycle(edges, module)
            turn = chain[:-1].index(min(chain[:-1]))  # the same loop from whichever module it was found
            out.setdefault(tuple(chain[turn:-1] + chain[:turn]), None)
    return [list(c) + [c[0]] for c in out]


def test_no_import_cycles():
    found = cycles()
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_function_level_imports_do_not_creep_back():
    """An import inside a function usually hides a cycle; move it to the top of the module and break the cycle
    instead (lazy imports of heavy third-party packages are not counted here)."""
    inside = sorted({(m, line, t) for m, t, line, in_function in imports() if in_function})
    statements = sorted({(m, line) for m, line, _ in inside})
    listing = "\n".join(f"{m}:{line} imports {t}" for m, line, t in inside)
    assert len(statements) <= MAX_FUNCTION_LEVEL_IMPORTS, (
        f"{len(statements)} import statements of fa_jax modules inside functions (at most "
        f"{MAX_FUNCTION_LEVEL_IMPORTS}):\n{listing}")


def test_the_graph_reader_sees_imports_and_cycles():
    """The reader itself: every kind of import statement gives its edge, and a planted loop is found."""
    assert ("fa_jax", "fa_jax.generate") in {(m, t) for m, t, _, _ in imports()}  # `from fa_jax import generate`
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert strongly_connected(edges) == [["a", "b", "c"]]
    assert shortest_cycle(edges, "b") == ["b", "c", "a", "b"]
