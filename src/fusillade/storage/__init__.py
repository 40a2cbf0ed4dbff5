"""Storage: the contract every backend implements (`storage.base`: role protocols, one `Storage` for all of
them) and the backends themselves (`storage.sqlite`, `storage.postgres`), opened by URL (`open_storage`).

Code that uses a store depends on `Storage` only; `open_storage` is the one place that picks a backend.
"""

from __future__ import annotations

from fusillade.storage.base import Storage, WritePriority
from fusillade.storage.factory import open_storage

__all__ = ["Storage", "WritePriority", "open_storage"]
