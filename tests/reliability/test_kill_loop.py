"""Scenario 1, the kill -9 loop, and (scenario 3) SQLite's "a daemon killed during a group commit loses nothing
that was acknowledged".

A 5,000-request batch (10,000 under `pytest --long`) runs through the real `fusillade daemon` command, on each
backend, against the fake upstream in this process (so its per-custom-id records are exact). The daemon is killed
with SIGKILL at 10 random moments (20 under `--long`) and started again each time; then it finishes the batch and
is stopped with SIGTERM. The moments come from a seeded generator: the seed is printed, and
`FUSILLADE_TEST_KILL_SEED=<seed>` replays the same draws (the timing of a run on a busy machine still differs).

Each kill point is a random number of distinct requests received by the upstream, drawn within an equal share of
those not received yet for each kill left (so that every kill finds work, whatever the timing). The daemon is then
under load (calls of 5-30 ms, 32 in flight) and runs a tick (one transaction: a group commit of results, then a
claim) every few milliseconds. From the kill point the kill waits for the first instant the daemon is seen inside
a write transaction (SQLite: it holds the write lock; PostgreSQL: a session of it has a transaction open), so that
kills cut commits rather than fall between them. What was acknowledged is what the database showed a reader as
committed (the completed requests and their bodies, read just before each kill); after each restart every one of
those is still completed with the same body, and on SQLite `PRAGMA integrity_check` passes on the file the killed
process left. At the end the batch's token usage is exactly the sum of what its output lines report: requests sent
again after a kill count once.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from fusillade.domain import ids, models, states
from fusillade.mock_upstream import Behaviour, MockUpstream, UniformLatency
from fusillade.storage import base
from tests.reliability import processes_kill
from tests.reliability.conftest import Scale
from tests.support import backends, factories, polling
from tests.support.processes import Process, Processes

pytestmark = pytest.mark.reliability

SEED_VARIABLE = "FUSILLADE_TEST_KILL_SEED"
SEED_FROM_ENV = os.environ.get(SEED_VARIABLE) or None  # read at import, before the tests scrub FUSILLADE_*
MODEL = factories.MODEL
CONCURRENCY = 32
LATENCY = UniformLatency(0.005, 0.030)
MIN_GAP = 20
"""Requests each daemon sends, at least, before it is killed: every kill hits a daemon at work."""
AIM_WITHIN = 2.0
"""Seconds a kill waits, at most, for the daemon to be inside a transaction."""


@dataclass
class Kill:
    at_received: int
    """Distinct requests (custom ids) the upstream had received when the kill was sent."""
    upstream_in_flight: int
    """Calls the upstream was serving at that moment (for the report: not a bound, see `held`)."""
    held: frozenset[str]
    """Custom ids claimed or processing in the killed daemon's name once it was gone."""
    in_transaction: bool
    """Whether the daemon was seen with a transaction open an instant before the kill (SQLite: it held the write
    lock; PostgreSQL: a session of it had a transaction open, a round trip earlier)."""
    killed_at: float
    """`time.monotonic()` of the kill."""
    recovered_after: float | None = None
    """Seconds from the kill until the restarted daemon had reclaimed what the killed one held."""


