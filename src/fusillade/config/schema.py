"""The shape of fusillade's configuration, with its defaults and rules, and its mapping onto the types the rest
of fusillade takes (`DaemonSettings`, `RetryPolicy`, `Route`, `PhaseTimeouts`, `jsonl.Limits`).

Every section forbids unknown keys, so a misspelt key is an error rather than a silently ignored setting. The
defaults are read from those types' own defaults, so the file and the library cannot drift apart. Secrets are
never part of the configuration: it names the environment variables that hold them (`api_key_env`,
`admin_key_env`), and `Config.resolve_routes` / `Config.admin_key` read those variables when asked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fusillade.config import units
from fusillade.config.problems import InvalidConfiguration, Problem, dotted_key
from fusillade.config.routes import RouteSection
from fusillade.config.values import (
    ByteSize,
    Count,
    Duration,
    EnvVarName,
    ModelName,
    OptionalPositiveDuration,
    PositiveDuration,
    Section,
    existing_directory,
    header_key,
    listen_address,
    none_word,
    split_address,
)
from fusillade.daemon.settings import DaemonSettings
from fusillade.domain import jsonl
from fusillade.domain.prices import Prices
from fusillade.domain.retry import RetryPolicy
from fusillade.storage import urls
from fusillade.storage.base import DEFAULT_DATABASE_TIMEOUT
from fusillade.upstream.routes import Route

ENV_PREFIX = "FUSILLADE_"
"""Environment variables starting with this override the file (`FUSILLADE_SERVER__PORT=8081`)."""
ENV_NESTED_DELIMITER = "__"
DEFAULT_DATABASE_URL = urls.DEFAULT_DATABASE_URL
DEFAULT_ROUTE_MODEL = "*"
"""`[models."*"]` is the default route, another way to write `[default_route]` (never a model of its own)."""
RESTART_KEYS = ("database_url", "database_timeout", "server", "auth")
"""Top-level keys a running process does not apply live: changing them needs a restart."""

_DAEMON = DaemonSettings()
_RETRY = RetryPolicy()
_HIDDEN = "***"


class ServerSection(Section):
    """`[server]`: where the HTTP API listens, and what one client may make it hold (needs a restart to
    change)."""

    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    """Address to listen on; `0.0.0.0` for every interface."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    """TCP port; 0 picks a free one."""
    metrics_address: Annotated[str, AfterValidator(listen_address)] | None = None
    """`HOST:PORT` (`[::1]:9100` for IPv6) where `/metrics` is also served, without a key, apart from the API;
    none: only at the API's `/metrics`."""
    max_header_bytes: Annotated[ByteSize, Field(ge=1024)] = 64 * 1024
    """Largest request line and headers of one request together; over it: 431."""
    max_headers: Count = 100
    """Most header fields in one request; over it: 431."""
    header_timeout: PositiveDuration = timedelta(seconds=10)
    """Longest time a client may take to send a request's line and headers, from its connection (or the first
    byte of a further request on it); over it: 408, and the connection is closed."""
    max_connections: Count = 1000
    """Most connections open at once; a connection over it is answered 503 and closed."""
    api_niceness: Annotated[int, Field(ge=0, le=19)] = 5
    """`fusillade serve` on Linux: how much lower the API's CPU priority is than its daemon process's (a `nice`
    increment of the API's threads); on a busy machine the running batches keep their pace and the API answers
    a little later. 0: the same priority."""

    def metrics_listen(self) -> tuple[str, int] | None:
        """`metrics_address` as (host, port), or None."""
        return None if self.metrics_address is None else split_address(self.metrics_address)


class AuthSection(Section):
    """`[auth]`: API keys. Owners' keys live in the database (`fusillade keys create`), hashed; only the admin
    key may come from the environment."""

    admin_key_env: EnvVarName | None = None
    """Name of an environment variable holding an admin API key (sees every owner's objects); none: no admin
    key from the environment."""
    metrics_key_env: EnvVarName | None = None
    """Name of an environment variable holding a key that may read `GET /metrics` and nothing else (for
    Prometheus); none: only admin keys may read it (when the API has keys)."""


