"""List the import cycles inside the vllm_normswap package; exit 1 if there is any.

Every import counts, at module level and inside functions (an import hidden in a function to dodge a circle is
still a circle), relative or absolute. Standard library only, nothing is imported: the graph is read with ``ast``.

The package is vllm_normswap/ and the repository-root folders that pyproject.toml maps into it
(``[tool.setuptools.package-dir]``: load_tests/ is ``vllm_normswap.load_tests``).

Two graphs are checked: modules, and the package's rooms (``vllm_normswap.model``, ``.checkpoints``, ``.observe``,
... and each top-level module), so that ``model/`` -> ``checkpoints/`` -> ``model/`` is a cycle even when no single
module closes it.

    python scripts/import_cycles.py            # prints the cycles, one per line
    python scripts/import_cycles.py --edges    # prints the graph too
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "vllm_normswap"


def module_name(path: Path, root: Path = ROOT, package_dirs: dict[str, Path] | None = None) -> str:
    """The dotted name of the module in ``path``: under one of ``package_dirs`` (name -> folder), else by its path
    from ``root``."""
    for name, folder in (package_dirs or {}).items():
        if path.is_relative_to(folder):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            break
    else:
        parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_dirs(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """The package's folders by dotted name: ``package/`` and the folders that pyproject.toml's
    ``[tool.setuptools.package-dir]`` table maps to subpackages of it (read line by line: one ``"name" = "folder"``
    per line, as there)."""
    dirs = {package: root / package}
    pyproject = root / "pyproject.toml"
    table = False
    for line in pyproject.read_text().splitlines() if pyproject.is_file() else ():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            table = line == "[tool.setuptools.package-dir]"
        elif table and "=" in line:
            name, folder = (s.strip().strip('"').strip("'") for s in line.split("=", 1))
            if name.startswith(package + "."):
                dirs[name] = root / folder
    return dirs


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest project module that ``name`` is or lies in (``a.b.c`` -> ``a.b`` if ``c`` is an attribute)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(path: Path, modules: set[str], root: Path = ROOT, me: str | None = None) -> set[str]:
    """The project modules that the file at ``path`` (module ``me``) imports, anywhere in it."""
    me = me or module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            names = [f"{stem}.{a.name}" for a in node.names] + [stem]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target and target != me:
                found.add(target)
    # `from .x import y` in pkg/__init__ also pulls pkg itself; importing a submodule runs its parents' __init__
    return found


def graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    dirs = package_dirs(root, package)
    names = {f: module_name(f, root, dirs) for folder in dirs.values() for f in sorted(folder.rglob("*.py"))}
    modules = set(names.values())
    return {name: imports_of(f, modules, root, name) for f, name in names.items()}


def rooms(edges: dict[str, set[str]], package: str = PACKAGE) -> dict[str, set[str]]:
    """The module graph folded onto the package's direct children (subpackages and top-level modules)."""
    def room(module: str) -> str:
        return ".".join(module.split(".")[:2])

    folded: dict[str, set[str]] = {}
    for module, targets in edges.items():
        if module == package:  # __init__: register() reaches into every room by design, lazily
            continue
        folded.setdefault(room(module), set()).update(room(t) for t in targets if t != package)
    for r, targets in folded.items():
        targets.discard(r)
    return folded


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module, as its members in a cycle order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                found.append(_cycle_path(sorted(component), edges))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _cycle_path(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module, for a readable message."""
    members, start = set(component), component[0]
    previous = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    path = [v]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="print the import graph too")
    args = parser.parse_args(argv)
    edges = graph()
    if args.edges:
        for module in sorted(edges):
            print(f"{module} -> {', '.join(sorted(edges[module])) or '-'}")
    found = all_cycles(edges)
    for cycle in found:
        print("cycle: " + " -> ".join(cycle))
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(found)} cycle(s)")
    return 1 if found else 0


def all_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Cycles between modules, then cycles between rooms."""
    return cycles(edges) + cycles(rooms(edges))


if __name__ == "__main__":
    sys.exit(main())
