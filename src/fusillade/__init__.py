"""fusillade: durable batches of LLM requests against OpenAI-compatible upstreams.

As a library (README.md, "As a library", is a complete script):

```python
store = await fusillade.open_storage("sqlite:///./fusillade.db")     # or postgresql://...
service = fusillade.Service(store, limits=..., model_allowed=...)    # upload files, create and read batches
daemon = fusillade.Daemon(store, client, {"model": fusillade.Route(...)})  # sends the requests: run() it
```

The names below are the public surface (`__all__`): what the service, the daemon and the storage contract take
and return, and the errors they raise. Each is imported on first use, so `import fusillade` stays light (the
CLI's short commands import only what they need). Deeper modules (`fusillade.domain.models`, `fusillade.config`,
...) are importable too; the composition root (`fusillade.composition`) is the CLI's, not a library interface.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fusillade.config import Config, load_config
    from fusillade.daemon import Daemon, DaemonSettings
    from fusillade.domain.models import Batch, BatchSpec, File
    from fusillade.domain.states import BatchStatus
    from fusillade.errors import (
        ConfigurationError,
        FusilladeError,
        NotFound,
        StateConflict,
        StorageError,
        StorageUnavailable,
        ValidationError,
    )
    from fusillade.service import Service
    from fusillade.storage import Storage, open_storage
    from fusillade.upstream.client import UpstreamClient
    from fusillade.upstream.routes import Route

_HOMES = {
    "Batch": "fusillade.domain.models",
    "BatchSpec": "fusillade.domain.models",
    "BatchStatus": "fusillade.domain.states",
    "Config": "fusillade.config",
    "ConfigurationError": "fusillade.errors",
    "Daemon": "fusillade.daemon",
    "DaemonSettings": "fusillade.daemon",
    "File": "fusillade.domain.models",
    "FusilladeError": "fusillade.errors",
    "NotFound": "fusillade.errors",
    "Route": "fusillade.upstream.routes",
    "Service": "fusillade.service",
    "StateConflict": "fusillade.errors",
    "Storage": "fusillade.storage",
    "StorageError": "fusillade.errors",
    "StorageUnavailable": "fusillade.errors",
    "UpstreamClient": "fusillade.upstream.client",
    "ValidationError": "fusillade.errors",
    "load_config": "fusillade.config",
    "open_storage": "fusillade.storage",
}
"""Where each public name lives: imported from there on first use."""

__all__ = [
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
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is asked for (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
