"""The OpenAI-compatible HTTP API (FastAPI): `/v1/files` and `/v1/batches` as the official `openai` SDK calls
them, plus fusillade's extras (per-request listing, retry of failed requests, health, Prometheus metrics).

```python
from fusillade.api import ApiContext, create_app

app = create_app(ApiContext(storage=storage, service=service, registry=registry))
```

Modules: `context` (what the app needs), `auth` (bearer keys, owners), `schemas` (the OpenAI objects on the
wire), `errors` (the OpenAI error envelope), `uploads` (streaming multipart reader), `routes/` (endpoints).
`docs/http-api.md` describes every endpoint.
"""

from __future__ import annotations

from fusillade.api.app import create_app
from fusillade.api.context import ApiContext

__all__ = ["ApiContext", "create_app"]