@dataclass
class KillLoop:
    backend: backends.Backend
    storage: base.Storage
    batch: models.Batch
    upstream: MockUpstream
    daemons: Processes
    admin: asyncpg.Connection | None
    """PostgreSQL only: a connection of the test's own, to watch the daemons' sessions."""
    rng: random.Random
    size: int
    """Requests in the batch."""
    kills: list[Kill] = field(default_factory=list)
    acknowledged: dict[str, str | None] = field(default_factory=dict)
    """Completed requests (by custom id) and their bodies, as a reader saw them just before a kill."""
    integrity: list[list[str]] = field(default_factory=list)
    """SQLite: `PRAGMA integrity_check` after each kill and at the end."""

    def __post_init__(self) -> None:
        self.completed = processes_kill.CompletedReader(self.backend, self.batch, self.admin)

    async def run(self, kills: int) -> models.Batch:
        """Kill the daemon `kills` times at random points, restarting it each time; then let the last one finish
        the batch and stop it with SIGTERM."""
        known: list[ids.DaemonId] = []
        current = self.start(0)
        for number in range(kills + 1):
            daemon_id = await processes_kill.registered(self.storage, current, known=set(known))
            await self.still_acknowledged()  # after the restart: the new process recovered the database
            if known:
                # The requests the killed daemon held fill the model's limit (it counts across daemons) until they
                # are reclaimed: only then is the new daemon at full load, ready to be killed.
                await processes_kill.declared_dead(self.storage, known[-1], current)
                self.kills[-1].recovered_after = time.monotonic() - self.kills[-1].killed_at
            known.append(daemon_id)
            if number == kills:
                break
            await self.kill(current, daemon_id, self.next_target(kills - number))
            current = self.start(number + 1)
        done = await finished(self.storage, self.batch, current)
        assert await current.stop() == 0, "the last daemon did not stop cleanly on SIGTERM"
        self.check_integrity()
        await self.still_acknowledged()
        return done

    def received(self) -> int:
        """Distinct requests the upstream has received (resends do not count)."""
        return len(self.upstream.stats.attempts_by_custom_id)

    def next_target(self, kills_left: int) -> int:
        """A random point among the requests not received yet, within an equal share of them for each kill left
        and the run to the end (so that the last kill still finds work, whatever the timing)."""
        received = self.received()
        share = (self.size - received) / (kills_left + 1)
        return received + max(MIN_GAP, round(self.rng.uniform(0.2, 1.0) * share))

    def start(self, number: int) -> Process:
        name = f"daemon-{number}"
        config = processes_kill.write_config(
            self.daemons.directory / f"{name}.toml",
            database=processes_kill.database_url(self.backend, application_name=application_name(name)),
            upstream_url=self.upstream.url,
            model=MODEL,
            concurrency=CONCURRENCY,
        )
        return processes_kill.start_daemon(self.daemons, config, name)

    async def kill(self, process: Process, daemon_id: ids.DaemonId, target: int) -> None:
        def reached() -> bool:
            process.check_running()
            return self.received() >= target

        await polling.until(reached, within=60, interval=0.005, message=f"{target} distinct requests received")
        self.acknowledged.update(await self.completed.read())
        in_transaction = await self.inside_transaction(process)
        received, in_flight = self.received(), self.upstream.stats.in_flight
        await process.kill()
        killed_at = time.monotonic()
        # The bound on resends is the database's count of requests the dead daemon still holds, not the upstream's
        # in-flight count. A call whose answer has arrived but whose result was still waiting for the group commit
        # (or in the transaction the kill cut) has left the upstream's count, yet it is sent again after the
        # restart. A request is sent again only if no result of it was committed, that is exactly when it is still
        # claimed or processing in the dead daemon's name after the kill (nothing reclaims it before the heartbeat
        # threshold, and no other daemon runs). On PostgreSQL a commit the process sent just before dying may still
        # be applied by its server session: wait until those sessions are gone before reading.
        if self.admin is not None:
            await processes_kill.sessions_gone(self.admin, application_name(process.name))
        held = await processes_kill.held_by(self.storage, self.batch, daemon_id)
        self.kills.append(Kill(received, in_flight, frozenset(held), in_transaction, killed_at))
        self.check_integrity()  # the file as the killed process left it, before a restart

    async def inside_transaction(self, process: Process) -> bool:
        """Wait (a moment at most) until the daemon has a write transaction open; whether it was seen."""
        deadline = time.monotonic() + AIM_WITHIN
        while time.monotonic() < deadline:
            if self.admin is not None:
                if await processes_kill.in_transaction(self.admin, application_name(process.name)):
                    return True
            elif processes_kill.write_lock_held(self.backend.location):
                return True
            await asyncio.sleep(0)
        return False

    async def still_acknowledged(self) -> None:
        """Every result a reader saw committed before a kill is still there, unchanged."""
        now = await processes_kill.requests_by_custom_id(self.storage, self.batch)
        changed = [
            custom_id
            for custom_id, body in self.acknowledged.items()
            if now[custom_id].state != states.RequestState.COMPLETED or now[custom_id].response_body != body
        ]
        assert changed == [], f"{len(changed)} acknowledged results were lost or changed"

    def check_integrity(self) -> None:
        if not self.backend.is_postgres:
            self.integrity.append(processes_kill.integrity_check(self.backend.location))


def application_name(process_name: str) -> str:
    return f"fusillade-kill-loop-{process_name}"


def choose_seed() -> int:
    seed = int(SEED_FROM_ENV) if SEED_FROM_ENV else random.SystemRandom().randrange(2**32)
    print(f"kill loop seed: {seed} (replay with {SEED_VARIABLE}={seed})")
    return seed


