"""The claim's query plans on a table the size of a busy queue: 100,000 finished and 10,000 pending requests,
analyzed as a real table is. The claim must walk its index (`requests_claim`, or `requests_claim_by_owner` for
the fair order) from the head, never scan `requests` whole nor sort every pending row of a model: its cost must
follow the rows claimed, not the rows stored. A change of the claim or of its indexes that loses this shows here
rather than as a slow queue in production.

PostgreSQL: the walk runs inside the plpgsql function `claim_requests`, where a plain EXPLAIN of the call sees
nothing. The session loads `auto_explain`, which sends the plan of every statement the function runs (with the
rows each node returned) as a NOTICE; the test calls the real function through `queue.claim` and reads them.
SQLite: EXPLAIN QUERY PLAN of the claim's statements, imported from `storage/sqlite/queue.py`.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from fusillade.domain import ids, models
from fusillade.storage.postgres import queue as postgres_queue
from fusillade.storage.postgres.connection import Connection, Database
from fusillade.storage.sqlite import connection as sqlite_connections
from fusillade.storage.sqlite import queue as sqlite_queue
from fusillade.storage.sqlite.store import SqliteStorage

FINISHED = 100_000
PENDING = 10_000
MODEL = "model-0"
"""Half of the pending requests are of this model, the other half of `model-1`."""
MODEL_PENDING = PENDING // 2
TAKE = 10
NOW = datetime(2030, 1, 1, tzinfo=UTC)
BUSY_OWNERS = {"alice": 5, "bob": 1}
"""Owners with requests in flight at different loads: the fair order differs from the deadline order."""

# Request i (1-based) is finished up to FINISHED, pending after; owners and models alternate; deadlines repeat
# every 5,000 requests, so that the deadline order is not the insertion order.
_POSTGRES_TEMPLATES = f"""
INSERT INTO request_templates (id, file_id, line_number, custom_id, custom_id_bytes, method, url, model, body)
SELECT md5('template' || i)::uuid, md5('file')::uuid, i, 'request-' || i, 12, 'POST', '/v1/chat/completions',
       'model-' || (i % 2), '{{}}'
FROM generate_series({FINISHED + 1}, {FINISHED + PENDING}) AS i
"""
_POSTGRES_REQUESTS = f"""
INSERT INTO requests (id, batch_id, template_id, line_number, custom_id_bytes, deadline, claimed_at, started_at,
                      finished_at, state, owner, model, custom_id)
SELECT md5('request' || i)::uuid, md5('batch' || (i / 10000))::uuid, md5('template' || i)::uuid, i, 12,
       $1::timestamptz + (i % 5000) * interval '1 second',
       finished, finished, finished,
       CASE WHEN finished IS NULL THEN 'pending' ELSE 'completed' END,
       CASE WHEN i % 3 = 0 THEN 'alice' ELSE 'bob' END, 'model-' || (i % 2), 'request-' || i
