"""fusillade: durable batches of LLM requests against OpenAI-compatible upstreams."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
