"""fusillade's configuration: one TOML file, `FUSILLADE_*` environment variables over it, checked at start.

```python
from fusillade.config import load_config

config = load_config(path)                     # InvalidConfiguration lists every problem
settings = config.daemon_settings()            # DaemonSettings (daemon knobs, retry policy)
routes = config.resolve_routes()               # {model: Route}, keys read from the environment ("*" excluded)
limits = config.upload_limits()                # jsonl.Limits
config.has_route("gpt-4o")                     # what an upload checks per line
config.route_for("other-model")                # its Route, or the default route, or None
config.route_for("")                           # the default route ([default_route] or [models."*"]), or None
config.redacted()                              # for `fusillade status` and logs: no secrets
```

Modules: `schema` (the sections, their defaults and rules, the mapping onto fusillade's types), `loading`
(file + environment, error messages), `reloading` (`ConfigWatcher`, `watching`), `units` (durations and sizes),
`problems` (`InvalidConfiguration`). `docs/configuration.md` describes every key.
"""

from __future__ import annotations

from fusillade.config.loading import CONFIG_VARIABLE, load_config
from fusillade.config.problems import InvalidConfiguration, Problem
from fusillade.config.reloading import ConfigWatcher, watching
from fusillade.config.routes import RouteSection, TimeoutsSection
from fusillade.config.schema import (
    DEFAULT_DATABASE_URL,
    DEFAULT_ROUTE_MODEL,
    ENV_PREFIX,
    RESTART_KEYS,
    AuthSection,
    Config,
    DaemonSection,
    RetrySection,
    ServerSection,
    UploadsSection,
)
from fusillade.config.units import format_duration, parse_duration

__all__ = [
    "CONFIG_VARIABLE",
    "DEFAULT_DATABASE_URL",
    "DEFAULT_ROUTE_MODEL",
    "ENV_PREFIX",
    "RESTART_KEYS",
    "AuthSection",
    "Config",
    "ConfigWatcher",
    "DaemonSection",
    "InvalidConfiguration",
    "Problem",
    "RetrySection",
    "RouteSection",
    "ServerSection",
    "TimeoutsSection",
    "UploadsSection",
    "format_duration",
    "load_config",
    "parse_duration",
    "watching",
]
