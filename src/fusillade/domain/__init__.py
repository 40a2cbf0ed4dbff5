"""Pure domain: ids, records, the request state machine, retry policy and JSONL formats. No I/O."""

from __future__ import annotations

__all__ = ["ids", "jsonl", "models", "retry", "served", "states"]
"""The modules meant for use outside fusillade (`from fusillade.domain import models`); the others (`counts`,
`lines`, `json_spans`) are helpers of these."""
