"""Configuration (`fusillade.config`): defaults, file and environment, error messages, the mapping onto
DaemonSettings/Route/Limits, the redacted view and the docs. Durations and sizes are in `test_config_units.py`,
live reloading in `test_config_reload.py`."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from fusillade import errors
from fusillade.composition.routing import Routing
from fusillade.config import Config, InvalidConfiguration, Problem, RouteSection, load_config
from fusillade.config.problems import dotted_key
from fusillade.daemon.settings import DaemonSettings
from fusillade.domain import jsonl
from fusillade.domain.retry import RetryPolicy
from fusillade.upstream.routes import PhaseTimeouts, Route
from tests.unit.config_files import ROUTE, write

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXAMPLE = DOCS / "fusillade.example.toml"


def problems_of(path: Path | None = None, environ: dict[str, str] | None = None) -> list[Problem]:
    with pytest.raises(InvalidConfiguration) as caught:
        load_config(path, environ=environ or {})
    assert isinstance(caught.value, errors.ConfigurationError)
    # The message lists every problem, one a line.
    assert all(f"  {problem}" in caught.value.message.splitlines() for problem in caught.value.problems)
    return caught.value.problems


def only_problem(path: Path | None = None, environ: dict[str, str] | None = None) -> Problem:
    problems = problems_of(path, environ)
    assert len(problems) == 1, problems
    return problems[0]


# ------------------------------------------------------------------------------------------------ defaults


def test_defaults_match_the_types_they_configure() -> None:
    config = load_config(environ={})
    assert config == Config()
    assert config.source is None
    assert config.database_url == "sqlite:///./fusillade.db"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.auth.admin_key_env is None
    assert config.uploads.spool_directory is None
    assert config.daemon_settings() == DaemonSettings()
    assert config.upload_limits() == jsonl.Limits()
    assert config.models == {}
    assert config.default_route is None
    assert config.resolve_routes({}) == {}
    assert config.admin_key({}) is None


def test_a_route_with_only_a_base_url_is_a_default_route() -> None:
    config = Config.model_validate({"models": {"m": {"base_url": "http://upstream:8000"}}})
    assert config.resolve_routes({}) == {"m": Route(base_url="http://upstream:8000")}


# -------------------------------------------------------------------------------------- file and environment


def test_the_file_sets_every_section(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        database_url = "postgresql://fusillade@db:5432/fusillade"
        [server]
        host = "0.0.0.0"
        port = 9000
        [auth]
        admin_key_env = "ADMIN_KEY"
        [uploads]
        max_lines = 10
        max_bytes = "1MiB"
        max_line_bytes = "64KiB"
        [daemon]
        claim_batch_size = 7
        heartbeat_interval = "2s"
        stale_after = 20
        commit_max_delay = "1ms"
        purge_interval = "none"
        batch_metadata_headers = ["team"]
        [daemon.retry]
        base_delay = "250ms"
        max_delay = "1h30m"
        max_attempts = "none"
        jitter = 0
        [models."gpt-4o"]
        base_url = "https://api.openai.com/v1"
        api_key_env = "OPENAI_API_KEY"
        concurrency = 4
        stream = true
        retry_404 = true
        [models."gpt-4o".timeouts]
        connect = "1s"
        total = "none"
        """,
    )
    config = load_config(path, environ={})
    assert config.source == path
    assert config.database_url == "postgresql://fusillade@db:5432/fusillade"
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9000)
    assert config.upload_limits() == jsonl.Limits(max_lines=10, max_bytes=1024 * 1024, max_line_bytes=64 * 1024)
    assert config.daemon_settings() == DaemonSettings(
        claim_batch_size=7,
        heartbeat_interval=timedelta(seconds=2),
        stale_after=timedelta(seconds=20),
        commit_max_delay=timedelta(milliseconds=1),
        purge_interval=None,
        batch_metadata_headers=("team",),
        retry=RetryPolicy(
            base_delay=timedelta(milliseconds=250),
            max_delay=timedelta(hours=1, minutes=30),
            max_attempts=None,
            jitter=0,
        ),
    )
    assert config.resolve_routes({"OPENAI_API_KEY": "the-key"}) == {
        "gpt-4o": Route(
            base_url="https://api.openai.com/v1",
            api_key="the-key",
            concurrency=4,
            stream=True,
            retry_404=True,
            timeouts=PhaseTimeouts(connect=timedelta(seconds=1), total=None),
        )
    }
    assert config.admin_key({"ADMIN_KEY": "admin"}) == "admin"


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        port = 9000
        host = "0.0.0.0"
        [daemon.retry]
        max_attempts = 3
        [models."gpt-4o"]
        base_url = "https://api.openai.com/v1"
        concurrency = 4
        stream = true
        """,
    )
    config = load_config(
        path,
        environ={
            "FUSILLADE_DATABASE_URL": "sqlite:////var/lib/f.db",
            "FUSILLADE_SERVER__PORT": "9001",
            "fusillade_daemon__retry__max_attempts": "5",  # names are matched in any case
            "FUSILLADE_DAEMON__HEARTBEAT_INTERVAL": "1s",
            "FUSILLADE_MODELS": '{"gpt-4o": {"concurrency": 8}}',
            "FUSILLADE_MODELS__LLAMA__BASE_URL": "http://127.0.0.1:8000",
            "FUSILLADE_DAEMON__BATCH_METADATA_HEADERS": '["team", "project"]',
        },
    )
    assert config.database_url == "sqlite:////var/lib/f.db"
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9001)
    assert config.daemon.retry.max_attempts == 5
    assert config.daemon.heartbeat_interval == timedelta(seconds=1)
    assert config.daemon.batch_metadata_headers == ("team", "project")
    # A table given as JSON merges with the file's, key by key.
    assert (config.models["gpt-4o"].concurrency, config.models["gpt-4o"].stream) == (8, True)
    assert config.models["llama"].base_url == "http://127.0.0.1:8000"


def test_the_config_variable_names_the_file_unless_a_path_is_given(tmp_path: Path) -> None:
    named = write(tmp_path, "[server]\nport = 1111\n", "named.toml")
    given_path = write(tmp_path, "[server]\nport = 2222\n", "given.toml")
    environ = {"FUSILLADE_CONFIG": str(named)}
    assert load_config(environ=environ).server.port == 1111
    assert load_config(given_path, environ=environ).server.port == 2222


def test_a_named_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    problem = only_problem(missing)
    assert problem.source == str(missing)
    assert "no such configuration file" in problem.message
    assert "FUSILLADE_CONFIG" in only_problem(environ={"FUSILLADE_CONFIG": str(missing)}).message


def test_a_file_that_is_not_toml_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 80\nhost = "unterminated\n')
    problem = only_problem(path)
    assert (problem.source, problem.key) == (str(path), "")
    assert "is not valid TOML" in problem.message
    assert "line 3" in problem.message


# ------------------------------------------------------------------------------------------------- errors


def test_an_unknown_key_in_the_file_is_named_with_the_file_and_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nheartbeat_intervl = 5\n")
    problem = only_problem(path)
    assert (problem.source, problem.key) == (str(path), "daemon.heartbeat_intervl")
    assert "unknown key; did you mean heartbeat_interval?" in problem.message
    assert "claim_batch_size" in problem.message  # lists what is allowed


def test_an_unknown_key_in_a_model_table(tmp_path: Path) -> None:
    path = write(tmp_path, ROUTE + "concurency = 3\n")
    problem = only_problem(path)
    assert problem.key == "models.m.concurency"
    assert "did you mean concurrency?" in problem.message


def test_an_unknown_key_in_a_variable_names_the_variable() -> None:
    problem = only_problem(environ={"FUSILLADE_SERVER__PROT": "1"})
    assert (problem.source, problem.key) == ("FUSILLADE_SERVER__PROT", "server.prot")
    assert "did you mean port?" in problem.message


def test_a_variable_that_looks_like_a_misspelt_setting_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fusillade.config"):
        config = load_config(
            environ={"FUSILLADE_DATABSE_URL": "x", "FUSILLADE_SERVER_PORT": "1", "FUSILLADE_UNRELATED_TOOL": "y"}
        )
    assert config == Config()
    warnings = [record.getMessage() for record in caplog.records]
    assert any("did you mean FUSILLADE_DATABASE_URL?" in warning for warning in warnings)
    assert any("did you mean FUSILLADE_SERVER__PORT?" in warning for warning in warnings)
    assert not any("UNRELATED" in warning for warning in warnings)


def test_a_variable_holding_bad_json_is_named() -> None:
    problem = only_problem(environ={"FUSILLADE_SERVER": "{port: 1}", "FUSILLADE_DAEMON__CLAIM_BATCH_SIZE": "5"})
    assert (problem.source, problem.key) == ("FUSILLADE_SERVER", "server")
    assert "is not valid JSON" in problem.message
    assert "write a table as a JSON object" in problem.message


def test_a_bad_value_in_a_variable_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9000\n")
    problem = only_problem(path, {"FUSILLADE_SERVER__PORT": "eighty"})
    assert (problem.source, problem.key, problem.message) == (
        "FUSILLADE_SERVER__PORT",
        "server.port",
        "must be a whole number",
    )


def test_a_rule_across_keys_from_both_sources_names_both(tmp_path: Path) -> None:
    path = write(tmp_path, '[daemon]\nstale_after = "10s"\n')
    problem = only_problem(path, {"FUSILLADE_DAEMON__HEARTBEAT_INTERVAL": "10s"})
    assert problem.source == f"{path}, FUSILLADE_DAEMON__HEARTBEAT_INTERVAL"
    assert problem.key == "daemon"
    assert "stale_after (10s) must be longer than heartbeat_interval (10s)" in problem.message


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        port = 70000
        [daemon]
        commit_max_delay = "soon"
        [models.a]
        base_url = "ftp://x"
        concurrency = 0
        """,
    )
    problems = problems_of(path, {"FUSILLADE_UPLOADS__MAX_LINES": "0"})
    assert {(problem.source, problem.key) for problem in problems} == {
        (str(path), "server.port"),
        (str(path), "daemon.commit_max_delay"),
        (str(path), "models.a.base_url"),
        (str(path), "models.a.concurrency"),
        ("FUSILLADE_UPLOADS__MAX_LINES", "uploads.max_lines"),
    }
    assert str(problems[0]) == f"{path}: server.port: must be at most 65535"


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ('database_url = "mysql://u:hunter2@h/db"', "database_url", "unsupported scheme 'mysql'"),
        ('database_url = "sqlite:///"', "database_url", "names no database file"),
        ("[server]\nport = -1", "server.port", "must be at least 0"),
        ('[server]\nhost = ""', "server.host", "must not be empty"),
        ('[models.m]\nbase_url = "ftp://host"', "models.m.base_url", "is not an http(s) URL"),
        ('[models.m]\nbase_url = "https://"', "models.m.base_url", "is not an http(s) URL"),
        ('[models.m]\nbase_url = "http://h:99999"', "models.m.base_url", "is not a valid URL"),
        ('[models.m]\nbase_url = "http://h/v1?x=1"', "models.m.base_url", "must not have a query"),
        ('[models.m]\nbase_url = "http://h /v1"', "models.m.base_url", "must not contain spaces"),
        ("[models.m]\nconcurrency = 4", "models.m.base_url", "is required"),
        ("[models.m]\nbase_url = []", "models.m.base_url", "is an empty list"),
        ("[models.m]\nbase_url = 8000", "models.m.base_url", "must be a URL in quotes, or a list of them"),
        ('[models.m]\nbase_url = ["http://a", 3]', "models.m.base_url", "endpoint 2 of the list is not a URL"),
        ('[models.m]\nbase_url = ["http://a", "ftp://b"]', "models.m.base_url", "endpoint 2 of the list: 'ftp"),
        ('[models.m]\nbase_url = ["http://a", "http://a"]', "models.m.base_url", "lists 'http://a' twice"),
        (
            '[daemon]\nendpoint_cool_down = "10m"',
            "daemon",
            "endpoint_cool_down_max (5m) must not be shorter than endpoint_cool_down (10m)",
        ),
        (ROUTE + "concurrency = -3", "models.m.concurrency", "must be at least 1"),
        (ROUTE + 'concurrency = "many"', "models.m.concurrency", "must be a whole number"),
        (ROUTE + 'stream = "sometimes"', "models.m.stream", "must be true or false"),
        (ROUTE + "requests_per_minute = 0", "models.m.requests_per_minute", "must be at least 1"),
        (ROUTE + 'api_key_env = "1KEY"', "models.m.api_key_env", "must be the name of an environment variable"),
        (ROUTE + 'api_key_env = "MY-KEY"', "models.m.api_key_env", "must be the name of an environment variable"),
        (ROUTE + "[models.m.timeouts]\nidle = 0", "models.m.timeouts.idle", 'write "none" for no limit'),
        (ROUTE + '[models.m.timeouts]\nidle = "forever"', "models.m.timeouts.idle", "is not a duration"),
        ('[models.""]\nbase_url = "http://h"', 'models.""', "the name must not be empty"),
        ("[models]\nm = 3", "models.m", "must be a table"),
        ('[daemon]\nheartbeat_interval = "5 parsecs"', "daemon.heartbeat_interval", "unknown unit 'parsecs'"),
        ('[daemon]\nheartbeat_interval = "-5s"', "daemon.heartbeat_interval", "must not be negative"),
        ("[daemon]\nheartbeat_interval = 0", "daemon.heartbeat_interval", "must be longer than 0s"),
        ("[daemon]\nclaim_batch_size = 0", "daemon.claim_batch_size", "must be at least 1"),
        ('[daemon]\nstale_after = "1s"', "daemon", "stale_after (1s) must be longer than heartbeat_interval (5s)"),
        ('[daemon]\nbatch_metadata_headers = ["a b"]', "daemon.batch_metadata_headers[0]", "HTTP header"),
        ('[daemon]\nbatch_metadata_headers = "team"', "daemon.batch_metadata_headers", "must be a list"),
        ('[daemon.retry]\nmax_delay = "1s"\nbase_delay = "2s"', "daemon.retry", "max_delay (1s) must not be"),
        ("[daemon.retry]\njitter = 1.5", "daemon.retry.jitter", "must be at most 1"),
        ("[daemon.retry]\nfactor = 0.5", "daemon.retry.factor", "must be at least 1"),
        ("[daemon.retry]\nmax_attempts = 0", "daemon.retry.max_attempts", "must be at least 1"),
        ('[uploads]\nmax_bytes = "2 furlongs"', "uploads.max_bytes", "is not a size"),
        ('[uploads]\nspool_directory = "/no/such/dir"', "uploads.spool_directory", "is not an existing directory"),
        ('[auth]\nadmin_key_env = "sk-admin"', "auth.admin_key_env", "looks like an API key"),
    ],
)
def test_each_mistake_is_explained(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = write(tmp_path, text)
    problem = only_problem(path)
    assert (problem.source, problem.key) == (str(path), key)
    assert expected in problem.message


def test_a_literal_key_is_refused_and_never_quoted(tmp_path: Path) -> None:
    secret = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"
    path = write(tmp_path, ROUTE + f'api_key_env = "{secret}"\n')
    problem = only_problem(path)
    assert problem.key == "models.m.api_key_env"
    assert "put the key in an environment variable" in problem.message
    assert secret not in str(problem)


def test_credentials_in_urls_are_refused_and_never_quoted(tmp_path: Path) -> None:
    path = write(tmp_path, '[models.m]\nbase_url = "https://user:hunter2@api.example.com/v1"\n')
    problem = only_problem(path)
    assert "must not hold a user name or password" in problem.message
    assert "hunter2" not in problem.message
    assert "hunter2" not in only_problem(environ={"FUSILLADE_DATABASE_URL": "mysql://u:hunter2@h/db"}).message


def test_a_spool_directory_must_exist(tmp_path: Path) -> None:
    path = write(tmp_path, f"[uploads]\nspool_directory = {json.dumps(str(tmp_path))}\n")
    assert load_config(path, environ={}).uploads.spool_directory == tmp_path


# -------------------------------------------------------------------------------------------------- routes


def test_a_missing_key_variable_is_named_with_its_model(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [models."gpt-4o"]
        base_url = "https://api.openai.com/v1"
        api_key_env = "OPENAI_API_KEY"
        [models.other]
        base_url = "https://other.example/v1"
        api_key_env = "OTHER_KEY"
        [default_route]
        base_url = "http://127.0.0.1:8000"
        api_key_env = "LOCAL_KEY"
        """,
    )
    config = load_config(path, environ={})  # loading never needs the keys
    with pytest.raises(InvalidConfiguration) as caught:
        config.resolve_routes({"OTHER_KEY": ""})
    assert [(problem.source, problem.key) for problem in caught.value.problems] == [
        ("OPENAI_API_KEY", "models.gpt-4o.api_key_env"),
        ("OTHER_KEY", "models.other.api_key_env"),
        ("LOCAL_KEY", "default_route.api_key_env"),
    ]
    first, empty, default = caught.value.problems
    assert "is not set" in first.message
    assert "'gpt-4o'" in first.message
    assert "is empty" in empty.message
    assert "the default route" in default.message
    with pytest.raises(InvalidConfiguration, match="OPENAI_API_KEY"):
        config.route_for("gpt-4o", {})


def test_routes_read_their_keys_from_the_given_environment_only(tmp_path: Path) -> None:
    path = write(tmp_path, ROUTE + 'api_key_env = "M_KEY"\n')
    config = load_config(path, environ={})
    assert config.resolve_routes({"M_KEY": "secret"})["m"].api_key == "secret"
    assert config.route_for("m", {"M_KEY": "secret"}) == Route(
        base_url="http://127.0.0.1:9000/v1", api_key="secret"
    )


def test_a_list_of_base_urls_is_a_pool_of_endpoints(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [models.pool]
        base_url = ["http://10.0.0.7:8000/v1", "http://10.0.0.8:8000/v1"]
        concurrency = 8

        [models.one]
        base_url = ["http://10.0.0.9:8000"]
        """,
    )
    config = load_config(path, environ={})
    routes = config.resolve_routes({})
    assert routes["pool"].base_urls == ("http://10.0.0.7:8000/v1", "http://10.0.0.8:8000/v1")
    assert routes["pool"].base_url == "http://10.0.0.7:8000/v1"
    assert routes["pool"].concurrency == 8
    assert routes["one"] == Route(base_url="http://10.0.0.9:8000")  # a list of one: a single upstream
    assert config.redacted()["models"]["pool"]["base_url"] == [
        "http://10.0.0.7:8000/v1",
        "http://10.0.0.8:8000/v1",
    ]
    # A string stays a string, as it was written.
    assert load_config(write(tmp_path, ROUTE), environ={}).models["m"].base_url == "http://127.0.0.1:9000/v1"


def test_a_pool_can_come_from_the_environment_as_a_json_list() -> None:
    config = load_config(environ={"FUSILLADE_MODELS__M__BASE_URL": '["http://a:1", "http://b:2"]'})
    assert config.resolve_routes({})["m"].base_urls == ("http://a:1", "http://b:2")


def test_the_default_route_serves_unlisted_models(tmp_path: Path) -> None:
    listed = load_config(write(tmp_path, ROUTE), environ={})
    assert listed.has_route("m")
    assert not listed.has_route("other")
    assert listed.route_for("other", {}) is None

    path = write(tmp_path, ROUTE + '[default_route]\nbase_url = "http://fallback:1"\nconcurrency = 2\n', "b.toml")
    config = load_config(path, environ={})
    assert config.has_route("other")
    assert config.route_for("other", {}) == Route(base_url="http://fallback:1", concurrency=2)
    assert config.route_for("m", {}) == Route(base_url="http://127.0.0.1:9000/v1")
    assert set(config.resolve_routes({})) == {"m"}


STAR_ROUTE = """
[models.m]
base_url = "http://127.0.0.1:9000/v1"
[models."*"]
base_url = "http://fallback:1"
api_key_env = "FALLBACK_KEY"
concurrency = 2
"""


def test_models_star_is_the_default_route(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, STAR_ROUTE), environ={})
    environ = {"FALLBACK_KEY": "fallback-secret"}
    fallback = Route(base_url="http://fallback:1", api_key="fallback-secret", concurrency=2)
    assert config.default_route is None
    assert config.has_route("other")
    assert config.route_for("other", environ) == fallback
    assert config.route_for("", environ) == fallback  # how the composition root asks for the default route
    assert config.route_for("*", environ) == fallback
    assert config.route_for("m", environ) == Route(base_url="http://127.0.0.1:9000/v1")
    assert config.resolve_routes(environ) == {"m": Route(base_url="http://127.0.0.1:9000/v1")}  # "*" is no model

    with pytest.raises(InvalidConfiguration) as caught:
        config.resolve_routes({})
    [problem] = caught.value.problems
    assert (problem.source, problem.key) == ("FALLBACK_KEY", 'models."*".api_key_env')
    assert "the default route" in problem.message


