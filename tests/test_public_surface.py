"""The public surface, pinned (after httpx's `test_exported_members`): what `__all__` declares in `fusillade`
and the packages meant for library use exists, is documented, and is exactly the list below, so that a change to
the surface is a deliberate edit of this file. `import fusillade` itself stays light: each name is imported from
its home on first use."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from types import ModuleType

import pytest

import fusillade

SURFACES = {
    "fusillade": [
        "Batch",
        "BatchSpec",
        "BatchStatus",
        "Config",
        "ConfigurationError",
        "Daemon",
        "DaemonSettings",
        "File",
        "FusilladeError",
        "NotFound",
        "Route",
        "Service",
        "StateConflict",
        "Storage",
        "StorageError",
        "StorageUnavailable",
        "UpstreamClient",
        "ValidationError",
        "__version__",
        "load_config",
        "open_storage",
    ],
    "fusillade.daemon": ["Daemon", "DaemonFenced", "DaemonSettings", "run_until_signalled"],
    "fusillade.storage": ["Storage", "WritePriority", "open_storage"],
    "fusillade.domain": ["ids", "jsonl", "models", "retry", "served", "states"],
}
HEAVY = ("fastapi", "uvicorn", "aiohttp", "asyncpg", "pydantic", "fusillade.service", "fusillade.daemon")
"""What `import fusillade` must not import by itself (the CLI's short commands, a library that needs one name)."""


def _exported(module: ModuleType, name: str) -> object:
    """`module.name`, or the submodule `module.name` (a package's `__all__` may list its modules)."""
    if hasattr(module, name):
        return getattr(module, name)
    return importlib.import_module(f"{module.__name__}.{name}")


@pytest.mark.parametrize("module_name", sorted(SURFACES))
def test_the_declared_surface_is_the_pinned_one(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(SURFACES[module_name])
    assert len(set(module.__all__)) == len(module.__all__)


@pytest.mark.parametrize("module_name", sorted(SURFACES))
def test_every_exported_name_exists_and_is_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    undocumented = []
    for name in module.__all__:
        value = _exported(module, name)
        if isinstance(value, str):  # __version__
            continue
        own = value.__doc__ if isinstance(value, ModuleType) else vars(value).get("__doc__", value.__doc__)
        generated = inspect.isclass(value) and (own or "").startswith(f"{value.__name__}(")  # a dataclass's
        if not (own or "").strip() or generated:
            undocumented.append(name)
    assert undocumented == []


def test_public_names_come_from_fusillade() -> None:
    foreign = [
        name
        for name in fusillade.__all__
        if name != "__version__" and not getattr(fusillade, name).__module__.startswith("fusillade.")
    ]
    assert foreign == []


def test_a_missing_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        _ = fusillade.NoSuchThing


def test_dir_lists_the_public_names() -> None:
    assert set(fusillade.__all__) <= set(dir(fusillade))


def test_importing_fusillade_imports_nothing_heavy() -> None:
    probe = "import sys, fusillade; print(' '.join(name for name in {heavy!r} if name in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", probe.format(heavy=HEAVY)], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.split() == []
    assert fusillade.__version__
