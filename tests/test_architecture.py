"""The layer rules of DESIGN.md §2 ("Architecture"), checked on the source: dependencies point inward, and only
the composition root (`fusillade.composition`) wires concrete parts together.

Every module of `src/fusillade` is read with `ast`; its imports (absolute and relative, at the top or inside a
function, under `TYPE_CHECKING` too) are resolved to dotted names, `from a.b import c` counting as `a.b.c` (c may
be a module or a name of a.b). Each top-level module and package has a rule: the fusillade modules it may
import. A module or package without a rule is itself reported, so a new one gets a rule when it is added.
The checker runs on the real tree and on small made-up trees (`test_each_rule_reports_a_violation`) that break
one rule each: a rule that could not fail would be no rule.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "fusillade"

EVERYONE = ("fusillade.__version__",)
"""What any module may import."""
BACKENDS = ("fusillade.storage.sqlite", "fusillade.storage.postgres")
OPENERS = ("fusillade.storage.factory", "fusillade.storage.open_storage", "fusillade.open_storage")
"""The names that open a concrete backend: only the composition root (and the packages that re-export them for
library users) may import them."""


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `name` is one of `prefixes` or below one (`a.b` is within `a`, `a.bc` is not)."""
    return any(name == prefix or name.startswith(f"{prefix}.") for prefix in prefixes)


def _may_open(module: str) -> bool:
    """The composition root, and the packages that re-export `open_storage` for library users."""
    return module in ("fusillade", "fusillade.storage") or _within(module, ("fusillade.composition",))


# top-level module or package -> the fusillade modules it may import (a dotted prefix: itself and what is below)
ALLOWED: dict[str, tuple[str, ...]] = {
    "__init__": (  # `import fusillade`: the public surface, each name imported from its home on first use
        "fusillade.config",
        "fusillade.daemon",
        "fusillade.domain",
        "fusillade.errors",
        "fusillade.service",
        "fusillade.storage",
        "fusillade.upstream.client",
        "fusillade.upstream.routes",
    ),
    "__main__": ("fusillade.cli",),
    "errors": (),
    "clock": ("fusillade.clock", "fusillade.errors"),
    "api_keys": (),
    "runtime": (),
    "domain": ("fusillade.domain", "fusillade.errors"),
    "storage": ("fusillade.storage", "fusillade.domain", "fusillade.errors", "fusillade.clock"),
    "upstream": ("fusillade.upstream", "fusillade.domain", "fusillade.errors", "fusillade.clock"),
    "metrics": ("fusillade.upstream.classify", "fusillade.domain.usage"),
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
        "fusillade.api_keys",
        "fusillade.storage.base",
    ),
    "config": (
        "fusillade.config",
        "fusillade.domain",
        "fusillade.errors",
        "fusillade.daemon.settings",
        "fusillade.upstream.routes",
        "fusillade.storage.base",
        "fusillade.storage.urls",
    ),
    "composition": (  # the root: everything but the CLI (and the backends, which it opens through the factory)
        "fusillade.composition",
        "fusillade.api",
        "fusillade.config",
        "fusillade.daemon",
        "fusillade.domain",
        "fusillade.errors",
        "fusillade.metrics",
        "fusillade.mock_upstream",
        "fusillade.runtime",
        "fusillade.service",
        "fusillade.storage.base",
        "fusillade.storage.factory",
        "fusillade.upstream",
    ),
    "cli": (  # an edge: parses and renders; every concrete part comes from the composition root
        "fusillade.cli",
        "fusillade.composition",
        "fusillade.api_keys",
        "fusillade.config",
        "fusillade.daemon",
        "fusillade.domain",
        "fusillade.errors",
        "fusillade.metrics",
        "fusillade.mock_upstream.command",
        "fusillade.runtime",
        "fusillade.service",
        "fusillade.storage.base",
        "fusillade.storage.urls",
    ),
}
DOMAIN_FORBIDDEN = {"asyncio", "sqlite3", "asyncpg", "aiohttp", "socket", "os", "subprocess", "threading"}


def module_name(path: Path, root: Path) -> str:
    """`root/cli/run.py` -> `fusillade.cli.run`; `root/cli/__init__.py` -> `fusillade.cli`."""
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("fusillade", *parts))


def imports(path: Path, root: Path) -> set[str]:
    """The fusillade names `path` imports, relative imports resolved against its package."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {imported for imported in found if imported.split(".")[0] == "fusillade"}


def _modules(root: Path) -> Iterator[tuple[Path, str, set[str]]]:
    for path in sorted(root.rglob("*.py")):
        yield path, module_name(path, root), imports(path, root)


def layer_violations(root: Path) -> list[str]:
    """Imports outside a top-level module's rule, and top-level modules without a rule."""
    found: list[str] = []
    for path, name, imported in _modules(root):
        top = path.relative_to(root).parts[0].removesuffix(".py")
        rule = ALLOWED.get(top)
        if rule is None:
            found.append(f"{name} has no rule in ALLOWED")
            continue
        own = (f"fusillade.{top}",) if top not in ("__init__", "__main__") else ()
        found.extend(
            f"{name} imports {imported_name}"
            for imported_name in sorted(imported)
            if imported_name != "fusillade" and not _within(imported_name, (*rule, *own, *EVERYONE))
        )
    return found