def test_models_star_from_the_environment_is_the_default_route() -> None:
    environ = {"FUSILLADE_MODELS": json.dumps({"*": {"base_url": "http://fallback:1"}})}
    config = load_config(environ=environ)
    assert config.route_for("any", {}) == Route(base_url="http://fallback:1")
    assert config.resolve_routes({}) == {}


def test_the_composition_root_routes_unlisted_models_to_models_star(tmp_path: Path) -> None:
    # `composition.routing.Routing` reads keys from the process environment: a route without a key.
    path = write(tmp_path, ROUTE + '[models."*"]\nbase_url = "http://fallback:1"\nconcurrency = 2\n')
    routing = Routing(load_config(path, environ={}))
    assert routing.default == Route(base_url="http://fallback:1", concurrency=2)
    assert routing.routes == {"m": Route(base_url="http://127.0.0.1:9000/v1")}
    assert routing.accepts("other")


@pytest.mark.parametrize(
    ("file", "environ", "source"),
    [
        (STAR_ROUTE + '[default_route]\nbase_url = "http://other:1"\n', {}, "fusillade.toml"),
        (STAR_ROUTE, {"FUSILLADE_DEFAULT_ROUTE": '{"base_url": "http://other:1"}'}, "FUSILLADE_DEFAULT_ROUTE"),
    ],
)
def test_default_route_and_models_star_together_are_refused(
    tmp_path: Path, file: str, environ: dict[str, str], source: str
) -> None:
    problem = only_problem(write(tmp_path, file), environ)
    assert Path(problem.source).name == source
    assert problem.key == "default_route"
    assert 'and so is [models."*"]' in problem.message
    assert "keep only one" in problem.message


