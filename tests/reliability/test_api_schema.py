"""Scenario 6, hostile input: the HTTP API fuzzed against its own OpenAPI schema (`GET /openapi.json`) with
schemathesis, on SQLite and on PostgreSQL.

`fusillade serve --mock-upstream` runs as a subprocess (the API and a daemon sending every model to the fake
upstream), with a key stored beforehand as `fusillade keys create` stores it. Before fuzzing, a file is
uploaded and batches made from it run to the end, so that the generated calls reach real objects too: about
half of the schema-valid `file_id`, `batch_id` and `after` values are swapped for ids that exist (DELETE only
gets spare files), and so are about half of the `input_file_id`s (with a valid endpoint and window) of
`POST /v1/batches` and of the uploaded files. Every operation is called with the key, with schema-valid
(positive) and schema-invalid (negative) data.

Asserted on every answer: no 5xx, a documented status code, content type, headers and body schema, and a 4xx
for schema-invalid input (the checks below). Not asserted: schemathesis' `positive_data_acceptance`, by design:
a schema-valid request may still be refused (an `after` cursor or a file id that does not exist, a file that
is not valid JSONL). At the end, the server's log holds no traceback and no 5xx (the daemon also ran the
batches the fuzzing made). A refused method's `Allow` header is checked in `test_hostile_uploads.py`.

schemathesis is driven through its Python API (`APIOperation.as_strategy`, `Case.call`,
`Case.validate_response`) with hypothesis, not through its pytest plugin: `schemathesis.pytest.from_fixture`
(4.32.5) reads `Node._nodeid`, which pytest 9.2 no longer has.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import checks

from fusillade.storage import factory
from tests.reliability import conftest
from tests.support import api_server, polling
from tests.support.processes import Processes

pytestmark = pytest.mark.reliability

CHAT = "/v1/chat/completions"
EXAMPLES = 250 if conftest.LONG else 25
"""Generated calls per operation (schema-valid and schema-invalid together)."""
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


@dataclass
class Deployment:
    url: str
    key: str
    log: Path
    files: list[str]
    """Input and output file ids that stay."""
    spare_files: list[str]
    """Files DELETE may take."""
    batches: list[str]
    requests: list[str]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite:///{tmp_path / 'fusillade.db'}"


async def create_key(database_url: str) -> str:
    """A stored key, made before the server starts (it reads at start whether keys exist)."""
    store = await factory.open_storage(database_url)
    try:
        return await api_server.create_key(store, "fuzzer")
    finally:
        await store.close()


async def seed(http: aiohttp.ClientSession, url: str, key: str) -> dict[str, list[str]]:
    """Objects for the generated calls to find: files, batches run to the end, their requests."""
    headers = {"Authorization": f"Bearer {key}"}

    async def call(method: str, path: str, **options: Any) -> Any:
        async with http.request(method, url + path, headers=headers, **options) as response:
            body = await response.json(loads=orjson.loads)
            assert response.status == 200, (method, path, body)
            return body

    async def upload(lines: int, prefix: str) -> str:
        content = b"".join(
            orjson.dumps(
                {
                    "custom_id": f"{prefix}-{n}",
                    "method": "POST",
                    "url": CHAT,
                    # A model no route names: the default route of --mock-upstream serves every model.
                    "body": {"model": "any-model-at-all", "messages": [{"role": "user", "content": "hi"}]},
                }
            )
            + b"\n"
            for n in range(lines)
        )
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", content, filename=f"{prefix}.jsonl")
        return str((await call("POST", "/v1/files", data=form))["id"])

    input_file = await upload(3, "seed")
    spare_files = [await upload(1, f"spare{n}") for n in range(3)]
    batches = [
        (await call("POST", "/v1/batches", json={"input_file_id": input_file, "endpoint": CHAT}))["id"]
        for _ in range(2)
    ]

    async def finished() -> list[dict[str, Any]] | None:
        found = [await call("GET", f"/v1/batches/{batch}") for batch in batches]
        return found if all(batch["status"] == "completed" for batch in found) else None

    done = await polling.until(finished, within=30, interval=0.1, message="the seeded batches to complete")
    requests = await call("GET", f"/v1/batches/{batches[0]}/requests")
    return {
        "files": [input_file, *(batch["output_file_id"] for batch in done)],
        "spare_files": spare_files,
        "batches": batches,
        "requests": [item["id"] for item in requests["data"]],
    }


@pytest.fixture
async def deployment(database_url: str, tmp_path: Path) -> AsyncIterator[Deployment]:
    key = await create_key(database_url)
    processes = Processes(tmp_path)
    try:
        with processes.logs_on_failure():
            _, url = await processes.serve("--mock-upstream", "--database-url", database_url)
            async with aiohttp.ClientSession() as http:
                objects = await seed(http, url, key)
        log = tmp_path / "serve.log"
        yield Deployment(url=url, key=key, log=log, **objects)
    finally:
        await processes.stop()
    logged = log.read_text(errors="replace")
    assert "Traceback" not in logged, logged[-8000:]
    assert not re.search(r'HTTP/[\d.]+" 5\d\d', logged), "the access log shows no 5xx"


def _pick(value: object, pool: list[str]) -> str | None:
    """For about half of the generated values, one of `pool` (chosen from the value, so a case replays)."""
    if not isinstance(value, str) or not pool:
        return None
    digest = zlib.crc32(value.encode("utf-8", "surrogatepass"))
    return pool[(digest // 2) % len(pool)] if digest % 2 == 0 else None


GOOD_FILE = orjson.dumps(
    {"custom_id": "fuzzed", "method": "POST", "url": CHAT, "body": {"model": "m", "messages": []}}
)


def aim_at_real_objects(case: schemathesis.Case, deployment: Deployment) -> None:
    """Swap about half of the generated ids for ids that exist (and half of the uploads for a valid file)."""
    path_parameters = case.path_parameters or {}
    files = deployment.spare_files if case.method.upper() == "DELETE" else deployment.files
    for name, pool in (("file_id", files), ("batch_id", deployment.batches)):
        chosen = _pick(path_parameters.get(name), pool)
        if chosen is not None:
            path_parameters[name] = chosen
    query = case.query or {}
    if "after" in query:
        pool = {"/v1/files": deployment.files, "/v1/batches": deployment.batches}.get(
            case.path, deployment.requests
        )
        chosen = _pick(query["after"], pool)
        if chosen is not None:
            query["after"] = chosen
    if case.method.upper() == "POST" and isinstance(case.body, dict):
        if case.path == "/v1/batches":
            chosen = _pick(case.body.get("input_file_id"), deployment.files[:1])
            if chosen is not None:  # with a valid endpoint and window, so that the metadata is looked at
                case.body.update(input_file_id=chosen, endpoint=CHAT, completion_window="24h")
        elif case.path == "/v1/files" and case.body.get("purpose") == "batch" and "file" in case.body:
            case.body["file"] = (
                GOOD_FILE if zlib.crc32(repr(case.body["file"]).encode()) % 2 else case.body["file"]
            )


@dataclass
class Fuzzed:
    calls: Counter[tuple[str, int]]
    """Calls per (operation, status)."""
    failures: list[str]


def fuzz(deployment: Deployment) -> Fuzzed:
    """Every operation of the served schema, with positive and negative data; the answers checked."""
    schema = schemathesis.openapi.from_url(deployment.url + "/openapi.json")
    fuzzed = Fuzzed(Counter(), [])
    for result in schema.get_all_operations():
        operation = result.ok()
        cases = st.one_of(
            operation.as_strategy(schemathesis.GenerationMode.POSITIVE).map(lambda case: (case, True)),
            operation.as_strategy(schemathesis.GenerationMode.NEGATIVE).map(lambda case: (case, False)),
        )

        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(cases)
        def call(generated: tuple[schemathesis.Case, bool]) -> None:
            case, schema_valid = generated
            if schema_valid:  # a schema-invalid case stays as generated: it must be refused
                aim_at_real_objects(case, deployment)
            response = case.call(base_url=deployment.url, headers=deployment.headers(), timeout=30)
            fuzzed.calls[(case.operation.label, response.status_code)] += 1
            case.validate_response(response, checks=CHECKS, headers=deployment.headers())

        try:
            call()
        except Exception as failure:  # a check failed: hypothesis shrank it to a small case
            fuzzed.failures.append(f"{operation.label}: {failure}")
    return fuzzed


async def test_every_operation_answers_as_its_schema_says(deployment: Deployment) -> None:
    fuzzed = await asyncio.to_thread(fuzz, deployment)

    assert not fuzzed.failures, "\n\n".join(fuzzed.failures)
    operations = {label for label, _ in fuzzed.calls}
    assert len(operations) == 17, sorted(operations)
    statuses = Counter(status for _, status in fuzzed.calls.elements())
    assert not [status for status in statuses if status >= 500]
    reached = {label for (label, status) in fuzzed.calls if 200 <= status <= 299}
    assert len(reached) >= 10, f"the seeded ids let most operations succeed at least once: {sorted(reached)}"
    print(f"\nschemathesis: {sum(statuses.values())} calls, by status {dict(sorted(statuses.items()))}")
    for label in sorted(operations):
        print(f"  {label}: {dict(sorted((s, n) for (op, s), n in fuzzed.calls.items() if op == label))}")
