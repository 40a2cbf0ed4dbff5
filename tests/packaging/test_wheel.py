"""The release artefacts: what the wheel and the sdist hold, and the installed wheel at work in a virtualenv of
its own, run from outside the checkout: `--version`, `migrate` on both backends, and a 100-request `run`
against the fake upstream."""

from __future__ import annotations

import asyncio
import email
import email.message
import json
import re
import signal
import tarfile
import zipfile
from pathlib import Path

import aiohttp
import pytest

import fusillade
from tests.packaging.conftest import CHECKOUT, TIER_TIMEOUT, Installed, check
from tests.support import polling, postgres

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(TIER_TIMEOUT)]

PACKAGE = CHECKOUT / "src" / "fusillade"
PROJECT_URL = "https://github.com/fusillade-py/fusillade"
REQUESTS = 100


def package_files() -> set[str]:
    """Every file of the package in the checkout, as a path in the wheel (`fusillade/...`); no bytecode."""
    return {
        f"fusillade/{path.relative_to(PACKAGE).as_posix()}"
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def wheel_names(installed: Installed) -> list[str]:
    with zipfile.ZipFile(installed.wheel) as wheel:
        return wheel.namelist()


def wheel_metadata(installed: Installed) -> email.message.Message:
    with zipfile.ZipFile(installed.wheel) as wheel:
        return email.message_from_bytes(wheel.read(f"{dist_info(installed)}/METADATA"))


def dist_info(installed: Installed) -> str:
    return f"fusillade-{fusillade.__version__}.dist-info"


# ------------------------------------------------------------------------------------------------ the wheel


def test_the_wheel_holds_every_file_of_the_package(installed: Installed) -> None:
    names = set(wheel_names(installed))

    assert package_files() - names == set()
    migrations = {
        backend: sorted(
            name
            for name in names
            if name.startswith(f"fusillade/storage/{backend}/migrations/") and name.endswith(".sql")
        )
        for backend in ("sqlite", "postgres")
    }
    for backend, shipped in migrations.items():
        in_checkout = sorted(
            f"fusillade/storage/{backend}/migrations/{path.name}"
            for path in (PACKAGE / "storage" / backend / "migrations").glob("*.sql")
        )
        assert shipped == in_checkout != [], backend
    assert "fusillade/py.typed" in names


def test_the_wheel_holds_nothing_but_the_package_and_its_metadata(installed: Installed) -> None:
    tops = {name.split("/", 1)[0] for name in wheel_names(installed)}

    assert tops == {"fusillade", dist_info(installed)}
    assert not [name for name in wheel_names(installed) if "__pycache__" in name or name.endswith(".pyc")]


def test_the_wheel_carries_the_license_and_its_metadata(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        license_text = wheel.read(f"{dist_info(installed)}/licenses/LICENSE").decode()
        entry_points = wheel.read(f"{dist_info(installed)}/entry_points.txt").decode()
    metadata = wheel_metadata(installed)

    assert license_text == (CHECKOUT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "the fusillade authors" in license_text
    assert metadata["Name"] == "fusillade"
    assert metadata["Version"] == fusillade.__version__
    assert installed.wheel.name == f"fusillade-{fusillade.__version__}-py3-none-any.whl"
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["Requires-Python"] == ">=3.11"
    classifiers = set(metadata.get_all("Classifier") or [])
    assert {
        "Development Status :: 4 - Beta",
        "Framework :: AsyncIO",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Typing :: Typed",
    } <= classifiers
    # PEP 639: the license expression says it all; a license classifier beside it is an error for indexes.
    assert not [classifier for classifier in classifiers if classifier.startswith("License ::")]
    urls = dict(entry.split(", ", 1) for entry in metadata.get_all("Project-URL") or [])
    assert set(urls) == {"Homepage", "Documentation", "Issues", "Source"}
    assert all(url.startswith(PROJECT_URL) for url in urls.values()), urls
    assert re.search(r"^fusillade = fusillade\.cli\.main:main$", entry_points, re.MULTILINE)


def test_the_sdist_holds_the_sources_tests_and_docs_and_no_local_state(installed: Installed) -> None:
    with tarfile.open(installed.sdist) as sdist:
        names = [name.split("/", 1)[1] for name in sdist.getnames() if "/" in name]

    for needed in ("LICENSE", "README.md", "pyproject.toml", "Makefile", "Dockerfile", "deploy/compose.yaml"):
        assert needed in names
    for directory in ("src/fusillade/", "tests/packaging/", "docs/"):
        assert any(name.startswith(directory) for name in names), directory
    assert {f"src/{name}" for name in package_files()} <= set(names)
    unwanted = [
        name
        for name in names
        if name.startswith((".venv/", ".git/", "dist/", "build/"))
        or "__pycache__" in name
        or name.endswith((".db", ".db-wal", ".db-shm", ".pyc"))
    ]
    assert unwanted == []


# ---------------------------------------------------------------------------------- the installed commands


def test_the_installed_package_is_the_wheel_not_the_checkout(installed: Installed) -> None:
    found = check(
        installed.run_python("import fusillade, sys; print(fusillade.__file__); print(sys.prefix)"),
        "python -c 'import fusillade'",
    )
    module, prefix = found.stdout.splitlines()

    assert Path(prefix) == installed.venv
    assert Path(module).is_relative_to(installed.venv / "lib")
    assert not Path(module).is_relative_to(CHECKOUT)


def test_version(installed: Installed) -> None:
    """`fusillade --version` prints the version of the wheel (alone, or after the program's name)."""
    result = check(installed.run("--version"), "fusillade --version")

    assert result.stdout.strip() in (fusillade.__version__, f"fusillade {fusillade.__version__}")


def test_migrate_creates_a_sqlite_database(installed: Installed, tmp_path: Path) -> None:
    database = tmp_path / "x.db"
    migrations = sorted((PACKAGE / "storage" / "sqlite" / "migrations").glob("*.sql"))

    first = check(installed.run("migrate", "--database-url", f"sqlite:///{database}"), "fusillade migrate")
    again = check(installed.run("migrate", "--database-url", f"sqlite:///{database}"), "fusillade migrate again")

    assert database.is_file()
    assert f"applied {len(migrations)} migration(s)" in first.stdout, first.stdout
    assert "up to date" in again.stdout, again.stdout


@pytest.mark.postgres
async def test_migrate_creates_a_postgres_schema(installed: Installed, postgres_server: postgres.Server) -> None:
    url = await postgres.create_database(postgres_server.url)
    migrations = sorted((PACKAGE / "storage" / "postgres" / "migrations").glob("*.sql"))
    try:
        result = await asyncio.to_thread(installed.run, "migrate", "--database-url", url)
    finally:
        await postgres.drop_database(postgres_server.url, url)

    check(result, "fusillade migrate on PostgreSQL")
    assert f"applied {len(migrations)} migration(s)" in result.stdout, result.stdout


async def test_run_sends_100_requests_to_the_mock_upstream(installed: Installed, tmp_path: Path) -> None:
    """The first ten minutes of a user: the fake upstream and `fusillade run` from the installed wheel."""
    requests = tmp_path / "requests.jsonl"
    custom_ids = [f"request-{index}" for index in range(REQUESTS)]
    requests.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": custom_id,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "demo", "messages": [{"role": "user", "content": custom_id}]},
                }
            )
            + "\n"
            for custom_id in custom_ids
        )
    )
    upstream_output, upstream_log = tmp_path / "mock-upstream.out", tmp_path / "mock-upstream.log"
    with upstream_output.open("wb") as stdout, upstream_log.open("wb") as stderr:
        upstream = await asyncio.create_subprocess_exec(
            installed.fusillade,
            "mock-upstream",
            "--port",
            "0",
            cwd=tmp_path,
            env=installed.environment(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    try:

        def first_line() -> str | None:
            assert upstream.returncode is None, upstream_log.read_text()
            line, newline, _ = upstream_output.read_text().partition("\n")
            return line.strip() if newline else None

        url = await polling.until(first_line, within=30, interval=0.05, message="the mock upstream's URL")
        assert url is not None and url.startswith("http://127.0.0.1:"), url

        result = await asyncio.to_thread(
            installed.run, "run", requests.name, "--model-route", f"demo={url}", within=120.0, cwd=tmp_path
        )

        check(result, "fusillade run")
        output = [json.loads(line) for line in (tmp_path / "requests.output.jsonl").read_text().splitlines()]
        assert len(output) == REQUESTS
        assert sorted(line["custom_id"] for line in output) == sorted(custom_ids)
        assert {line["response"]["status_code"] for line in output} == {200}
        async with aiohttp.ClientSession() as http, http.get(f"{url}/stats") as response:
            stats = await response.json()
        assert stats["requests_total"] == REQUESTS, stats
    finally:
        if upstream.returncode is None:
            upstream.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(upstream.wait(), timeout=15)
        except TimeoutError:
            upstream.kill()
            await upstream.wait()
            raise
    assert code == 0, upstream_log.read_text()
