"""Scenario 7, security, against `fusillade serve` (and `fusillade api` + `fusillade daemon`) as processes:

- tenancy: owner B gets, for each of owner A's files, batches and requests, on every route, the very answer
  (status, headers, body) it gets for a random well-formed id; A's objects are untouched afterwards;
- API keys made with `fusillade keys create` are stored only as SHA-256 (every value of every table, and the
  SQLite files' raw bytes, are searched); a key revoked with `fusillade keys revoke` while the API runs fails
  from the very next request;
- logs: a whole batch at `--log-level debug`, with an upstream key, client keys, markers in request and
  response bodies and failing requests: no line of any process holds a key or a marker;
- the JSONL `url` (and everything else in a line or a batch) never sends a call anywhere but the route's host
  and base path: hostile urls are refused at upload, naming their lines; a decoy upstream receives nothing.

`tests/e2e/test_api_access.py` covers the 404s of another owner's objects on an in-process API; this file adds the
equality with missing ids, output and error files, cursors, idempotency keys, and real processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
import pytest

from fusillade import api_keys
from fusillade.domain import ids
from fusillade.mock_upstream import Behaviour, HttpError, MockUpstream, StallBeforeFirstByte
from tests.support import backends, polling, security
from tests.support.processes import Processes

pytestmark = pytest.mark.reliability

CHAT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
KEY_FRAGMENT = len(api_keys.KEY_PREFIX) + 9
"""Length of the key fragments searched for: one character more than the stored prefix."""
ADMIN_KEY_VARIABLE = "SECURITY_ADMIN_KEY"
COMMON_CONFIG = f"""
[auth]
admin_key_env = "{ADMIN_KEY_VARIABLE}"  # with an admin key the API needs keys from the start: no open mode

[daemon]
idle_poll_interval = "100ms"
maintenance_interval = "100ms"
cancellation_poll_interval = "50ms"
shutdown_grace = "1s"
batch_metadata_headers = ["team"]

[daemon.retry]
base_delay = "10ms"
max_delay = "50ms"
max_attempts = 2
"""


# ------------------------------------------------------------------------------------------- helpers


def database_url(backend: backends.Backend) -> str:
    return backend.location if backend.is_postgres else f"sqlite:///{backend.location}"


def write_config(directory: Path, body: str, *, database: str | None = None) -> Path:
    path = directory / "fusillade.toml"
    head = f'database_url = "{database}"\n' if database is not None else ""
    path.write_text(head + COMMON_CONFIG + body)
    return path


def admin_environment() -> dict[str, str]:
    return {ADMIN_KEY_VARIABLE: f"fus_admin-{uuid.uuid4().hex}"}


def line(custom_id: str, *, model: str = "model-a", url: str = CHAT, **body: Any) -> dict[str, Any]:
    content = body.pop("content", f"hello from {custom_id}")
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": model, "messages": [{"role": "user", "content": content}], **body},
    }


def with_body(item: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """`item` with more fields in its body (any name, `url` included)."""
    return {**item, "body": {**item["body"], **fields}}


def jsonl(items: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(item) + b"\n" for item in items)


async def stored_values(backend: backends.Backend) -> tuple[list[security.Cell], list[bytes]]:
    """Every stored value; for SQLite also the raw bytes of the database, WAL and shared-memory files."""
    if backend.is_postgres:
        return await security.postgres_cells(backend.location), []
    path = Path(backend.location)
    files = [candidate for candidate in path.parent.glob(path.name + "*") if candidate.is_file()]
    return security.sqlite_cells(path), [candidate.read_bytes() for candidate in files]


def secret_needles(secret: str) -> set[str]:
    """What betrays a stored or logged key: a fragment one character longer than the stored prefix, or its hex."""
    return security.fragments(secret, KEY_FRAGMENT) | {secret.encode().hex()}


class Caller:
    """HTTP calls with one bearer key: (status, headers, body parsed when JSON)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, key: str) -> None:
        self.http = http
        self.url = url
        self.key = key

    async def call(self, method: str, path: str, **options: Any) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {self.key}", **options.pop("headers", {})}
        async with self.http.request(method, self.url + path, headers=headers, **options) as response:
            raw = await response.read()
            body = orjson.loads(raw) if response.content_type == "application/json" else raw
            return response.status, dict(response.headers), body

    async def upload(self, content: bytes, filename: str = "input.jsonl") -> dict[str, Any]:
        status, _, body = await self.call("POST", "/v1/files", data=form(content, filename))
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    async def create_batch(self, file_id: str, **options: Any) -> dict[str, Any]:
        headers = options.pop("headers", {})
        payload = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", **options}
        status, _, body = await self.call("POST", "/v1/batches", json=payload, headers=headers)
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    async def batch_when(self, batch_id: str, done: Callable[[dict[str, Any]], bool], within: float = 20) -> Any:
        async def check() -> dict[str, Any] | None:
            status, _, batch = await self.call("GET", f"/v1/batches/{batch_id}")
            assert status == 200, batch
            return batch if done(batch) else None

        return await polling.until(check, within=within, interval=0.05, message=f"batch {batch_id}")

    async def finished(self, batch_id: str) -> dict[str, Any]:
        return await self.batch_when(batch_id, lambda batch: batch["status"] in TERMINAL)  # type: ignore[no-any-return]