class UploadsSection(Section):
    """`[uploads]`: what an uploaded batch input file may hold."""

    max_lines: Count = jsonl.DEFAULT_LIMITS.max_lines
    """Most request lines in one file."""
    max_bytes: ByteSize = jsonl.DEFAULT_LIMITS.max_bytes
    """Largest file, in bytes or as a size such as "200MiB"."""
    max_line_bytes: ByteSize = jsonl.DEFAULT_LIMITS.max_line_bytes
    """Longest request line (its line end excluded); a longer line is refused, and an upload never holds more
    of one line in memory than this."""
    spool_directory: Annotated[Path, AfterValidator(existing_directory)] | None = None
    """Existing directory where uploads are buffered while they are validated; none: the system's temporary
    directory."""

    def limits(self) -> jsonl.Limits:
        return jsonl.Limits(max_lines=self.max_lines, max_bytes=self.max_bytes, max_line_bytes=self.max_line_bytes)


class RetrySection(Section):
    """`[daemon.retry]`: backoff of retriable upstream failures (see `domain.retry.RetryPolicy`)."""

    base_delay: Duration = _RETRY.base_delay
    """Delay after the first failed attempt, before jitter."""
    factor: Annotated[float, Field(ge=1, allow_inf_nan=False)] = _RETRY.factor
    """Each further failure multiplies the delay by this."""
    max_delay: Duration = _RETRY.max_delay
    """No backoff delay is longer (a Retry-After from the upstream may be)."""
    jitter: Annotated[float, Field(ge=0, le=1)] = _RETRY.jitter
    """The delay is multiplied by a random factor in [1 - jitter, 1 + jitter]."""
    max_attempts: Annotated[Count | None, BeforeValidator(none_word)] = _RETRY.max_attempts
    """Attempts in all, the first included; "none": no limit but the batch deadline."""
    stop_before_deadline: Duration = _RETRY.stop_before_deadline
    """Give up when the next attempt would start later than this before the batch deadline."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"max_delay ({units.format_duration(self.max_delay)}) must not be shorter than base_delay "
                f"({units.format_duration(self.base_delay)})"
            )
        self.policy()  # any further rule of RetryPolicy itself
        return self

    def policy(self) -> RetryPolicy:
        return RetryPolicy(**dict(self))


class DaemonSection(Section):
    """`[daemon]`: the knobs of the daemon (see `daemon.settings.DaemonSettings`); all change live on reload."""

    claim_batch_size: Count = _DAEMON.claim_batch_size
    """Most requests taken per claim transaction."""
    idle_poll_interval: PositiveDuration = _DAEMON.idle_poll_interval
    """With free capacity and nothing claimed, claim again after this (work created by another process)."""
    commit_max_delay: Duration = _DAEMON.commit_max_delay
    """Group commit tick: a state write waits at most this long for others to join its transaction."""
    commit_max_size: Count = _DAEMON.commit_max_size
    """Group commit: most state writes per transaction."""
    min_tick_interval: Duration = _DAEMON.min_tick_interval
    """Ticks (group commit + claim) start at most this often."""
    ticks_in_flight: Count = _DAEMON.ticks_in_flight
    """Trips to the database (group commit + claim) kept going at once."""
    processing_mark_delay: Duration = _DAEMON.processing_mark_delay
    """A request is marked processing once its call has run this long (faster calls skip that write)."""
    heartbeat_interval: PositiveDuration = _DAEMON.heartbeat_interval
    """How often a daemon tells the database it is alive."""
    stale_after: PositiveDuration = _DAEMON.stale_after
    """A daemon silent for this long is dead and its requests are reclaimed; longer than heartbeat_interval."""
    maintenance_interval: PositiveDuration = _DAEMON.maintenance_interval
    """How often reclaim, expiry and finalization sweeps run."""
    cancellation_poll_interval: PositiveDuration = _DAEMON.cancellation_poll_interval
    """How often the daemon looks for cancelled batches among its in-flight requests."""
    expiry_grace: Duration = _DAEMON.expiry_grace
    """Unfinished requests of a batch end `batch_expired` this long after its expires_at."""
    purge_interval: OptionalPositiveDuration = _DAEMON.purge_interval
    """How often deleted data is purged; "none": never, from this daemon."""
    purge_batch_size: Count = _DAEMON.purge_batch_size
    """Most rows deleted per purge transaction."""
    purge_throttle: Duration = _DAEMON.purge_throttle
    """Pause between purge transactions."""
    shutdown_grace: Duration = _DAEMON.shutdown_grace
    """On stop, in-flight calls get this long to finish; the rest are released for another daemon."""
    rate_limit_pause: Duration = _DAEMON.rate_limit_pause
    """A 429 without Retry-After pauses its model's lane this long."""
    database_backoff_max: PositiveDuration = _DAEMON.database_backoff_max
    """Longest pause between retries of a failing database call."""
    batch_metadata_headers: tuple[Annotated[str, AfterValidator(header_key)], ...] = tuple(
        _DAEMON.batch_metadata_headers
    )
    """Keys of a batch's metadata sent upstream as x-fusillade-batch-<key> headers."""
    endpoint_cool_down: PositiveDuration = _DAEMON.endpoint_cool_down
    """An endpoint of a pool that fails is left out this long, then probed; doubled with each ejection in a row."""
    endpoint_cool_down_max: PositiveDuration = _DAEMON.endpoint_cool_down_max
    """The longest an endpoint of a pool is left out at once."""
    retry: RetrySection = Field(default_factory=RetrySection)
    """Retry policy of retriable upstream failures."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.stale_after <= self.heartbeat_interval:
            raise ValueError(
                f"stale_after ({units.format_duration(self.stale_after)}) must be longer than heartbeat_interval "
                f"({units.format_duration(self.heartbeat_interval)}), or live daemons would be taken for dead"
            )
        if self.endpoint_cool_down_max < self.endpoint_cool_down:
            raise ValueError(
                f"endpoint_cool_down_max ({units.format_duration(self.endpoint_cool_down_max)}) must not be "
                f"shorter than endpoint_cool_down ({units.format_duration(self.endpoint_cool_down)})"
            )
        self.settings()  # any further rule of DaemonSettings itself
        return self

    def settings(self) -> DaemonSettings:
        values: dict[str, Any] = dict(self)
        values["retry"] = self.retry.policy()
        return DaemonSettings(**values)


# ------------------------------------------------------------------------------------------------------ root


class Config(BaseSettings):
    """The whole configuration. `load_config` builds one from the file and the `FUSILLADE_*` environment;
    `Config()` is the defaults alone (it reads no environment)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    database_url: Annotated[str, AfterValidator(urls.check_database_url)] = DEFAULT_DATABASE_URL
    """sqlite:///PATH (one process) or postgresql://USER:PASSWORD@HOST:PORT/DATABASE (several replicas);
    needs a restart to change."""
    database_timeout: PositiveDuration = DEFAULT_DATABASE_TIMEOUT
    """PostgreSQL: longest wait to connect, for a free pooled connection, and for any one statement; a database
    that stops answering (even silently, after a network cut) fails the call, which is retried. Needs a restart."""
    server: ServerSection = Field(default_factory=ServerSection)
    """Where the HTTP API listens."""
    auth: AuthSection = Field(default_factory=AuthSection)
    """API keys."""
    uploads: UploadsSection = Field(default_factory=UploadsSection)
    """Limits of uploaded input files."""
    daemon: DaemonSection = Field(default_factory=DaemonSection)
    """Knobs of the daemon."""
    models: dict[ModelName, RouteSection] = Field(default_factory=dict)
    """The routing table: one route per model name (the `model` of a request body); `"*"` is the default
    route."""
    default_route: RouteSection | None = None
    """Route for models not in `models` (or write it `[models."*"]`, not both); none: requests for an unlisted
    model are refused at upload."""

    _source: Path | None = PrivateAttr(default=None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the values passed in: `load_config` reads the file and the (given) environment itself, so that
        # a test or an embedding service can pass its own environment and every error can name its source.
        return (init_settings,)

    @field_validator("default_route")
    @classmethod
    def _one_default_route(cls, section: RouteSection | None, info: ValidationInfo) -> RouteSection | None:
        # `models` is validated first (fields are validated in order); it is absent when it was invalid.
        if section is not None and DEFAULT_ROUTE_MODEL in info.data.get("models", {}):
            raise ValueError(
                'is set, and so is [models."*"]: both are the default route (for models without a table of '
                "their own); keep only one of them"
            )
        return section

    @model_validator(mode="after")
    def _fallbacks_exist(self) -> Self:
        sections = [(f'models."{name}"', name, section) for name, section in self.models.items()]
        if self.default_route is not None:
            sections.append(("default_route", DEFAULT_ROUTE_MODEL, self.default_route))
        for where, name, section in sections:
            target = section.fallback
            if target is None:
                continue
            if target in (name, DEFAULT_ROUTE_MODEL) or target not in self.models:
                served = ", ".join(sorted(model for model in self.models if model != DEFAULT_ROUTE_MODEL))
                raise ValueError(
                    f"{where}.fallback = {target!r}: the fallback must be another model with a table of its own "
                    f"in [models] (served: {served or 'none'})"
                )
        return self

    @model_validator(mode="after")
    def _token_limits_on_sqlite(self) -> Self:
        if self.database_url.startswith("sqlite"):
            return self
        sections = [*(f'models."{name}"' for name, section in self.models.items() if section.tokens_per_minute)]
        if self.default_route is not None and self.default_route.tokens_per_minute:
            sections.append("default_route")
        if sections:
            raise ValueError(
                f"{sections[0]}.tokens_per_minute: token limits are held on SQLite only for now (PostgreSQL's "
                "shared token bucket is not built yet); use requests_per_minute"
            )
        return self

    @property
    def source(self) -> Path | None:
        """The file this configuration was read from, if any."""
        return self._source

    # ------------------------------------------------------------------------------------- mapping

    def daemon_settings(self) -> DaemonSettings:
        return self.daemon.settings()

    def upload_limits(self) -> jsonl.Limits:
        return self.uploads.limits()

    def has_route(self, model: str) -> bool:
        """Whether requests for `model` can be sent anywhere (its own route or the default route); what an
        upload checks for each line (`jsonl.validate(..., model_allowed=config.has_route)`). Reads no secret."""
        return model in self.models or self._default_section() is not None

    def route_for(self, model: str, environ: Mapping[str, str] | None = None) -> Route | None:
        """The route of `model`: its own, else the default route, else None; its key is read from `environ`
        (default: the process environment). Raises `InvalidConfiguration` if that key's variable is unset.
        `route_for("")` is the default route alone (no model is called "")."""
        section = self.models.get(model) if model != DEFAULT_ROUTE_MODEL else None
        if section is not None:
            return section.route(_read_key(section, ("models", model), environ))
        default = self._default_section()
        if default is None:
            return None
        location, section = default
        return section.route(_read_key(section, location, environ))

    def resolve_routes(self, environ: Mapping[str, str] | None = None) -> dict[str, Route]:
        """Every listed model's route, keys read from `environ` (default: the process environment); never "*",
        which is the default route. Checks the default route's key too, so that one call at start-up reports
        every missing variable at once (`InvalidConfiguration`, naming each variable and its model); the default
        route itself comes from `route_for("")`."""
        environ = os.environ if environ is None else environ
        problems: list[Problem] = []
        routes: dict[str, Route] = {}
        for name, section in self.models.items():
            if name == DEFAULT_ROUTE_MODEL:
                continue  # the default route, not a model: checked below
            try:
                routes[name] = section.route(_read_key(section, ("models", name), environ))
            except InvalidConfiguration as exc:
                problems.extend(exc.problems)
        default = self._default_section()
        if default is not None:
            try:
                _read_key(default[1], default[0], environ)
            except InvalidConfiguration as exc:
                problems.extend(exc.problems)
        if problems:
            raise InvalidConfiguration(problems)
        return routes

    def prices(self) -> Prices:
        """The pricing of each route (`[models."NAME".pricing]`), for the cost of batches. Reads no secret."""
        default = self._default_section()
        return Prices(
            routed={
                model: None if section.pricing is None else section.pricing.pricing()
                for model, section in self.models.items()
                if model != DEFAULT_ROUTE_MODEL
            },
            default=None if default is None or default[1].pricing is None else default[1].pricing.pricing(),
        )

    def _default_section(self) -> tuple[tuple[str, ...], RouteSection] | None:
        """Where the default route is written, and its table: `[default_route]`, else `[models."*"]`, else None.
        Loading refuses both; a copy with `default_route` set over a `[models."*"]` (`model_copy`, as
        `fusillade run --model-route '*=URL'` and `serve --mock-upstream` do) holds both, and then the copy's
        `default_route` wins."""
        if self.default_route is not None:
            return ("default_route",), self.default_route
        section = self.models.get(DEFAULT_ROUTE_MODEL)
        return (("models", DEFAULT_ROUTE_MODEL), section) if section is not None else None

    def admin_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The admin API key from the variable `auth.admin_key_env` names; None when none is named. Raises
        `InvalidConfiguration` when the named variable is unset or empty."""
        name = self.auth.admin_key_env
        if name is None:
            return None
        return _read_variable(name, ("auth", "admin_key_env"), "the admin API key", environ)

    def metrics_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The metrics-only key from the variable `auth.metrics_key_env` names; None when none is named. Raises
        `InvalidConfiguration` when the named variable is unset or empty."""
        name = self.auth.metrics_key_env
        if name is None:
            return None
        return _read_variable(name, ("auth", "metrics_key_env"), "the key that reads /metrics", environ)

    # ------------------------------------------------------------------------------------- display

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as JSON-ready data for `fusillade status` and logs: durations and sizes
        written as in the file, the database password replaced by `***`. It holds no secret: keys are only
        ever named by their environment variables."""
        data: dict[str, Any] = {"config_file": str(self._source) if self._source else None}
        data.update(self.model_dump(mode="json"))
        data["database_url"] = _hide_password(self.database_url)
        return data

    def restart_required(self, newer: Config) -> list[str]:
        """The keys of `RESTART_KEYS` that differ in `newer`: a running process keeps their old values."""
        return [key for key in RESTART_KEYS if getattr(self, key) != getattr(newer, key)]


def _read_key(section: RouteSection, location: tuple[str, ...], environ: Mapping[str, str] | None) -> str | None:
    if section.api_key_env is None:
        return None
    is_model = location[0] == "models" and location[1] != DEFAULT_ROUTE_MODEL
    owner = f"model {location[1]!r}" if is_model else "the default route"
    return _read_variable(section.api_key_env, (*location, "api_key_env"), f"the API key of {owner}", environ)


def _read_variable(name: str, location: tuple[str, ...], purpose: str, environ: Mapping[str, str] | None) -> str:
    value = (os.environ if environ is None else environ).get(name)
    if value:
        return value
    state = "is not set" if value is None else "is empty"
    raise InvalidConfiguration(
        [
            Problem(
                name,
                dotted_key(location),
                f"{state}, but it should hold {purpose}; export it before starting fusillade, or remove "
                f"{location[-1]} if no key is needed",
            )
        ]
    )


def _hide_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None and "password" not in parts.query:
        return url  # also keeps sqlite:///./x.db as written (urlunsplit would drop a slash)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:{_HIDDEN}@{host}"
    query = parts.query
    if "password" in query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, _HIDDEN if k == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))
