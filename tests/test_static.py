"""The code passes the project's static checks: ruff (lint and format) and strict mypy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def test_ruff_lint_and_format() -> None:
    """ruff finds nothing to report and nothing to reformat in epolld/, tests/ and bench/."""
    lint = run(str(BIN / "ruff"), "check", "epolld", "tests", "bench")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run(str(BIN / "ruff"), "format", "--check", "epolld", "tests", "bench")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_strict() -> None:
    """mypy --strict (pyproject.toml) accepts the whole package."""
    result = run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The epolld modules path imports, wherever the import is (TYPE_CHECKING too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module in modules:
            for alias in node.names:  # `from epolld.workers import handoff` is a module
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
    return found


def test_no_import_cycle() -> None:
    """No module of epolld imports, even only for type checking, one that imports it back."""
    paths = {}
    for path in (ROOT / "epolld").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = [*trail[trail.index(name) :], name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name not in done:
            for imported in sorted(graph[name]):
                if not imported.startswith("epolld.") or imported == "epolld":
                    continue  # the package itself (__version__) is every module's parent
                visit(imported, [*trail, name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])
