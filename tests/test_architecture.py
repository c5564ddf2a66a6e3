"""The dependency rules of ARCHITECTURE.md, checked from the source with ``ast``.

- ``faiss_index`` imports nothing from ``nil``, ``cli`` or ``benchmarks``; ``nil`` nothing from ``cli``
  or ``benchmarks``; nothing outside ``cli`` imports ``cli``;
- no import circle among the project's modules (imports inside functions included).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("faiss_index", "nil", "cli", "benchmarks")
# what each package may import from the others (the layers, bottom up)
ALLOWED = {"faiss_index": set(), "nil": {"faiss_index"}, "benchmarks": {"faiss_index", "nil"},
           "cli": {"faiss_index", "nil", "benchmarks"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports (the longest known prefix of each imported name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]  # a name, or a module of the package
        for t in targets:
            parts = t.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in known:
                    if candidate != name:
                        found.add(candidate)
                    break
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_no_upward_import():
    wrong = [f"{a} imports {b}" for a, deps in graph().items() for b in deps
             if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]]]
    assert not wrong, wrong


def find_circles(g: dict[str, set[str]]) -> list[str]:
    """Every import circle a depth-first walk meets, as "a -> b -> a"."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    return circles


def test_no_import_circle():
    g = graph()
    # a package's __init__ importing its own modules (re-exports), and a module importing the
    # package it lives in, are not circles of the design: Python runs the __init__ first
    g = {a: {b for b in deps if b != a.rpartition(".")[0] and a != b.rpartition(".")[0]} for a, deps in g.items()}
    assert not find_circles(g)


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import nil.b\n")
    b.write_text("def f():\n    from cli.main import main\n    from . import a\n")
    assert imports_of("nil.a", a, {"nil.a", "nil.b"}) == {"nil.b"}
    assert imports_of("nil.b", b, {"nil.a", "nil.b", "cli.main", "nil"}) == {"cli.main", "nil.a"}
    assert find_circles({"nil.a": {"nil.b"}, "nil.b": {"nil.a"}}) == ["nil.a -> nil.b -> nil.a"]
    assert find_circles({"nil.a": {"nil.b"}, "nil.b": set()}) == []
