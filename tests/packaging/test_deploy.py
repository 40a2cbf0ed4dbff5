"""The deployment recipes, checked without Docker, systemd or Kubernetes: every `fusillade` command line they
hold is read by the CLI's own parser, every file they name exists, the configuration they give loads, their
health checks ask real routes, and their stop timeouts leave the daemon its shutdown grace.

Covers the Dockerfile and .dockerignore, deploy/compose.yaml with deploy/fusillade.toml, and
deploy/systemd/*.service. The examples of docs/deploy.md and README.md, and `make serve`/`make lint`, are checked
in `test_deploy_docs.py`."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from datetime import timedelta
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from fusillade.config import Config, load_config
from fusillade.mock_upstream import Behaviour, MockUpstream
from tests.packaging.commands import UsageError, parse
from tests.packaging.conftest import CHECKOUT, DOCKERFILE, clean_environment
from tests.packaging.recipes import (
    DEFAULTS,
    HTTP_DRAIN,
    SHELL,
    Stage,
    api_routes,
    check_cli,
    dockerfile_environment,
    dockerfile_stages,
    fusillade_arguments,
)
from tests.support.processes import Processes

pytestmark = pytest.mark.packaging

DOCKERIGNORE = CHECKOUT / ".dockerignore"
COMPOSE = CHECKOUT / "deploy" / "compose.yaml"
SYSTEMD_UNITS = sorted((CHECKOUT / "deploy" / "systemd").glob("*.service"))


def mock_upstream_get_routes() -> set[str]:
    router = MockUpstream(Behaviour()).make_app().router
    return {route.resource.canonical for route in router.routes() if route.method == "GET" and route.resource}


def seconds(duration: str) -> timedelta:
    """A Compose or systemd duration: `45s`, `1m30s`, `2min`, or a number of seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    if re.fullmatch(r"\d+(\.\d+)?", duration):
        return timedelta(seconds=float(duration))
    parts = re.findall(r"(\d+(?:\.\d+)?)([a-z]+)", duration)
    assert "".join(number + unit for number, unit in parts) == duration, f"not a duration: {duration!r}"
    return timedelta(seconds=sum(float(number) * units[unit] for number, unit in parts))


def test_the_command_checker_refuses_what_the_cli_refuses() -> None:
    for refused in (
        ["serv"],
        ["serve", "--hots", "0.0.0.0"],
        ["daemon", "--metrics-port", "nine"],
        ["keys", "mk"],
    ):
        with pytest.raises(UsageError):
            parse(refused)
    assert parse(["api", "--host", "0.0.0.0", "--port", "8080"]).params["port"] == 8080


# ------------------------------------------------------------------------------------------ the Dockerfile


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context: the last matching rule wins, a rule on a
    directory applies to everything under it."""
    candidates = [str(parent) for parent in reversed(PurePosixPath(path).parents) if str(parent) != "."] + [path]
    excluded = False
    for line in DOCKERIGNORE.read_text().splitlines():
        rule = line.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if any(fnmatch(candidate, pattern) for candidate in candidates):
            excluded = not negated
    return excluded


def test_the_image_runs_fusillade_serve_on_every_interface(image: Stage) -> None:
    command = json.loads(image.one("CMD"))

    context = check_cli(command)
    assert context.info_name == "serve"
    assert context.params["host"] == "0.0.0.0"
    assert re.fullmatch(r"python:3\.1[1-3]-slim", image.base), image.base


def test_the_image_keeps_its_sqlite_database_in_the_volume_as_a_user(image: Stage) -> None:
    environment = dockerfile_environment(image)
    config = load_config(None, environ=environment)
    [volume] = json.loads(image.one("VOLUME"))
    user = image.one("USER")

    assert config.database_url == "sqlite:////data/fusillade.db"
    assert PurePosixPath(config.database_url.removeprefix("sqlite:///")).parent == PurePosixPath(volume)
    assert image.one("WORKDIR") == volume
    assert re.fullmatch(r"\d+(:\d+)?", user) and int(user.split(":")[0]) != 0, f"USER {user}: numeric, not root"
    assert image.one("EXPOSE") == str(config.server.port)


def test_the_image_is_built_from_files_in_the_context(image: Stage) -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    builder_names = {stage.name for stage in stages[:-1]}
    copied = [
        source
        for stage in stages
        for arguments in stage.all("COPY")
        if not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    ]

    assert copied, "the builder copies the sources"
    for source in copied:
        assert (CHECKOUT / source).exists(), source
        assert not dockerignored(source), f"{source} is excluded by .dockerignore"
    assert not dockerignored("src/fusillade/storage/sqlite/migrations/0001_initial.sql")
    for unwanted in (".venv/bin/python", "fusillade.db", "tests/conftest.py", "src/fusillade/__pycache__/a.pyc"):
        assert dockerignored(unwanted), f"{unwanted} would be sent to the Docker daemon"
    mounted = re.findall(r"--mount=type=bind,from=(\w+)", " ".join(image.all("RUN")))
    assert mounted and set(mounted) <= builder_names


def healthcheck_code(image: Stage) -> str:
    arguments = image.one("HEALTHCHECK")
    command = json.loads(arguments[arguments.index("CMD ") + len("CMD ") :])
    assert command[:2] == ["python", "-c"], "slim images have no curl: the check is Python's urllib"
    return str(command[2])


def test_the_image_healthcheck_asks_a_route_of_the_api(image: Stage) -> None:
    paths = re.findall(r"'(/[\w/]*)'", healthcheck_code(image))

    assert paths == ["/healthz"]
    assert set(paths) <= api_routes()


def healthcheck(code: str, port: str) -> subprocess.CompletedProcess[str]:
    """The image's health check as Docker runs it, with the server's port in FUSILLADE_SERVER__PORT."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env=clean_environment({"FUSILLADE_SERVER__PORT": port}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_the_image_healthcheck_passes_on_a_running_server_and_fails_without_one(
    image: Stage, tmp_path: Path
) -> None:
    """The HEALTHCHECK command itself, run against `fusillade serve` on the port it is told, then after it
    stopped."""
    code = healthcheck_code(image)

    async with Processes(tmp_path) as processes:
        _, url = await processes.serve()
        port = str(urlsplit(url).port)
        passing = await asyncio.to_thread(healthcheck, code, port)
        assert await processes.stop() == {"serve": 0}
    failing = await asyncio.to_thread(healthcheck, code, port)

    assert passing.returncode == 0, passing.stderr
    assert failing.returncode != 0