def test_a_default_route_laid_over_models_star_wins(tmp_path: Path) -> None:
    # What `fusillade run --model-route '*=URL'` and `serve --mock-upstream` do to a loaded configuration.
    config = load_config(write(tmp_path, STAR_ROUTE), environ={})
    overlaid = config.model_copy(update={"default_route": RouteSection(base_url="http://overlay:1")})
    assert overlaid.route_for("other", {}) == Route(base_url="http://overlay:1")
    assert overlaid.resolve_routes({}) == {"m": Route(base_url="http://127.0.0.1:9000/v1")}  # no key needed


def test_the_admin_key_variable_must_be_set_when_named() -> None:
    config = load_config(environ={"FUSILLADE_AUTH__ADMIN_KEY_ENV": "ADMIN_KEY"})
    with pytest.raises(InvalidConfiguration, match=r"ADMIN_KEY: auth\.admin_key_env: is not set"):
        config.admin_key({})
    assert config.admin_key({"ADMIN_KEY": "admin-secret"}) == "admin-secret"


# ------------------------------------------------------------------------------------------------- display


def test_the_redacted_view_holds_no_secret(tmp_path: Path) -> None:
    path = write(tmp_path, ROUTE + 'api_key_env = "M_KEY"\n')
    environ = {"FUSILLADE_DATABASE_URL": "postgresql://app:hunter2@db:5432/f?sslmode=require", "M_KEY": "sk-123"}
    config = load_config(path, environ=environ)
    config.resolve_routes(environ)
    view = config.redacted()
    text = json.dumps(view)
    assert "hunter2" not in text
    assert "sk-123" not in text
    assert view["database_url"] == "postgresql://app:***@db:5432/f?sslmode=require"
    assert view["config_file"] == str(path)
    assert view["models"]["m"]["api_key_env"] == "M_KEY"
    assert view["daemon"]["commit_max_delay"] == "5ms"
    assert view["models"]["m"]["timeouts"]["total"] == "30m"
    assert view["uploads"]["max_bytes"] == "200MiB"
    hidden = load_config(environ={"FUSILLADE_DATABASE_URL": "postgresql://db/f?password=hunter2"}).redacted()
    assert "hunter2" not in hidden["database_url"]
    assert Config().redacted()["database_url"] == "sqlite:///./fusillade.db"


