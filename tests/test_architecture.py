"""The layout's rules, checked on the source: arrows only point down, one job per module.

prune/ (the library) never imports pipelines/ or Ray; the wiring in pipelines/ never imports the
face (pipelines/cli); no stage imports another stage; no import circles; no module over ~400
lines; nothing edits sys.path; every module imports.
"""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

from .conftest import REPO

ROOT = pathlib.Path(REPO)
MAX_LINES = 400


def modules(package: str) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of a top-level package."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.name == "__main__.py":  # runs the command when imported
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _walk(node):
    """ast.walk, minus `if TYPE_CHECKING:` blocks (imports for annotations only never run)."""
    for child in ast.iter_child_nodes(node):
        test = getattr(child, "test", None)
        if isinstance(child, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"):
            continue
        yield child
        yield from _walk(child)


def imported(name: str, path: pathlib.Path, top_level_only: bool = False) -> set[str]:
    """The modules a file imports (relative imports resolved), at module level or anywhere."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(_walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


ALL = modules("prune") | modules("pipelines")


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_the_library_never_imports_the_wiring_or_ray():
    for name, path in modules("prune").items():
        bad = {m for m in imported(name, path) if m.split(".")[0] in ("pipelines", "ray")}
        assert not bad, f"{name} imports {bad}"


def test_the_wiring_never_imports_the_face():
    for name, path in modules("pipelines").items():
        if name.startswith("pipelines.cli"):
            continue
        bad = {m for m in imported(name, path) if m.startswith("pipelines.cli")}
        assert not bad, f"{name} imports the face: {bad}"


def test_no_stage_imports_another_stage():
    stages = {n: p for n, p in modules("pipelines").items() if n.startswith("pipelines.stages.")}
    for name, path in stages.items():
        others = {m for m in imported(name, path) if any(m == s or m.startswith(s + ".") for s in stages if s != name)}
        others |= {m for m in imported(name, path) if m == "pipelines.stages"}  # the package: every stage
        assert not others, f"{name} imports {others}"


def test_no_import_circles():
    """No module reaches itself through imports, lazy ones (inside functions) included."""
    graph = {n: {m for m in imported(n, p) if m in ALL and m != n} for n, p in ALL.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def connect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    assert not circles, circles


def test_no_module_over_the_size_limit():
    big = {n: len(p.read_text().splitlines()) for n, p in ALL.items() if len(p.read_text().splitlines()) > MAX_LINES}
    assert not big, big


def _is_sys_path(node) -> bool:
    """`sys.path`, or `sys.path[...]`."""
    node = node.value if isinstance(node, ast.Subscript) else node
    return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id == "sys")


def _edits_sys_path(node) -> bool:
    """sys.path.insert/append/extend(...), sys.path[...] = / += ..., `from sys import path`, site.addsitedir."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        f = node.func
        if _is_sys_path(f.value) or (f.attr == "addsitedir" and getattr(f.value, "id", None) == "site"):
            return True
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(_is_sys_path(t) for t in targets)
    return isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names)


def test_the_sys_path_check_sees_every_form():
    for code in ("import sys\nsys.path.insert(0, 'x')", "import sys\nsys.path[:0] = ['x']", "import sys\nsys.path += ['x']",
                 "from sys import path", "import site\nsite.addsitedir('x')"):
        assert any(_edits_sys_path(n) for n in ast.walk(ast.parse(code))), code
    assert not any(_edits_sys_path(n) for n in ast.walk(ast.parse("import sys\nprint(sys.path)")))


def test_nothing_edits_sys_path():
    for folder in ("benchmarks", "cluster", "tests", "prune", "pipelines", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not any(_edits_sys_path(n) for n in ast.walk(ast.parse(path.read_text()))), path