# ------------------------------------------------------------------------------------------------- Compose

_INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, shell: Mapping[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME:?message}` with the variables of `shell`."""

    def replace(match: re.Match[str]) -> str:
        name, operator, word = match.groups()
        if shell.get(name):
            return shell[name]
        if operator and operator.endswith("?"):
            raise AssertionError(f"compose refuses to start without ${name}: {word}")
        return word or ""

    return _INTERPOLATION.sub(replace, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def fusillade_services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if fusillade_arguments(list(service.get("command", []))) is not None
    }


def service_environment(service: Mapping[str, Any], shell: Mapping[str, str]) -> dict[str, str]:
    """What the process sees: the image's ENV, under the service's `environment` (interpolated from `shell`)."""
    image = dockerfile_environment(dockerfile_stages(DOCKERFILE.read_text())[-1])
    own = {name: interpolate(str(value), shell) for name, value in (service.get("environment") or {}).items()}
    return {**image, **own}


def service_config(service: Mapping[str, Any], environment: Mapping[str, str]) -> Config:
    """The configuration the service's process loads: the file FUSILLADE_CONFIG names, found through the
    service's volumes on this machine, with the service's environment."""
    named = environment.get("FUSILLADE_CONFIG")
    path = None
    if named is not None:
        mounts = {target: source for source, target, *_ in (volume.split(":") for volume in service["volumes"])}
        assert named in mounts, f"FUSILLADE_CONFIG={named} is not mounted"
        path = COMPOSE.parent / mounts[named]
    rest = {name: value for name, value in environment.items() if name != "FUSILLADE_CONFIG"}
    return load_config(path, environ=rest)


def command_port(service: Mapping[str, Any], option: str) -> int:
    """The port a service's command listens on: its parsed `option` (`port`, `metrics_port`)."""
    return int(check_cli(list(service["command"])).params[option])


def test_compose_runs_the_fleet(compose: dict[str, Any]) -> None:
    services = compose["services"]
    commands = {
        name: check_cli(list(service["command"])).info_name
        for name, service in fusillade_services(compose).items()
    }

    assert commands == {"migrate": "migrate", "api": "api", "daemon": "daemon", "mock-upstream": "mock-upstream"}
    assert services["daemon"]["deploy"]["replicas"] == 2
    assert services["postgres"]["image"] == "postgres:16"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    for name in ("api", "daemon"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service_name", ["migrate", "api", "daemon", "mock-upstream"])
def test_every_compose_command_is_accepted_by_the_cli(compose: dict[str, Any], service_name: str) -> None:
    check_cli(list(compose["services"][service_name]["command"]))


def test_compose_names_only_files_that_exist(compose: dict[str, Any]) -> None:
    named = 0
    for service in compose["services"].values():
        build = service.get("build")
        if build is not None:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file()
            named += 1
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), volume
                named += 1
    assert named >= 2


@pytest.mark.parametrize("service_name", ["migrate", "api", "daemon"])
def test_the_mounted_configuration_loads_with_the_compose_environment(
    compose: dict[str, Any], service_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    services = compose["services"]
    environment = service_environment(services[service_name], SHELL)

    config = service_config(services[service_name], environment)

    assert not [record for record in caplog.records if record.levelname == "WARNING"], caplog.text
    database = urlsplit(config.database_url)
    postgres = services["postgres"]["environment"]
    assert (database.scheme, database.hostname, database.port) == ("postgresql", "postgres", 5432)
    assert (database.username, database.password) == (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"])
    assert database.path == f"/{postgres['POSTGRES_DB']}"
    if service_name == "api":
        # It listens on 0.0.0.0: without a key it would refuse to start.
        assert config.admin_key(environment) == SHELL["FUSILLADE_ADMIN_KEY"]
    if service_name == "daemon":
        default = config.route_for("any-model")
        assert default is not None
        upstream = urlsplit(default.base_url)
        assert upstream.hostname in services, f"{default.base_url}: no such service"
        assert upstream.port == command_port(services[upstream.hostname], "port")


def test_compose_refuses_to_start_the_api_without_an_admin_key(compose: dict[str, Any]) -> None:
    with pytest.raises(AssertionError, match="FUSILLADE_ADMIN_KEY"):
        service_environment(compose["services"]["api"], {})


def test_compose_stop_grace_periods_cover_the_shutdown(compose: dict[str, Any]) -> None:
    services = compose["services"]
    daemon_config = service_config(services["daemon"], service_environment(services["daemon"], SHELL))

    assert seconds(services["daemon"]["stop_grace_period"]) > daemon_config.daemon.shutdown_grace
    assert seconds(services["api"]["stop_grace_period"]) > HTTP_DRAIN


def healthcheck_url(service: Mapping[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    [url] = re.findall(r"http://[^'\"\s]+", " ".join(test))
    return str(url)


def test_compose_healthchecks_ask_what_each_process_serves(compose: dict[str, Any], image: Stage) -> None:
    services = compose["services"]
    daemon, mock = (
        urlsplit(healthcheck_url(services["daemon"])),
        urlsplit(healthcheck_url(services["mock-upstream"])),
    )

    assert daemon.port == command_port(services["daemon"], "metrics_port") and daemon.path == "/metrics"
    assert mock.port == command_port(services["mock-upstream"], "port")
    assert mock.path in mock_upstream_get_routes()
    # The api keeps the image's HEALTHCHECK, which asks port 8080 unless FUSILLADE_SERVER__PORT says otherwise.
    assert "healthcheck" not in services["api"]
    assert "'8080'" in healthcheck_code(image) and command_port(services["api"], "port") == 8080
    assert services["migrate"]["healthcheck"] == {"disable": True}


# ------------------------------------------------------------------------------------------------- systemd


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every line of a systemd unit, in order (keys may repeat)."""
    section, entries = "", []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("["):
            section = stripped.strip("[]")
            continue
        key, equals, value = stripped.partition("=")
        assert equals, f"{path.name}: {line!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def specifiers(value: str) -> str:
    """The instance specifiers of a template unit, for instance 1."""
    return value.replace("%i", "1").replace("%I", "1")


def test_there_are_units_for_serve_and_for_api_and_daemons() -> None:
    names = {path.name for path in SYSTEMD_UNITS}

    assert names == {"fusillade.service", "fusillade-api.service", "fusillade-daemon@.service"}


@pytest.mark.parametrize("unit", SYSTEMD_UNITS, ids=lambda path: path.name)
def test_systemd_units_run_fusillade_commands_that_parse_and_stop_in_time(unit: Path) -> None:
    entries = unit_entries(unit)
    service = {key: value for section, key, value in entries if section == "Service"}
    environment = dict(
        value.split("=", 1) for section, key, value in entries if section == "Service" and key == "Environment"
    )
    commands = [
        shlex.split(specifiers(value)) for section, key, value in entries if key in ("ExecStart", "ExecStartPre")
    ]

    contexts = [check_cli(command) for command in commands]
    load_config(None, environ={name: value for name, value in environment.items() if name != "FUSILLADE_CONFIG"})
    started = contexts[-1].info_name
    needed = {"serve": DEFAULTS.daemon.shutdown_grace + HTTP_DRAIN, "api": HTTP_DRAIN}.get(
        started, DEFAULTS.daemon.shutdown_grace
    )
    assert seconds(service["TimeoutStopSec"]) > needed
    assert service["User"] == "fusillade" and service["Restart"] == "on-failure"
    assert {section for section, _, _ in entries} == {"Unit", "Service", "Install"}