def test_the_redacted_view_reads_back_as_the_same_configuration(tmp_path: Path) -> None:
    config = load_config(EXAMPLE, environ={})
    view = config.redacted()
    del view["config_file"]
    assert Config.model_validate(view).model_dump() == config.model_dump()


def test_restart_keys_are_reported() -> None:
    before = Config()
    after = Config.model_validate({"server": {"port": 1}, "daemon": {"claim_batch_size": 3}})
    assert before.restart_required(after) == ["server"]
    assert before.restart_required(before) == []


def test_dotted_keys_quote_what_is_not_a_bare_key() -> None:
    assert (
        dotted_key(("models", "meta-llama/Llama-3", "timeouts", "idle"))
        == 'models."meta-llama/Llama-3".timeouts.idle'
    )
    assert dotted_key(("daemon", "batch_metadata_headers", 2)) == "daemon.batch_metadata_headers[2]"


# ---------------------------------------------------------------------------------------------- the docs


def test_the_example_file_loads() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.has_route("meta-llama/Llama-3.1-8B-Instruct")
    assert config.daemon_settings() == DaemonSettings()  # the example shows the defaults
    environ = {"OPENAI_API_KEY": "k", "LOCAL_UPSTREAM_KEY": "l"}
    routes = config.resolve_routes(environ)
    assert set(routes) == {"gpt-4o-mini", "meta-llama/Llama-3.1-8B-Instruct"}
    assert routes["gpt-4o-mini"].timeouts == PhaseTimeouts()
    assert routes["gpt-4o-mini"].requests_per_minute == 4500
    assert routes["meta-llama/Llama-3.1-8B-Instruct"].requests_per_minute is None
    assert config.route_for("unlisted", environ) == Route(
        base_url="http://127.0.0.1:8001/v1", api_key="l", concurrency=8
    )


