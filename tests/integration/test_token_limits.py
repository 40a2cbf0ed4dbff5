"""`tokens_per_minute` on the real daemon (SQLite), against the mock upstream on a real socket, on the real
clock: requests estimated at 2.5 times what they really use (their `max_tokens` is far above the mock's short
answers), so the rate is held only if real usage corrects the bucket. The upstream records when each call
arrived; each call's real usage is what the mock reports for its prompt."""

from __future__ import annotations

import orjson

from fusillade.domain import models
from fusillade.domain.rate_limit import estimate_tokens
from fusillade.domain.usage import usage_of
from fusillade.mock_upstream import MockUpstream
from fusillade.mock_upstream.responses import json_body
from fusillade.storage.sqlite.store import SqliteStorage
from fusillade.upstream.client import UpstreamClient
from tests.integration.conftest import fast_settings, routes_for, running
from tests.integration.test_daemon import finished
from tests.integration.test_rate_limits import arrivals
from tests.support import factories

RATE = 60_000  # tokens a minute: 1,000 a second, a bucket of 500
PER_SECOND = RATE / 60
COUNT = 140


def body(line: int) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": f"question {line:04d} " + "word " * 30}],
            "max_tokens": 60}  # fmt: skip


def items() -> list[models.TemplateInput]:
    return [
        models.TemplateInput(
            line_number=line,
            custom_id=f"req-{line}",
            method="POST",
            url=factories.CHAT,
            model="m",
            body=orjson.dumps(body(line)).decode(),
        )
        for line in range(1, COUNT + 1)
    ]


def real_usage() -> int:
    """The tokens the mock reports for each of these requests (the same for every line)."""
    answer = json_body("chat", body(1), "m", 0, dimensions=8).decode()
    usage = usage_of(answer)
    assert usage is not None
    return usage.total_tokens


async def test_one_daemon_on_sqlite_holds_the_token_rate_corrected_by_real_usage(
    sqlite_storage: SqliteStorage, upstream: MockUpstream, client: UpstreamClient
) -> None:
    chosen = items()
    used = real_usage()
    estimate = estimate_tokens(chosen[0].body, factories.CHAT)
    assert estimate >= 2 * used  # without the correction the rate would be less than half of it
    file = await factories.upload(sqlite_storage, items=chosen)
    batch = await factories.create_batch(sqlite_storage, file=file)
    routes = routes_for(upstream, {"m": 64}, tokens_per_minute=RATE)

    async with running(sqlite_storage, client, routes, fast_settings()):
        done = await finished(sqlite_storage, batch, within=20.0)

    assert done.counts.completed == COUNT
    # About 6 s in all (500 at once, then 1,000 a second at `used` tokens each): measured over the 4 s after the
    # first second, the tokens really used are the rate's within 15 %.
    times = arrivals(upstream)
    first = times[0]
    measured = 4.0
    calls = sum(1 for when in times if first + 1.0 <= when < first + 1.0 + measured)
    tokens = calls * used
    expected = PER_SECOND * measured
    assert abs(tokens - expected) <= 0.15 * expected, (tokens, expected, calls)
