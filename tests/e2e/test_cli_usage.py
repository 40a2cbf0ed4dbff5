"""`fusillade usage` as an operator runs it (a subprocess), once per backend, on a database whose usage sums a
daemon wrote over two days: by model, day and batch, one owner or all, `--since`, JSON and table, and the exit
code 2 with the fix for a bad grouping or date."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fusillade import clock as clocks
from fusillade.domain import ids
from fusillade.domain.usage import Usage
from tests.support import backends, factories
from tests.support.processes import Processes

FIRST_DAY = datetime(2026, 3, 1, 12, tzinfo=UTC)
CONFIG = """
[models.model-a]
base_url = "http://127.0.0.1:9/v1"

[models.model-a.pricing]
input = 0.15
cached_input = 0.075
output = 0.6
"""
"""model-a priced; model-b (no route of its own, and no default route) is not."""


async def spend_over_two_days(backend: backends.Backend) -> dict[str, ids.BatchId]:
    clock = clocks.ManualClock(FIRST_DAY)
    store = await backend.open_store(clock)
    if not backend.is_postgres:
        await store.migrate()
    batches = {
        "alice-1": await factories.completed_with_usage(store, [Usage(1_000_000, 200_000, 500_000, 100), None]),
        "bob-1": await factories.completed_with_usage(store, [Usage(7, 0, 3, 0)], owner="bob"),
    }
    clock.advance(timedelta(days=1))
    batches["alice-2"] = await factories.completed_with_usage(store, [Usage(40, 0, 2, 0)], model="model-b")
    return batches


def tokens(usage: dict[str, Any]) -> tuple[int, int, int, int]:
    return (
        usage["input_tokens"],
        usage["input_tokens_details"]["cached_tokens"],
        usage["output_tokens"],
        usage["output_tokens_details"]["reasoning_tokens"],
    )


async def test_usage_by_model_day_and_batch(backend: backends.Backend, tmp_path: Path) -> None:
    batches = await spend_over_two_days(backend)
    config = tmp_path / "fusillade.toml"
    config.write_text(CONFIG)
    url = backend.location if backend.is_postgres else f"sqlite:///{backend.location}"
    options = ("--config", str(config), "--database-url", url)
    async with Processes(tmp_path) as processes:
        code, stdout, stderr = await processes.cli("usage", "--json", *options)
        assert code == 0, stderr
        document = json.loads(stdout)
        assert (document["group_by"], document["owner"], document["since"]) == ("model", None, None)
        assert [
            (row["owner"], row["model"], row["requests"], row["requests_without_usage"], tokens(row["usage"]))
            for row in document["data"]
        ] == [
            ("alice", "model-a", 2, 1, (1_000_000, 200_000, 500_000, 100)),
            ("alice", "model-b", 1, 0, (40, 0, 2, 0)),
            ("bob", "model-a", 1, 0, (7, 0, 3, 0)),
        ]
        assert document["data"][0]["cost"] == {"currency": "usd", "input": 0.135, "output": 0.3, "total": 0.435}
        assert document["data"][1]["cost"] is None  # model-b has no pricing
        assert document["total"]["requests"] == 4 and document["total"]["cost"] is None
        assert tokens(document["total"]["usage"]) == (1_000_047, 200_000, 500_005, 100)

        code, stdout, stderr = await processes.cli(
            "usage", "--by", "day", "--owner", "alice", "--since", "2026-03-02", "--json", *options
        )
        assert code == 0, stderr
        [second_day] = json.loads(stdout)["data"]
        assert (second_day["owner"], second_day["day"], second_day["model"]) == ("alice", "2026-03-02", "model-b")

        code, table, stderr = await processes.cli("usage", "--by", "batch", "--owner", "bob", *options)
        assert code == 0, stderr
        assert ids.batch_wire(batches["bob-1"]) in table and ids.batch_wire(batches["alice-1"]) not in table
        assert "total" in table and "0.00000285" in table  # 7 input at 0.15 + 3 output at 0.6, exact
        assert "alice" not in table

        code, stdout, stderr = await processes.cli("usage", "--since", "2026-03-03", *options)
        assert code == 0, stderr
        assert "No usage of every owner since 2026-03-03." in stdout


async def test_a_bad_grouping_or_date_exits_2_with_the_fix(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'f.db'}"
    async with Processes(tmp_path) as processes:
        code, stdout, stderr = await processes.cli("usage", "--by", "week", "--database-url", database)
        assert code == 2 and stdout == ""
        assert "--by 'week' is not a grouping; use one of model, day, batch." in stderr
        code, stdout, stderr = await processes.cli("usage", "--since", "03/02/2026", "--database-url", database)
        assert code == 2 and stdout == ""
        assert "--since '03/02/2026' is not a date YYYY-MM-DD" in stderr
        code, _, stderr = await processes.cli("usage", "--since", "2026-02-30", "--database-url", database)
        assert code == 2 and "not a date of the calendar" in stderr
        code, _, stderr = await processes.cli("usage", "--owner", " ", "--database-url", database)
        assert code == 2 and "--owner must name an owner" in stderr
    assert not (tmp_path / "f.db").exists()  # refused before the database was opened