def _leaf_keys(model: type[Any], prefix: str = "") -> list[str]:
    """Dotted keys of every setting (not of the tables), model tables written `models.<key>`."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        candidates = (field.annotation, *getattr(field.annotation, "__args__", ()))
        tables = [candidate for candidate in candidates if hasattr(candidate, "model_fields")]
        keys.extend(_leaf_keys(tables[0], f"{prefix}{name}.") if tables else [prefix + name])
    return keys


def test_every_key_is_documented_and_in_the_example() -> None:
    documented = (DOCS / "configuration.md").read_text(encoding="utf-8")
    example = EXAMPLE.read_text(encoding="utf-8")
    keys = _leaf_keys(Config)
    assert "daemon.retry.max_attempts" in keys
    for key in keys:
        leaf = key.rsplit(".", 1)[-1]
        assert f"`{leaf}`" in documented, key
        assert leaf in example, key


def test_a_fallback_must_be_another_model_with_a_table_of_its_own(tmp_path: Path) -> None:
    for fallback in ("nowhere", "m", "*"):
        path = write(tmp_path, ROUTE + f'fallback = "{fallback}"\n')
        problem = only_problem(path)
        assert f"models.\"m\".fallback = '{fallback}'" in problem.message, problem.message
        assert "another model with a table of its own" in problem.message
    path = write(tmp_path, ROUTE + 'fallback_when_remaining = "1h"\n')
    assert "without fallback" in only_problem(path).message


def test_a_fallback_route_is_read_from_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        ROUTE + 'fallback = "big"\nfallback_when_remaining = "2h"\n[models.big]\nbase_url = "http://big:1"\n',
    )
    route = load_config(path, environ={}).route_for("m")
    assert route is not None
    assert (route.fallback, route.fallback_when_remaining) == ("big", timedelta(hours=2))
