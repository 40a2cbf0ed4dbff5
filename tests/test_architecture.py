"""The layer rules of DESIGN.md §2, checked on the source: dependencies point inward."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "fusillade"

# package -> fusillade modules it may import (prefix match)
ALLOWED = {
    "domain": ("fusillade.domain", "fusillade.errors"),
    "storage": ("fusillade.domain", "fusillade.errors", "fusillade.clock", "fusillade.storage"),
    "upstream": ("fusillade.upstream", "fusillade.domain", "fusillade.errors", "fusillade.clock"),
    "daemon": (
        "fusillade.daemon",
        "fusillade.domain",
        "fusillade.errors",
        "fusillade.clock",
        "fusillade.metrics",
        "fusillade.storage.base",
        "fusillade.upstream",
    ),
    "mock_upstream": ("fusillade.mock_upstream",),
    "service": (
        "fusillade.service",
        "fusillade.domain",
        "fusillade.errors",
        "fusillade.clock",
        "fusillade.storage.base",
    ),
    "api": (
        "fusillade.api",
        "fusillade.service",
        "fusillade.domain",
        "fusillade.errors",
        "fusillade.keys",
        "fusillade.storage.base",
        "fusillade.__version__",
    ),
    "config": (
        "fusillade.config",
        "fusillade.domain",
        "fusillade.errors",
        "fusillade.daemon.settings",
        "fusillade.upstream.routes",
        "fusillade.storage.factory",
    ),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            # `from a.b import c` is checked as `a.b.c`: c may be a module or a name of a.b.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.split(".")[0] == "fusillade"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_inner_layers(package: str) -> None:
    offenders = []
    root = SOURCE / package
    for path in sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]:
        for name in sorted(_imports(path)):
            if name != "fusillade" and not name.startswith(ALLOWED[package]):
                offenders.append(f"{path.relative_to(SOURCE)} imports {name}")
    assert offenders == []


def test_backends_are_imported_only_by_composition_code() -> None:
    composition = {SOURCE / "storage" / "factory.py", SOURCE / "app.py"}
    offenders = []
    for path in sorted(SOURCE.rglob("*.py")):
        if path in composition or path.is_relative_to(SOURCE / "storage" / "sqlite"):
            continue
        if path.is_relative_to(SOURCE / "storage" / "postgres"):
            continue
        for name in _imports(path):
            if name.startswith(("fusillade.storage.sqlite", "fusillade.storage.postgres")):
                offenders.append(f"{path.relative_to(SOURCE)} imports {name}")
    assert offenders == []


def test_domain_does_no_io() -> None:
    forbidden = {"asyncio", "sqlite3", "asyncpg", "aiohttp", "socket", "os", "subprocess", "threading"}
    offenders = []
    for path in sorted((SOURCE / "domain").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module.split(".")[0]]
            offenders.extend(f"{path.name} imports {m}" for m in modules if m in forbidden)
    assert offenders == []
