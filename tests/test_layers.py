"""The import structure docs/architecture.md states: no two modules import each other (directly or around a
circle), and imports only go down the layer list. Read from the source (every import statement, including the
ones inside functions), so a lazy import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import diffusion_fast

ROOT = Path(diffusion_fast.__file__).resolve().parent
PKG = "diffusion_fast"

# docs/architecture.md, "Layers", top to bottom. The package root itself is a lazy facade over all of them.
LAYERS = [
    ("cli", "__main__", "batch"),
    ("explain",),
    ("bench", "verify"),
    ("pipeline", "integrations", "judge"),
    ("samplers", "models"),
    ("schedules",),
    ("kernels",),
    ("ops",),
    ("_io",),
]


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join((PKG,) + (parts[:-1] if parts[-1] == "__init__" else parts))
        out[name] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # "from pkg import submodule" imports the submodule; other names come from pkg
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
    return {m for m in found if m in modules and m != name and m != PKG}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items() if name != PKG}


def _layer(module: str) -> int | None:
    top = module.split(".")[1]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    return None


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"modules importing each other: {circles}"


def test_imports_only_go_down_the_layers():
    wrong = []
    for module, deps in _graph().items():
        mine = _layer(module)
        if mine is None:
            continue
        for d in deps:
            theirs = _layer(d)
            if theirs is not None and theirs < mine:
                wrong.append(f"{module} imports {d}")
    assert not wrong, "imports going up the layer list of docs/architecture.md: " + "; ".join(sorted(wrong))


def test_io_is_a_leaf():
    assert not _graph()[f"{PKG}._io"]