def backend_violations(root: Path) -> list[str]:
    """A backend imported by anything but itself and the factory; one backend importing the other; a
    backend opened (the factory, `open_storage`) outside the composition root and the re-exporting packages."""
    found: list[str] = []
    for _, name, imported in _modules(root):
        for imported_name in sorted(imported):
            home = next((backend for backend in BACKENDS if _within(name, (backend,))), None)
            target = next((backend for backend in BACKENDS if _within(imported_name, (backend,))), None)
            if target is not None and home is not None and target != home:
                found.append(f"{name} imports {imported_name} (one backend imports the other)")
            elif target is not None and home is None and name != "fusillade.storage.factory":
                found.append(f"{name} imports {imported_name} (a backend, outside the factory)")
            if _within(imported_name, OPENERS) and not _may_open(name):
                found.append(f"{name} imports {imported_name} (only the composition root opens a backend)")
    return found


def domain_io_violations(root: Path) -> list[str]:
    found: list[str] = []
    for path in sorted((root / "domain").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules = [node.module.split(".")[0]]
            found.extend(f"{path.name} imports {module}" for module in modules if module in DOMAIN_FORBIDDEN)
    return found


# ----------------------------------------------------------------------------------------- the real tree


def test_every_module_imports_only_what_its_layer_may() -> None:
    assert layer_violations(SOURCE) == []


def test_backends_are_opened_only_by_the_composition_root() -> None:
    assert backend_violations(SOURCE) == []


def test_domain_does_no_io() -> None:
    assert domain_io_violations(SOURCE) == []


def test_every_top_level_module_has_a_rule() -> None:
    tops = {path.name.removesuffix(".py") for path in SOURCE.iterdir() if path.suffix == ".py" or path.is_dir()}
    tops.discard("__pycache__")
    assert tops == set(ALLOWED)


# ------------------------------------------------------------------------------------ made-up violations

VIOLATIONS = {
    "an inner layer importing an outer one": (
        {"domain/models.py": "from fusillade.storage import base\n"},
        "fusillade.domain.models imports fusillade.storage.base",
    ),
    "a relative import across layers": (
        {"daemon/loop.py": "from ..api import app\n"},
        "fusillade.daemon.loop imports fusillade.api.app",
    ),
    "a relative import in a package's __init__": (
        {"service/__init__.py": "from ..composition import serving\n"},
        "fusillade.service imports fusillade.composition.serving",
    ),
    "an import inside a function": (
        {"upstream/client.py": "def f() -> None:\n    import fusillade.daemon\n"},
        "fusillade.upstream.client imports fusillade.daemon",
    ),
    "a module without a rule": ({"helpers.py": "x = 1\n"}, "fusillade.helpers has no rule in ALLOWED"),
    "config importing the factory sideways": (
        {"config/schema.py": "from fusillade.storage.factory import open_storage\n"},
        "fusillade.config.schema imports fusillade.storage.factory.open_storage",
    ),
    "the CLI opening storage itself": (
        {"cli/status.py": "from fusillade.storage import factory\n"},
        "fusillade.cli.status imports fusillade.storage.factory",
    ),
    "the CLI importing the API": (
        {"cli/serve.py": "from fusillade.api.app import create_app\n"},
        "fusillade.cli.serve imports fusillade.api.app.create_app",
    ),
    "the composition root importing the CLI": (
        {"composition/serving.py": "from fusillade.cli import common\n"},
        "fusillade.composition.serving imports fusillade.cli.common",
    ),
    "a leaf importing a layer": (
        {"api_keys.py": "from fusillade import config\n"},
        "fusillade.api_keys imports fusillade.config",
    ),
    "metrics importing the daemon": (
        {"metrics.py": "from fusillade.daemon import Daemon\n"},
        "fusillade.metrics imports fusillade.daemon.Daemon",
    ),
    "the composition root importing a backend": (
        {"composition/database.py": "from fusillade.storage.sqlite.store import SqliteStorage\n"},
        "fusillade.composition.database imports fusillade.storage.sqlite.store.SqliteStorage (a backend, "
        "outside the factory)",
    ),
    "SQLite importing PostgreSQL": (
        {"storage/sqlite/queue.py": "from ..postgres import claims\n"},
        "fusillade.storage.sqlite.queue imports fusillade.storage.postgres.claims (one backend imports the other)",
    ),
    "PostgreSQL importing SQLite": (
        {"storage/postgres/store.py": "from fusillade.storage.sqlite import schema\n"},
        "fusillade.storage.postgres.store imports fusillade.storage.sqlite.schema (one backend imports the other)",
    ),
    "the service opening a backend": (
        {"service.py": "from fusillade import open_storage\n"},
        "fusillade.service imports fusillade.open_storage (only the composition root opens a backend)",
    ),
    "the domain doing I/O": ({"domain/jsonl.py": "import asyncio\n"}, "jsonl.py imports asyncio"),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_each_rule_reports_a_violation(case: str, tmp_path: Path) -> None:
    files, expected = VIOLATIONS[case]
    root = tmp_path / "fusillade"
    for relative, text in {"__init__.py": "", **files}.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        for package in [path.parent, *path.parent.parents]:
            if package == root.parent:
                break
            (package / "__init__.py").touch()
        path.write_text(text, encoding="utf-8")
    reported = layer_violations(root) + backend_violations(root) + domain_io_violations(root)
    assert expected in reported
