"""The package's shape, read from its source with `ast`: layers import only downwards, no module
imports itself back through others, and no function is longer than a page.

Layers, lowest first (docs/design.md, "Map of the package"): errors and config; data/; model/;
evaluation/; text/; run/; the commands on top (cli, demo, inspect_data, the package itself). A
module may import its own layer or any lower one, never a higher one. Imports inside functions
count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "domainlm"

LAYERS = {
    "domainlm.errors": 0,
    "domainlm.config": 0,
    "domainlm.data": 1,
    "domainlm.model": 2,
    "domainlm.evaluation": 3,
    "domainlm.text": 4,
    "domainlm.run": 5,
}
TOP = 6  # cli, demo, inspect_data, __init__, __main__
MAX_FUNCTION_LINES = 80  # a function reads on one screen, its docstring included


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    """The layer of a module: that of its longest listed prefix, else the top."""
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    return TOP


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules a file imports, anywhere in it (`from domainlm import x` names x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, modules) - {name} for name, path in files.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
        for src, targets in graph.items()
        for dst in targets
        if layer(dst) > layer(src)
    )


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_layers_import_only_downwards() -> None:
    graph = import_graph()
    assert "domainlm.run.train" in graph and "domainlm.data.corpus" in graph  # the walk saw them
    assert layer_violations(graph) == []


def test_no_module_imports_itself_back() -> None:
    assert import_cycles(import_graph()) == []


def test_a_planted_upward_import_and_a_planted_circle_are_caught(tmp_path: Path) -> None:
    """The checks above can fail: a data module importing the run, and two modules in a circle."""
    pkg = tmp_path / "domainlm"
    for sub in ("data", "run"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    import domainlm.run.b\n")
    (pkg / "run" / "b.py").write_text("from domainlm.data.a import f\n")
    graph = import_graph(pkg)
    assert layer_violations(graph) == ["domainlm.data.a (layer 1) imports domainlm.run.b (layer 5)"]
    assert import_cycles(graph) == [["domainlm.data.a", "domainlm.run.b"]]


def long_functions(root: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'module.function (N lines)' for every function or method over `limit` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{module_name(path, root)}.{node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_a_page() -> None:
    assert long_functions() == []


def test_a_planted_long_function_is_caught(tmp_path: Path) -> None:
    pkg = tmp_path / "domainlm"
    pkg.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))  # 1 + 80 lines
    (pkg / "long.py").write_text(f"class A:\n    def f(self):\n{body.replace('    ', '        ')}")
    (pkg / "short.py").write_text(f"def g():\n{''.join(body.splitlines(True)[:-1])}")
    assert long_functions(pkg) == ["domainlm.long.f (81 lines)"]
