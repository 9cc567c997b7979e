"""The package layout: no import circle between files or between sub-packages, nothing imports the CLI, and one
module each builds DataLoaders and opens tar archives.

The imports are read from the source with `ast` (every import, those inside functions and under TYPE_CHECKING too),
so the test imports nothing of the package and takes well under a second.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clipkd_dino"
ROOT = PACKAGE.name
CLI = f"{ROOT}.cli"
DATALOADER = "torch.utils.data.DataLoader"
DATALOADER_MODULE = f"{ROOT}.data.loader"
TAR_MODULE = f"{ROOT}.data.tars"


@dataclass
class Module:
    """One .py file of the package: what it imports from the package, and the calls it makes to anything imported
    (their dotted names, imports resolved: `tarfile.open`, `torch.utils.data.DataLoader`)."""

    name: str
    imports: set[str] = field(default_factory=set)
    calls: set[str] = field(default_factory=set)


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_modules(package: Path = PACKAGE) -> dict[str, Module]:
    """Every module of the package, by dotted name, with its imports and calls."""
    paths = {module_name(path, package): path for path in sorted(package.rglob("*.py"))}
    return {name: _read(name, path, set(paths)) for name, path in paths.items()}


def _read(name: str, path: Path, known: set[str]) -> Module:
    module, aliases, calls = Module(name), {}, []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            calls.append(_dotted(node.func))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                module.imports.add(_owner(alias.name, known))
                bound = alias.asname or alias.name.partition(".")[0]  # `import a.b` binds a, `import a.b as c` c
                aliases[bound] = alias.name if alias.asname else bound
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, is_package, node.module, node.level)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                module.imports.add(_owner(target if target in known else base, known))
                aliases[alias.asname or alias.name] = target
    for dotted in filter(None, calls):
        head, _, rest = dotted.partition(".")
        if head in aliases:
            module.calls.add(".".join(filter(None, (aliases[head], rest))))
    module.imports = {target for target in module.imports if target and target != name}
    return module


def _absolute(name: str, is_package: bool, module: str | None, level: int) -> str:
    """The dotted name a `from ... import` reads from, relative imports resolved."""
    if not level:
        return module or ""
    parts = name.split(".")[: len(name.split(".")) - level + is_package]
    return ".".join(parts + ([module] if module else []))


def _owner(dotted: str, known: set[str]) -> str:
    """The package module `dotted` lies in (itself or its longest known prefix); "" outside the package."""
    parts = dotted.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts)


def _dotted(node: ast.expr) -> str:
    """`a.b.c` of a Name / Attribute chain; "" for anything else."""
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else ""
    return node.id if isinstance(node, ast.Name) else ""


def unit(module: str) -> str:
    """The sub-package a module belongs to: `clipkd_dino.X` for everything under clipkd_dino/X/, a top-level
    module being a unit of its own."""
    return ".".join(module.split(".")[:2])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def file_edges(modules: dict[str, Module]) -> dict[str, set[str]]:
    return {name: set(module.imports) for name, module in modules.items()}


def package_edges(modules: dict[str, Module]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for name, module in modules.items():
        edges[unit(name)] |= {unit(target) for target in module.imports} - {unit(name)}
    return dict(edges)


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return read_modules()


@pytest.mark.parametrize("graph", [file_edges, package_edges], ids=["files", "packages"])
def test_no_import_circle(modules, graph):
    assert cycles(graph(modules)) == []


def test_nothing_imports_the_cli(modules):
    assert [name for name, module in modules.items() if CLI in module.imports] == []


def test_one_module_builds_dataloaders(modules):
    assert [name for name, module in modules.items() if DATALOADER in module.calls] == [DATALOADER_MODULE]


def test_one_module_opens_tar_archives(modules):
    assert [name for name, module in modules.items() if "tarfile.open" in module.calls] == [TAR_MODULE]


def test_a_circle_is_found(tmp_path):
    """The checks can fail: a package whose two modules import each other (one inside a function) is a circle."""
    package = tmp_path / ROOT
    (package / "a").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a" / "__init__.py").write_text("")
    (package / "a" / "one.py").write_text("from . import two\n")
    (package / "a" / "two.py").write_text("def f():\n    from clipkd_dino.b import three\n")
    (package / "b.py").write_text("import clipkd_dino.a.one as one\n")
    found = read_modules(package)
    assert cycles(file_edges(found)) == [[f"{ROOT}.a.one", f"{ROOT}.a.two", f"{ROOT}.b"]]
    assert cycles(package_edges(found)) == [[f"{ROOT}.a", f"{ROOT}.b"]]