FROM generate_series(1, {FINISHED + PENDING}) AS i
CROSS JOIN LATERAL (SELECT CASE WHEN i <= {FINISHED} THEN $1::timestamptz END AS finished) AS f
"""

_AUTO_EXPLAIN = (
    "LOAD 'auto_explain'",
    "SET auto_explain.log_min_duration = 0",
    "SET auto_explain.log_nested_statements = on",
    "SET auto_explain.log_analyze = on",
    "SET auto_explain.log_timing = off",
    "SET auto_explain.log_level = notice",
    "SET auto_explain.log_format = json",
    "SET client_min_messages = notice",
)
_SCANS = frozenset({"Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan", "Bitmap Index Scan"})


# ------------------------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
async def postgres_queue_connection(postgres_url: str) -> AsyncIterator[Connection]:
    """One connection on a migrated database holding the requests above, analyzed."""
    database = await Database.open(postgres_url, min_size=1, max_size=1, command_timeout_s=30)
    try:
        async with database.connection() as connection:
            await connection.execute(_POSTGRES_TEMPLATES)
            await connection.execute(_POSTGRES_REQUESTS, NOW - timedelta(hours=1))
            await connection.execute("ANALYZE requests")
            await connection.execute("ANALYZE request_templates")
            yield connection
    finally:
        await database.close()


async def claim_with_plans(
    connection: Connection, owner_in_flight: Mapping[str, int] | None
) -> tuple[list[models.ClaimedRequest], list[dict[str, Any]]]:
    """Claim `TAKE` requests of `MODEL` through the real function; returns them with the plan of every statement
    that ran (the function's own included)."""
    notices: list[str] = []

    def listen(_: object, message: Any) -> None:
        notices.append(message.message)

    connection.add_log_listener(listen)
    try:
        for statement in _AUTO_EXPLAIN:
            await connection.execute(statement)
        plan = postgres_queue.plan_claim([models.ModelCapacity(model=MODEL, free=TAKE)], TAKE)
        assert plan is not None
        claimed = await postgres_queue.claim(
            connection, plan, ids.new_daemon_id(), owner_in_flight=owner_in_flight, now=NOW
        )
        await connection.execute("SET auto_explain.log_min_duration = -1")
    finally:
        connection.remove_log_listener(listen)
    explained = [orjson.loads(text.split("plan:", 1)[1]) for text in notices if "plan:" in text]
    # Leaves out the driver's own queries of the catalog (type introspection).
    return claimed, [found["Plan"] for found in explained if "requests" in found["Query Text"]]


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def reads_requests_unbounded(node: dict[str, Any]) -> bool:
    """Whether the rows under `node` include a scan of `requests` with no Limit between it and `node`."""
    if node["Node Type"] == "Limit":
        return False
    if node["Node Type"] in _SCANS and node.get("Relation Name") == "requests":
        return True
    return any(reads_requests_unbounded(child) for child in node.get("Plans", []))


def assert_walks_the_index(plans: list[dict[str, Any]], index: str) -> None:
    nodes = [node for plan in plans for node in plan_nodes(plan)]
    walks = [node for node in nodes if node.get("Index Name") == index]
    assert walks, f"no statement used {index}"
    assert all(node["Relation Name"] == "requests" for node in walks)
    full_scans = [
        node for node in nodes if node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "requests"
    ]
    assert full_scans == []
    for sort in (node for node in nodes if node["Node Type"] in ("Sort", "Incremental Sort")):
        assert not reads_requests_unbounded(sort), sort
        assert sort["Actual Rows"] < MODEL_PENDING // 10, sort  # the candidates, never the model's pending rows
    # Each walk of the index stopped after a few entries: the head of the model (or of an owner of it).
    assert all(node["Actual Rows"] <= TAKE for node in walks), walks


@pytest.mark.postgres
async def test_the_postgres_claim_walks_the_claim_index(postgres_queue_connection: Connection) -> None:
    claimed, plans = await claim_with_plans(postgres_queue_connection, owner_in_flight=None)

    assert len(claimed) == TAKE
    assert {request.model for request in claimed} == {MODEL}
    assert_walks_the_index(plans, "requests_claim")


@pytest.mark.postgres
async def test_the_postgres_fair_claim_walks_the_claim_index_of_each_owner(
    postgres_queue_connection: Connection,
) -> None:
    claimed, plans = await claim_with_plans(postgres_queue_connection, owner_in_flight=BUSY_OWNERS)

    assert len(claimed) == TAKE
    assert {request.owner for request in claimed} == {"bob"}  # the owner with fewer requests in flight
    assert_walks_the_index(plans, "requests_claim_by_owner")


# ----------------------------------------------------------------------------------------------- SQLite

_SQLITE_REQUESTS = f"""
WITH RECURSIVE numbers(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM numbers WHERE i < {FINISHED + PENDING})
INSERT INTO requests (id, batch_id, template_id, owner, custom_id, custom_id_bytes, model, line_number, deadline,
                      state, claimed_at, started_at, finished_at)
SELECT CAST(printf('r%015d', i) AS BLOB), CAST(printf('b%015d', i / 10000) AS BLOB),
       CAST(printf('t%015d', i) AS BLOB), CASE WHEN i % 3 = 0 THEN 'alice' ELSE 'bob' END, 'request-' || i, 12,
       'model-' || (i % 2), i, ?1 + (i % 5000) * 1000000,
       CASE WHEN i <= {FINISHED} THEN 'completed' ELSE 'pending' END,
       CASE WHEN i <= {FINISHED} THEN ?1 END, CASE WHEN i <= {FINISHED} THEN ?1 END,
       CASE WHEN i <= {FINISHED} THEN ?1 END
FROM numbers
"""
_SQLITE_TEMPLATES = f"""
WITH RECURSIVE numbers(i) AS (
    SELECT {FINISHED + 1} UNION ALL SELECT i + 1 FROM numbers WHERE i < {FINISHED + PENDING}
)
INSERT INTO request_templates (id, file_id, line_number, custom_id, custom_id_bytes, method, url, model, body)
SELECT CAST(printf('t%015d', i) AS BLOB), CAST('f' AS BLOB), i, 'request-' || i, 12, 'POST',
       '/v1/chat/completions', 'model-' || (i % 2), '{{}}'
FROM numbers
"""
_SQLITE_TABLE_READ = re.compile(r"^(SCAN|SEARCH) (\w+)(?: USING (.*))?$")


@pytest.fixture
async def sqlite_queue_connection(tmp_path: Path) -> AsyncIterator[sqlite3.Connection]:
    """A connection on a migrated SQLite database holding the requests above, analyzed."""
    path = tmp_path / "queue.db"
    store = await SqliteStorage.open(path)
    try:
        await store.migrate()
    finally:
        await store.close()
    connection = sqlite3.connect(path)
    try:
        moment = sqlite_connections.to_micros(NOW - timedelta(hours=1))
        with connection:
            connection.execute(_SQLITE_REQUESTS, (moment,))
            connection.execute(_SQLITE_TEMPLATES)
        connection.execute("ANALYZE")
        yield connection
    finally:
        connection.close()


def query_plan(connection: sqlite3.Connection, statement: str, parameters: tuple[Any, ...]) -> list[str]:
    """The lines of EXPLAIN QUERY PLAN, each prefixed by its parents' (`parent > child`)."""
    found: dict[int, str] = {0: ""}
    lines: list[str] = []
    for node, parent, _, detail in connection.execute("EXPLAIN QUERY PLAN " + statement, parameters):
        found[node] = f"{found.get(parent, '')}{detail} > "
        lines.append(found[node].removesuffix(" > "))
    return lines


def reads_of_requests(lines: list[str], aliases: set[str]) -> list[tuple[str, str]]:
    """(SCAN or SEARCH, what it uses) of each read of the requests table (under any of `aliases`)."""
    reads: list[tuple[str, str]] = []
    for line in lines:
        match = _SQLITE_TABLE_READ.match(line.rsplit(" > ", 1)[-1])
        if match is not None and match.group(2) in aliases:
            reads.append((match.group(1), match.group(3) or ""))
    return reads


def assert_uses_only(reads: list[tuple[str, str]], index: str) -> None:
    """Every read of `requests` is a SEARCH on `index` or by rowid."""
    assert reads, "the plan reads no requests"
    for kind, using in reads:
        assert kind == "SEARCH", reads
        assert re.match(rf"(COVERING )?INDEX {index} \(", using) or using.startswith("INTEGER PRIMARY KEY"), reads
    assert any(using.split(" (")[0].endswith(f"INDEX {index}") for _, using in reads), reads


def test_the_sqlite_claim_walks_the_claim_index(sqlite_queue_connection: sqlite3.Connection) -> None:
    moment = sqlite_connections.to_micros(NOW)
    lines = query_plan(sqlite_queue_connection, sqlite_queue.SELECT_CLAIMABLE, (MODEL, moment, TAKE))

    assert_uses_only(reads_of_requests(lines, {"r"}), "requests_claim")
    assert not [line for line in lines if "USE TEMP B-TREE" in line], lines
    claimable = sqlite_queue_connection.execute(sqlite_queue.SELECT_CLAIMABLE, (MODEL, moment, TAKE)).fetchall()
    assert len(claimable) == TAKE


def test_the_sqlite_fair_claim_walks_the_claim_index_of_each_owner(
    sqlite_queue_connection: sqlite3.Connection,
) -> None:
    moment = sqlite_connections.to_micros(NOW)
    heads = query_plan(sqlite_queue_connection, sqlite_queue.SELECT_OWNER_HEADS, (MODEL, moment))
    head = sqlite_queue_connection.execute(sqlite_queue.SELECT_OWNER_HEADS, (MODEL, moment)).fetchall()
    owner, deadline, batch_id, line_number = head[0]
    run_parameters = (MODEL, owner, moment, deadline, batch_id, line_number, TAKE)
    run = query_plan(sqlite_queue_connection, sqlite_queue.SELECT_OWNER_RUN, run_parameters)

    assert sorted(found[0] for found in head) == ["alice", "bob"]
    assert_uses_only(reads_of_requests(heads, {"requests", "r", "h"}), "requests_claim_by_owner")
    assert_uses_only(reads_of_requests(run, {"r"}), "requests_claim_by_owner")
    assert not [line for line in heads + run if "USE TEMP B-TREE FOR ORDER BY" in line], (heads, run)
    rows = sqlite_queue_connection.execute(sqlite_queue.SELECT_OWNER_RUN, run_parameters).fetchall()
    assert len(rows) == TAKE
