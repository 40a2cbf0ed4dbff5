"""The endpoints, one module per resource: `files`, `batches`, and `health` (probes and metrics)."""

from __future__ import annotations
