"""The shape of the house, kept: no function in ``src/`` over 80 lines, and no import cycle
between diffmem modules (every import counted, at the top of a file or inside a function, and
a package's ``__init__`` counted as a module: a submodule that imports its own package's face
closes a circle through it)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
LONGEST = 80


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, ast.parse(path.read_text()))
    return found


def long_functions(limit: int = LONGEST) -> list[str]:
    """``path:name (lines)`` of every function or method longer than ``limit`` lines."""
    out = []
    for path, tree in _modules().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1
                if size > limit:
                    out.append(f"{path.relative_to(SRC)}:{node.name} ({size})")
    return out


def import_graph() -> dict[str, set[str]]:
    """Each diffmem module's diffmem imports (resolved to the longest module name)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for me, (path, tree) in mods.items():
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target)
                if found and found != me and found.startswith("diffmem"):
                    graph[me].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_function_in_src_is_longer_than_80_lines():
    assert long_functions() == []


def test_no_import_cycle_between_diffmem_modules():
    assert cycles(import_graph()) == []


def test_the_checks_see_a_long_function_and_a_cycle():
    """The checks themselves: a constructed cycle and a long function are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "diffmem.detect" in graph and "diffmem.confirm" in graph["diffmem.detect"]
    assert any(name.endswith(":detect_samples (10)") is False
               for name in long_functions(limit=10))  # short limit: many found
    assert len(long_functions(limit=10)) > 50