def form(content: bytes, filename: str = "input.jsonl") -> aiohttp.FormData:
    data = aiohttp.FormData(quote_fields=False)
    data.add_field("purpose", "batch")
    data.add_field("file", content, filename=filename, content_type="application/octet-stream")
    return data


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# ------------------------------------------------------------------------------------------- tenancy


def random_id_like(wire: str) -> str:
    """A well-formed id of the same kind as `wire` that names nothing."""
    if wire.startswith(ids.REQUEST_PREFIX):  # before BATCH_PREFIX, its beginning
        return ids.request_wire(ids.new_request_id())
    if wire.startswith(ids.BATCH_PREFIX):
        return ids.batch_wire(ids.new_batch_id())
    if wire.startswith(ids.FILE_PREFIX):
        return ids.file_wire(ids.new_file_id())
    raise ValueError(wire)


def normalised(answer: tuple[int, dict[str, str], Any], wire: str) -> tuple[int, dict[str, str], str]:
    """An answer with the probed id (and its bare hex form) written `<id>`, and without its Date."""
    status, headers, body = answer
    text = body.decode(errors="replace") if isinstance(body, bytes) else orjson.dumps(body).decode()
    bare = wire.split("-", 1)[-1].rsplit("_", 1)[-1]
    text = text.replace(wire, "<id>").replace(bare, "<hex>")
    return status, {name.lower(): value for name, value in headers.items() if name.lower() != "date"}, text


