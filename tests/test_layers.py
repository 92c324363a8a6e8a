"""The layering of wan_lite, read from the source with `ast` (imports inside functions included):
no module imports from a layer above its own, and no two modules import each other, directly or
round a longer loop. The layers, lowest first, are in `LAYERS` (docs/architecture.md describes
each module).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wan_lite"

# Lowest first. A name is a module ("engine") or a package ("models/": every module in it).
# "__init__" is the package's own __init__.py (it offers load_pipeline, so it sits on top).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "units", "api", "registry", "sizing", "job", "sampling", "output", "paths", "version"),
    ("models/",),
    ("loading/",),
    ("runtime/",),
    ("pipeline",),
    ("parallel/",),
    ("engine", "engine_plan", "library"),
    ("cli", "cli_run", "cli_batch", "__main__", "ui/", "__init__"),
)

# Upward imports that are allowed for now: none. Nothing may be added here.
KNOWN_UPWARD: set[tuple[str, str]] = set()


# ------------------------------------------------------------------------------------------ reading


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """wan_lite/runtime/quant.py -> "wan_lite.runtime.quant"; a package's __init__.py -> the package."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str], root: Path = PACKAGE) -> set[str]:
    """The modules of the package that `path` imports, anywhere in the file. `from pkg import x`
    counts as importing the module pkg.x where that is a module, else pkg itself."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {name for name in found if name in known and name != me}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, for every .py file under `root`."""
    paths = sorted(root.rglob("*.py"))
    known = {module_name(p, root) for p in paths}
    return {module_name(p, root): imports(p, known, root) for p in paths}


# ------------------------------------------------------------------------------------------ checking


def layer_of(module: str, layers: Iterable[Iterable[str]] = LAYERS, package: str = "wan_lite") -> int:
    """The index in `layers` of a module of `package` (KeyError: a module no layer names)."""
    rel = module.removeprefix(package).lstrip(".")
    for index, names in enumerate(layers):
        for name in names:
            if name.endswith("/") and (rel == name[:-1] or rel.startswith(name[:-1] + ".")):
                return index
            if rel == name or (name == "__init__" and rel == ""):
                return index
    raise KeyError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def upward_imports(graph: Mapping[str, Iterable[str]], layers: Iterable[Iterable[str]] = LAYERS,
                   package: str = "wan_lite") -> set[tuple[str, str]]:
    """(importer, imported) pairs where the imported module sits in a higher layer."""
    layers = tuple(tuple(names) for names in layers)
    return {(a, b) for a, targets in graph.items() for b in targets
            if layer_of(b, layers, package) > layer_of(a, layers, package)}


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The import loops of `graph`: each strongly connected component of more than one module (or a
    module importing itself), as a sorted list (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph.get(node, ()):
                        found.append(sorted(component))
    return sorted(found)


# ------------------------------------------------------------------------------------------ tests


def test_no_module_imports_from_a_layer_above_its_own():
    upward = upward_imports(import_graph())
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, "upward imports (importer -> imported, see LAYERS): " + ", ".join(f"{a} -> {b}" for a, b in new)
    gone = sorted(KNOWN_UPWARD - upward)
    assert not gone, "no longer imported, remove from KNOWN_UPWARD: " + ", ".join(f"{a} -> {b}" for a, b in gone)


def test_no_import_cycles():
    loops = cycles(import_graph())
    assert not loops, "import cycles: " + "; ".join(" <-> ".join(loop) for loop in loops)


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_the_checker_on_a_synthetic_package(tmp_path):
    """The reader and both checks on a small package written here: one upward import inside a
    function, one relative import, a loop of three, and a `from pkg import submodule`."""
    pkg = tmp_path / "toy"
    (pkg / "low").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "base.py": "import os\n",
        "top.py": "from toy.low import deep\nfrom toy import base\n",
        "low/__init__.py": "",
        "low/deep.py": "from . import base_user\n\ndef f():\n    from toy.top import g  # upward\n",
        "low/base_user.py": "from toy.base import x\nimport toy.low.deep\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text, encoding="utf-8")
    graph = import_graph(pkg)
    assert graph == {"toy": set(), "toy.base": set(), "toy.top": {"toy.low.deep", "toy.base"},
                     "toy.low": set(), "toy.low.deep": {"toy.low.base_user", "toy.top"},
                     "toy.low.base_user": {"toy.base", "toy.low.deep"}}
    layers = (("base",), ("low/",), ("top", "__init__"))
    assert upward_imports(graph, layers, "toy") == {("toy.low.deep", "toy.top")}
    assert cycles(graph) == [["toy.low.base_user", "toy.low.deep", "toy.top"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"d"}}) == [["d"]]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [["a", "b"], ["c", "d"]]