@pytest.mark.timeout(300)
async def test_a_daemon_killed_again_and_again_loses_nothing_and_resends_only_what_it_held(
    backend: backends.Backend, storage: base.Storage, scale: Scale, tmp_path: Path
) -> None:
    count = scale(5_000, 10_000)
    kills = scale(10, 20)
    seed = choose_seed()
    started = time.monotonic()
    batch = await factories.create_batch(storage, count=count)
    admin = await asyncpg.connect(backend.location) if backend.is_postgres else None
    daemons = Processes(tmp_path, stop_within=processes_kill.STOP_WITHIN)
    try:
        async with MockUpstream(Behaviour(latency=LATENCY, seed=seed)) as upstream:
            loop = KillLoop(backend, storage, batch, upstream, daemons, admin, random.Random(seed), count)
            note = f"kill loop seed: {seed} ({SEED_VARIABLE}={seed} replays it)"
            with daemons.logs_on_failure(note, last=processes_kill.LOGS_SHOWN):
                done = await loop.run(kills)
            elapsed = time.monotonic() - started
            attempts = {
                custom_id: len(arrivals) for custom_id, arrivals in upstream.stats.attempts_by_custom_id.items()
            }
    finally:
        await daemons.stop()
        if admin is not None:
            await admin.close()
    output, error = await factories.result_lines(storage, done)
    statuses = {daemon.status for daemon in await storage.list_daemons()}

    history = loop.kills
    held_sum = sum(len(kill.held) for kill in history)
    sent_again = sum(1 for n in attempts.values() if n > 1)
    extra_receipts = sum(n - 1 for n in attempts.values())
    recovered = [kill.recovered_after or 0.0 for kill in history]
    print(
        f"kill loop [{backend.name}] seed {seed}: {count} requests, {len(history)} kills in {elapsed:.1f} s; "
        f"kills after {[kill.at_received for kill in history]} distinct requests received, "
        f"{sum(kill.in_transaction for kill in history)} of them inside a transaction; held at the kills "
        f"{[len(kill.held) for kill in history]} (sum {held_sum}), upstream in flight "
        f"{[kill.upstream_in_flight for kill in history]}; sent more than once {sent_again}, extra receipts "
        f"{extra_receipts}; acknowledged results checked {len(loop.acknowledged)}; integrity "
        f"{loop.integrity or 'n/a'}; kill to work reclaimed {min(recovered):.1f}-{max(recovered):.1f} s"
    )

    assert len(history) == kills
    assert all(kill.held for kill in history), "a kill found the daemon idle: the loop tests less than it claims"
    assert statuses == {states.DaemonStatus.DEAD}, (
        "a killed daemon was never declared dead, or the last not stopped"
    )
    # Every request terminal, each custom id in the results exactly once, and none failed.
    assert done.status == states.BatchStatus.COMPLETED, done
    assert done.counts.terminal == count and done.counts.active == 0, done.counts
    expected = {f"req-{n}" for n in range(1, count + 1)}
    assert error == [], f"{len(error)} requests failed, for instance {error[:1]}"
    lines = Counter(line["custom_id"] for line in output + error)
    assert set(lines) == expected and set(lines.values()) == {1}, "a custom id is missing or repeated"
    assert set(attempts) == expected
    # Resent only what a killed daemon held: each request at most once per kill that found it held.
    times_held = Counter(custom_id for kill in history for custom_id in kill.held)
    over = {custom_id: n for custom_id, n in attempts.items() if n - 1 > times_held[custom_id]}
    assert over == {}, f"sent more often than the kills that found them held: {dict(list(over.items())[:5])}"
    assert sent_again <= extra_receipts <= held_sum
    assert loop.acknowledged
    assert all(result == ["ok"] for result in loop.integrity), loop.integrity
    # Usage sums are exact: a request sent again after a kill counts once, with the result that was kept.
    kept = [line["response"]["body"]["usage"] for line in output]
    assert done.usage_unknown == 0
    assert (done.total_usage.input_tokens, done.total_usage.output_tokens) == (
        sum(usage["prompt_tokens"] for usage in kept),
        sum(usage["completion_tokens"] for usage in kept),
    ), f"{sent_again} requests were sent more than once"


async def finished(storage: base.Storage, batch: models.Batch, process: Process) -> models.Batch:
    async def check() -> models.Batch | None:
        process.check_running()
        current = await storage.get_batch(batch.id, owner=models.ALL_OWNERS)
        ended = current.completed_at or current.failed_at or current.cancelled_at or current.expired_at
        return current if ended else None

    found = await polling.until(check, within=120, interval=0.1, message="the batch to finish")
    assert found is not None
    return found