async def test_owner_b_gets_for_owner_a_objects_the_answer_of_a_missing_id(
    backend: backends.Backend, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    behaviour = Behaviour(
        faults_by_custom_id={"a-fails": [HttpError(400)], "a-stalls": [StallBeforeFirstByte(None)]}
    )
    async with (
        MockUpstream(behaviour) as upstream,
        Processes(tmp_path, environment=admin_environment()) as fleet,
    ):
        config = write_config(
            tmp_path,
            f'[models."model-a"]\nbase_url = "{upstream.url}"\nconcurrency = 4\n',
            database=database_url(backend),
        )
        (_, url), (alice_key, _), (bob_key, _) = await security.together(
            fleet.serve("--config", str(config)),
            security.create_key(fleet, config, "alice"),
            security.create_key(fleet, config, "bob"),
        )
        alice, bob = Caller(http, url, alice_key), Caller(http, url, bob_key)

        # A: a finished batch with an output and an error file, and a batch with a call in flight.
        done_input = await alice.upload(jsonl([line("a-1"), line("a-2"), line("a-fails")]))
        done = await alice.create_batch(done_input["id"], headers={"Idempotency-Key": "same-key"})
        done = await alice.finished(done["id"])
        assert (done["status"], done["request_counts"]) == ("completed", {"total": 3, "completed": 2, "failed": 1})
        running_input = await alice.upload(jsonl([line("a-stalls")]))
        running = await alice.create_batch(running_input["id"])

        async def in_flight() -> bool:
            _, _, page = await alice.call("GET", f"/v1/batches/{running['id']}/requests")
            return [item["state"] for item in page["data"]] == ["processing"]

        await polling.until(in_flight, within=20, interval=0.05, message="a call in flight, marked processing")
        _, _, done_requests = await alice.call("GET", f"/v1/batches/{done['id']}/requests")
        request_ids = [item["id"] for item in done_requests["data"]]
        alice_files = [done_input["id"], running_input["id"], done["output_file_id"], done["error_file_id"]]
        alice_batches = [done["id"], running["id"]]

        # B: its own file and batch, made with A's idempotency key.
        bob_input = await bob.upload(jsonl([line("b-1")]))
        bob_batch = await bob.create_batch(bob_input["id"], headers={"Idempotency-Key": "same-key"})
        assert bob_batch["id"] not in alice_batches and bob_batch["input_file_id"] == bob_input["id"]
        assert (await bob.finished(bob_batch["id"]))["status"] == "completed"

        async def alice_view() -> list[Any]:
            seen = []
            for file_id in alice_files:
                seen += [
                    await alice.call("GET", f"/v1/files/{file_id}"),
                    await alice.call("GET", f"/v1/files/{file_id}/content"),
                ]
            for batch_id in alice_batches:
                seen += [
                    await alice.call("GET", f"/v1/batches/{batch_id}"),
                    await alice.call("GET", f"/v1/batches/{batch_id}/requests"),
                ]
            return [(status, body) for status, _, body in seen]

        before = await alice_view()
        assert all(status == 200 for status, _ in before)

        probes: list[tuple[str, str, str, dict[str, Any]]] = []
        for file_id in alice_files:
            probes += [
                ("GET", "/v1/files/{}", file_id, {}),
                ("GET", "/v1/files/{}/content", file_id, {}),
                ("DELETE", "/v1/files/{}", file_id, {}),
                ("POST", "/v1/batches", file_id, {"json": {"input_file_id": "{}", "endpoint": CHAT}}),
                ("GET", "/v1/files?after={}", file_id, {}),
            ]
        for batch_id in alice_batches:
            probes += [
                ("GET", "/v1/batches/{}", batch_id, {}),
                ("GET", "/v1/batches/{}/requests", batch_id, {}),
                ("GET", "/v1/batches/{}/requests?state=failed", batch_id, {}),
                ("POST", "/v1/batches/{}/cancel", batch_id, {}),
                ("POST", "/v1/batches/{}/retry", batch_id, {}),
                ("GET", "/v1/batches?after={}", batch_id, {}),
            ]
        for request_id in request_ids:
            probes.append(("GET", f"/v1/batches/{bob_batch['id']}/requests?after={{}}", request_id, {}))

        statuses = set()
        for method, path, wire, options in probes:
            missing = random_id_like(wire)
            answers = []
            for target in (wire, missing):
                filled = {"json": {**options["json"], "input_file_id": target}} if options else {}
                answers.append(normalised(await bob.call(method, path.format(target), **filled), target))
            assert answers[0] == answers[1], (method, path, wire)
            statuses.add(answers[0][0])
            if "after=" not in path:
                assert answers[0][0] == 404 and '"code":"not_found"' in answers[0][2], (method, path, answers[0])
        assert statuses == {404, 400}  # cursors of another owner's list: the 400 of an unknown cursor

        _, _, bob_files = await bob.call("GET", "/v1/files")
        _, _, bob_batches = await bob.call("GET", "/v1/batches")
        assert {item["id"] for item in bob_files["data"]}.isdisjoint(alice_files)
        assert [item["id"] for item in bob_batches["data"]] == [bob_batch["id"]]

        assert await alice_view() == before, "owner B changed owner A's objects"
        assert upstream.stats.in_flight == 1, "the stalled call of A's running batch was not cancelled"
        status, _, cancelling = await alice.call("POST", f"/v1/batches/{running['id']}/cancel")
        assert status == 200 and cancelling["status"] in ("cancelling", "cancelled")
        status, _, retried = await alice.call("POST", f"/v1/batches/{done['id']}/retry")
        assert status == 200 and retried["status"] == "in_progress"
        await alice.batch_when(running["id"], lambda batch: batch["status"] == "cancelled")
        again = await alice.batch_when(done["id"], lambda batch: batch["status"] == "completed")
        assert again["request_counts"] == {"total": 3, "completed": 3, "failed": 0}


# ---------------------------------------------------------------------------------------------- keys


async def test_keys_are_stored_hashed_and_a_revoked_key_fails_on_its_next_request(
    backend: backends.Backend, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    environment = admin_environment()
    admin_key = environment[ADMIN_KEY_VARIABLE]
    async with (
        MockUpstream(Behaviour()) as upstream,
        Processes(tmp_path, environment=environment) as fleet,
    ):
        config = write_config(
            tmp_path, f'[models."model-a"]\nbase_url = "{upstream.url}"\n', database=database_url(backend)
        )
        (serve, url), (alice_key, _), (bob_key, bob_id) = await security.together(
            fleet.serve("--config", str(config)),
            security.create_key(fleet, config, "alice"),
            security.create_key(fleet, config, "bob"),
        )
        alice, bob, admin = Caller(http, url, alice_key), Caller(http, url, bob_key), Caller(http, url, admin_key)
        assert (await bob.call("GET", "/v1/batches"))[0] == 200
        batch = await alice.create_batch((await alice.upload(jsonl([line("k-1"), line("k-2")])))["id"])
        assert (await alice.finished(batch["id"]))["status"] == "completed"
        assert (await admin.call("GET", f"/v1/batches/{batch['id']}"))[0] == 200

        # Bob's key in a loop, one request after the other, while the CLI revokes it.
        attempts: list[tuple[float, int]] = []
        stop = asyncio.Event()

        async def hammer() -> None:
            while not stop.is_set():
                started = time.monotonic()
                attempts.append((started, (await bob.call("GET", "/v1/batches"))[0]))

        hammering = asyncio.create_task(hammer())
        try:
            await polling.until(lambda: len(attempts) >= 3, within=10, message="bob's first requests")
            code, _, stderr = await fleet.cli("keys", "revoke", bob_id, "--config", str(config))
            revoked = time.monotonic()
            assert code == 0, stderr
            next_status, _, next_body = await bob.call("GET", "/v1/files")
            await polling.until(
                lambda: sum(started > revoked for started, _ in attempts) >= 5, within=10, message="more requests"
            )
        finally:
            stop.set()
            await hammering
        assert (next_status, next_body["error"]["code"]) == (401, "invalid_api_key")
        after = [status for started, status in attempts if started > revoked]
        assert set(after) == {401}, f"{after.count(200)} requests succeeded after the revocation"
        assert attempts[0][1] == 200
        for caller in (alice, admin):
            assert (await caller.call("GET", "/v1/batches"))[0] == 200
        assert await serve.stop() == 0

    cells, raw_files = await stored_values(backend)
    secrets = {"alice": alice_key, "bob": bob_key, "admin": admin_key}
    for who, secret in secrets.items():
        needles = secret_needles(secret)
        found = [(cell.table, cell.column) for cell in cells if any(needle in cell.value for needle in needles)]
        assert found == [], f"{who}'s key is stored in {found}"
        for raw in raw_files:
            assert not any(needle.encode() in raw for needle in needles), f"{who}'s key is in a database file"
    for who in ("alice", "bob"):
        digest = hashlib.sha256(secrets[who].encode()).hexdigest()
        assert any(cell.value == digest for cell in cells), f"the scan did not find {who}'s hash"


# ---------------------------------------------------------------------------------------------- logs


def with_password(url: str, password: str) -> tuple[str, str]:
    """`url` with `password` unless it has one already; (the URL, its password)."""
    parts = urlsplit(url)
    if parts.password:
        return url, parts.password
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), password


async def test_no_key_body_or_marker_reaches_any_log_line(
    backend: backends.Backend, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    run = uuid.uuid4().hex
    markers = {
        name: f"{name}-marker-{run}"
        for name in ("request", "system", "field", "response", "metadata", "filename", "refused", "wrong-key")
    }
    environment = {**admin_environment(), "SECURITY_UPSTREAM_KEY": f"sk-upstream-{uuid.uuid4().hex}"}
    secrets = {"upstream key": environment["SECURITY_UPSTREAM_KEY"], "admin key": environment[ADMIN_KEY_VARIABLE]}
    if backend.is_postgres:  # the URL, with a password, through the environment as the docs advise
        environment["FUSILLADE_DATABASE_URL"], secrets["database password"] = with_password(
            backend.location, f"pw-{uuid.uuid4().hex}"
        )
    async with (
        security.RecordingUpstream(marker=markers["response"], api_key=secrets["upstream key"]) as upstream,
        Processes(tmp_path, environment=environment) as fleet,
    ):
        route = f'base_url = "{upstream.url}/v1"\napi_key_env = "SECURITY_UPSTREAM_KEY"\nconcurrency = 4\n'
        config = write_config(
            tmp_path,
            f"[models.plain]\n{route}\n[models.streamed]\n{route}stream = true\n",
            database=None if backend.is_postgres else database_url(backend),
        )
        arguments = ("--config", str(config), "--log-level", "debug")
        if backend.is_postgres:
            fleet.start("daemon", "daemon", *arguments)
            started = fleet.serve(*arguments, command="api")
        else:
            started = fleet.serve(*arguments)
        (_, url), (secrets["client key"], _) = await security.together(
            started, security.create_key(fleet, config, "alice")
        )
        alice = Caller(http, url, secrets["client key"])
        admin = Caller(http, url, secrets["admin key"])

        def marked(custom_id: str, model: str = "plain") -> dict[str, Any]:
            item = line(custom_id, model=model, content=f"{markers['request']} of {custom_id}")
            item["body"]["messages"].insert(0, {"role": "system", "content": markers["system"]})
            item["body"]["user"] = markers["field"]
            return item

        failing = ["client-error-1", "server-error-1", "rate-limited-1", "embedded-error-1", "not-json-1"]
        items = [marked(f"ok-{n}") for n in range(3)] + [marked(custom_id) for custom_id in failing]
        items += [marked("ok-stream-1", "streamed"), marked("stream-error-1", "streamed")]
        uploaded = await alice.upload(jsonl(items), filename=f"{markers['filename']}.jsonl")
        refused = jsonl([marked("x-1"), {**marked("x-2"), "url": f"/v1/{markers['refused']}"}]) + b"\xff\n"
        status, _, body = await alice.call("POST", "/v1/files", data=form(refused))
        assert status == 400 and markers["refused"] in body["error"]["message"]
        status, _, body = await alice.call(
            "POST",
            "/v1/batches",
            json={"input_file_id": uploaded["id"], "metadata": {"team": [markers["refused"]]}},
        )
        assert status == 400, body
        wrong = Caller(http, url, f"fus_{markers['wrong-key']}")
        assert (await wrong.call("GET", "/v1/batches"))[0] == 401
        batch = await alice.create_batch(uploaded["id"], metadata={"team": markers["metadata"]})
        batch = await alice.finished(batch["id"])
        assert (await admin.call("GET", f"/v1/batches/{batch['id']}"))[0] == 200
        _, _, output = await alice.call("GET", f"/v1/files/{batch['output_file_id']}/content")
        _, _, errors = await alice.call("GET", f"/v1/files/{batch['error_file_id']}/content")
        for process in fleet.started:
            assert await process.stop() == 0, process.output()[-4000:]

    # The markers went all the way through: into the upstream's calls and back into the results.
    assert batch["request_counts"] == {"total": len(items), "completed": 6, "failed": 4}, errors
    assert markers["response"] in output.decode() and markers["response"] in errors.decode()
    assert all(markers["request"].encode() in call.body for call in upstream.calls)
    assert {call.headers.get("authorization") for call in upstream.calls} == {f"Bearer {secrets['upstream key']}"}
    assert any(call.headers.get("x-fusillade-batch-team") == markers["metadata"] for call in upstream.calls)

    cells, raw_files = await stored_values(backend)
    for name in ("upstream key", "admin key", "client key"):
        needles = secret_needles(secrets[name])
        assert not any(needle in cell.value for cell in cells for needle in needles), f"the {name} is stored"
        assert not any(needle.encode() in raw for raw in [*raw_files, output, errors] for needle in needles), name

    lines = [text for process in fleet.started for text in process.output().splitlines()]
    assert any("upstream call for" in text for text in lines), "no debug line: is the log level debug?"
    needles = dict(markers.items())
    for name, secret in secrets.items():
        needles |= {f"{name} ({fragment})": fragment for fragment in security.fragments(secret, KEY_FRAGMENT)}
    leaks = [f"{name}: {text}" for text in lines for name, needle in needles.items() if needle in text]
    assert leaks == [], "\n".join(leaks[:20])


# ------------------------------------------------------------------------------------------ hostile url


def hostile_urls(decoy: str) -> list[str]:
    """`url` values that try to name another host or path; `decoy` is `HOST:PORT` of an upstream to spare."""
    return [
        f"http://{decoy}/v1/chat/completions",
        f"https://{decoy}/v1/chat/completions",
        f"HTTP://{decoy}/v1/chat/completions",
        f"//{decoy}/v1/chat/completions",
        f"///{decoy}/v1/chat/completions",
        f"{decoy}/v1/chat/completions",
        f"localhost:{decoy.rsplit(':', 1)[1]}/v1/chat/completions",
        f"@{decoy}/v1/chat/completions",
        f"/v1/chat/completions@{decoy}",
        f"http://127.0.0.1@{decoy}/v1/chat/completions",
        f"http://{decoy}#@127.0.0.1/v1/chat/completions",
        f"/v1/chat/completions/../../../{decoy}",
        "/v1/../v1/chat/completions",
        "/v1/chat/completions/..",
        "/v1/chat/./completions",
        "/v1/chat/%2e%2e/completions",
        "/v1/chat%2Fcompletions",
        f"/%2F%2F{decoy}/v1/chat/completions",
        f"%2F%2F{decoy}%2Fv1%2Fchat%2Fcompletions",
        f"\\\\{decoy}\\v1\\chat\\completions",
        f"/\\{decoy}/v1/chat/completions",
        "\\v1\\chat\\completions",
        "/v1/chat/completions\\..\\..\\admin",
        f"/v1/chat/completions?next=http://{decoy}/",
        f"/v1/chat/completions#http://{decoy}",
        f"/v1/chat/completions\r\nHost: {decoy}",
        "/v1/chat/completions\x00",
        "\uff0fv1\uff0fchat\uff0fcompletions",
        "/v1/chat/completions/",
        " /v1/chat/completions",
        "v1/chat/completions",
        "/V1/CHAT/COMPLETIONS",
        "",
    ]


async def test_no_line_can_send_a_call_to_another_host_or_path(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        security.RecordingUpstream(marker="decoy") as decoy,
        security.RecordingUpstream(marker="good", redirect_to=decoy.url) as good,
        Processes(tmp_path, environment=admin_environment()) as fleet,
    ):
        decoy_address = f"127.0.0.1:{decoy.port}"
        config = write_config(
            tmp_path,
            f'[models."model-a"]\nbase_url = "{good.url}/gateway/v1"\n\n'
            f'[models."*"]\nbase_url = "{good.url}/default/v1"\n',
            database=f"sqlite:///{tmp_path / 'fusillade.db'}",
        )
        (_, url), (key, _) = await security.together(
            fleet.serve("--config", str(config)), security.create_key(fleet, config, "alice")
        )
        alice = Caller(http, url, key)

        urls = hostile_urls(decoy_address)
        content = jsonl([line("fine"), *(line(f"hostile-{n}", url=value) for n, value in enumerate(urls))])
        status, _, body = await alice.call("POST", "/v1/files", data=form(content))
        assert status == 400, body
        assert body["error"]["code"] == "invalid_file"
        listed = {item["line"]: item["message"] for item in body["error"]["lines"]}
        assert sorted(listed) == list(range(2, len(urls) + 2)), listed
        assert all("url" in message for message in listed.values()), listed
        assert (await alice.call("GET", "/v1/files"))[2]["data"] == []

        # Everything else a line or a batch holds is data: hostile models, body fields and metadata.
        tricks = [
            with_body(line("body-fields"), api_base=f"http://{decoy_address}/v1", url=f"http://{decoy_address}/v1",
                      base_url=f"http://{decoy_address}/v1", extra_headers={"Host": decoy_address}),
            *(line(f"model-{n}", model=model) for n, model in enumerate([
                f"http://{decoy_address}/v1", f"//{decoy_address}", f"@{decoy_address}", f"../../{decoy_address}",
                "..\\..\\admin", f"%2F%2F{decoy_address}", f"model-a/../../{decoy_address}",
            ])),
            line("redirect-1"),  # the route's upstream answers 307 to the decoy: not followed
        ]  # fmt: skip
        for bad_endpoint in (f"http://{decoy_address}{CHAT}", f"//{decoy_address}{CHAT}", f"{CHAT}/../../x"):
            file_id = (await alice.upload(jsonl([line("endpoint")])))["id"]
            status, _, body = await alice.call(
                "POST", "/v1/batches", json={"input_file_id": file_id, "endpoint": bad_endpoint}
            )
            assert (status, body["error"]["param"]) == (400, "endpoint"), body
        batch = await alice.create_batch(
            (await alice.upload(jsonl(tricks)))["id"], metadata={"team": f"x\r\nHost: {decoy_address}"}
        )
        batch = await alice.finished(batch["id"])
        assert batch["request_counts"] == {"total": len(tricks), "completed": len(tricks) - 1, "failed": 1}, batch
        _, _, failed = await alice.call("GET", f"/v1/batches/{batch['id']}/requests?state=failed")
        assert [(item["custom_id"], item["response"]["status_code"]) for item in failed["data"]] == [
            ("redirect-1", 307)
        ]
        expected_calls = len(tricks)

        # A custom_id cannot smuggle a header: refused at upload, or sent without its line breaks.
        smuggling = jsonl([line(f"c\r\nHost: {decoy_address}"), line(f"c\nX-Forwarded-Host: {decoy_address}")])
        status, _, body = await alice.call("POST", "/v1/files", data=form(smuggling))
        if status == 200:
            smuggled = await alice.finished((await alice.create_batch(body["id"]))["id"])
            assert smuggled["request_counts"]["completed"] == 2, smuggled
            expected_calls += 2
        else:
            assert status == 400 and [item["line"] for item in body["error"]["lines"]] == [1, 2], body

    assert decoy.calls == []
    assert len(good.calls) == expected_calls
    assert {call.host for call in good.calls} == {f"127.0.0.1:{good.port}"}
    for call in good.calls:
        expected = "/gateway/v1/chat/completions" if call.model == "model-a" else "/default/v1/chat/completions"
        assert call.path == expected, (call.model, call.path)
        assert all("\r" not in value and "\n" not in value for value in call.headers.values()), call.headers
        assert "x-fusillade-batch-team" not in call.headers
