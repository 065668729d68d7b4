"""The package's shape: every sub-package ships in the wheel, and no module imports in a circle."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "epolld"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The epolld modules that path imports anywhere (TYPE_CHECKING and function bodies too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from epolld.workers import handoff` names a module, not an attribute.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def test_every_sub_package_is_listed_for_the_wheel() -> None:
    """pyproject.toml names every directory of epolld/ that holds modules (an editable
    install would hide a missing one; the wheel and the Debian package would lack it)."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        _module_name(init)
        for init in PACKAGE.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert listed == on_disk
    for directory in {p.parent for p in PACKAGE.rglob("*.py")}:
        assert (directory / "__init__.py").exists(), f"{directory} has modules but no __init__.py"


def test_the_wheel_carries_every_module(tmp_path: Path) -> None:
    """A wheel built from the tree (as pip and the Debian build do) holds every module."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("epolld-*.whl")
    in_wheel = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    in_tree = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert in_tree <= in_wheel, sorted(in_tree - in_wheel)


def test_no_module_imports_in_a_circle() -> None:
    """The import graph of epolld (TYPE_CHECKING imports included) has no cycle."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    modules = set(files)
    graph = {name: _imports(path, modules) - {name} for name, path in files.items()}
    # A package's __init__ is imported on the way to its modules: not an edge of the design.
    graph = {
        name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()
    }
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycles.append([*path[path.index(name) :], name])
            return
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)
