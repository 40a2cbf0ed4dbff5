"""What `fusillade run requests.jsonl` does: one batch, run to the end in this process, resumable.

The batch lives in a state database next to the input (`requests.fusillade.db`, SQLite) and is found again by
the SHA-256 of the input file, kept in its metadata (and used as its idempotency key). So a run that was
stopped (Ctrl-C, a crash, a kill) is resumed by running the same command again: requests already finished are
kept, and those the dead process had in flight go back to pending at once (the dead run's daemon record is
marked dead: it ran on this machine and its process is gone). Requests sent twice are at most those that were
in flight when it died.

The parts (the state database, opened with the configuration's `database_timeout`; the service; the upstream
client; the daemon) come from the composition root (`composition.parts.open_run_parts`); this module holds
what a run does with them: check the input, resume, show the progress, write the result files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import os
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fusillade import errors, runtime
from fusillade.cli.progress import Display
from fusillade.composition import LOCAL_OWNER
from fusillade.composition.parts import open_run_parts
from fusillade.composition.routing import Routing
from fusillade.config import Config
from fusillade.daemon import Daemon
from fusillade.domain import ids, jsonl, models, states
from fusillade.metrics import DaemonMetrics
from fusillade.service import Service, SpilledIds
from fusillade.storage import urls
from fusillade.storage.base import Storage

SHA256_KEY = "input_sha256"
"""Metadata key of a run's batch: the SHA-256 of its input file."""
REFRESH_INTERVAL = 0.2
"""Seconds between two refreshes of the progress display."""
COUNT_INTERVAL = 2.0
"""Seconds between two reads of the batch's counts from the database while it runs. Counting reads the batch's
index of finished requests (a million entries for a million-request batch), so the refreshes in between show the
last counts plus what this run's daemon finished since; the batch is known finished only from a real count."""
_CHUNK = 1024 * 1024
_SHOWN_LINES = 5


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RunFiles:
    input: Path
    output: Path
    errors: Path
    database_url: str

    @classmethod
    def beside(
        cls, input: Path, *, output: Path | None, errors: Path | None, database_url: str | None
    ) -> RunFiles:
        """The default names sit next to the input: `requests.jsonl` gives `requests.output.jsonl`,
        `requests.errors.jsonl` and the state database `requests.fusillade.db`."""
        stem = input.with_suffix("") if input.suffix else input
        state = f"sqlite:///{stem}.fusillade.db"
        return cls(
            input=input,
            output=output or Path(f"{stem}.output.jsonl"),
            errors=errors or Path(f"{stem}.errors.jsonl"),
            database_url=database_url or state,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class CheckedInput:
    sha256: str
    endpoint: str
    """The `url` of every line (a batch has one endpoint)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    batch: models.Batch
    interrupted: bool
    """Stopped by a signal before the end; the files were not written."""


@dataclasses.dataclass(frozen=True, slots=True)
class UnroutedModel:
    """A model of the input that no route serves."""

    name: str
    lines: int
    """How many lines name it."""
    first_lines: tuple[int, ...]
    """The numbers of the first few of those lines."""


class InvalidInput(errors.ValidationError):
    """The input cannot be run: `errors` lists its bad lines, `unrouted` the models that have no route."""

    def __init__(self, *, errors: Sequence[errors.LineError], unrouted: Sequence[UnroutedModel]) -> None:
        super().__init__("The input file cannot be run.", errors=errors)
        self.unrouted = list(unrouted)


class AnotherRun(errors.ConfigurationError):
    """Another `fusillade run` is working on the same state database."""


# ------------------------------------------------------------------------------------------------ checks


async def check_input(path: Path, limits: jsonl.Limits, accepts: Callable[[str], bool]) -> CheckedInput:
    """Read the whole file once: validate every line, check that a route serves each model and that every
    line has the same `url`, and compute the file's SHA-256. Raises `InvalidInput` listing what is wrong. The
    custom_ids seen are kept as the service keeps an upload's (`SpilledIds`: on disk past 50,000)."""
    digest = hashlib.sha256()
    unrouted: dict[str, list[int]] = {}
    unrouted_lines: Counter[str] = Counter()
    mismatched: list[errors.LineError] = []
    endpoint: str | None = None

    async def chunks() -> AsyncIterator[bytes]:
        with path.open("rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
                yield chunk

    bad: list[errors.LineError] = []
    try:
        async for template in jsonl.validate(chunks(), limits, seen_ids=SpilledIds):
            if not accepts(template.model):
                unrouted_lines[template.model] += 1
                first_lines = unrouted.setdefault(template.model, [])
                if len(first_lines) < _SHOWN_LINES:
                    first_lines.append(template.line_number)
            if endpoint is None:
                endpoint = template.url
            elif template.url != endpoint and len(mismatched) < limits.max_errors:
                mismatched.append(
                    errors.LineError(
                        template.line_number,
                        f"url {template.url!r} differs from the first line's {endpoint!r}; a batch has one "
                        "endpoint: put each endpoint's requests in a file of their own.",
                    )
                )
    except errors.ValidationError as exc:
        bad = list(exc.errors)
    if bad or mismatched or unrouted:
        raise InvalidInput(
            errors=sorted([*bad, *mismatched], key=lambda error: error.line or math.inf),
            unrouted=[UnroutedModel(name, unrouted_lines[name], tuple(lines)) for name, lines in unrouted.items()],
        )
    assert endpoint is not None  # validate() raises for a file without requests
    return CheckedInput(sha256=digest.hexdigest(), endpoint=endpoint)


# --------------------------------------------------------------------------------------------------- run


async def run_batch(
    config: Config,
    files: RunFiles,
    *,
    completion_window: str,
    retry_failed: bool,
    display: Callable[[models.RequestCounts], Display],
    note: Callable[[str], None],
) -> Outcome:
    """Validate the input, find its batch in the state database (or create it), run it to the end with an
    in-process daemon while `display` shows the progress, and write the output and error files. Stopped by
    SIGINT or SIGTERM, it releases what is in flight and returns `interrupted` (the files are not written);
    a second signal quits the process at once."""
    routing = Routing(config)
    checked = await check_input(files.input, config.upload_limits(), routing.accepts)
    async with open_run_parts(config, routing, database_url=files.database_url) as parts:
        storage, daemon = parts.storage, parts.daemon
        await _take_over(storage, parts.settings.stale_after)
        batch = await _find_batch(storage, checked.sha256)
        if batch is None:
            batch = await _create_batch(parts.service, files.input, checked, completion_window)
        else:
            note(_resume_message(batch, files))
            if retry_failed and batch.counts.failed:
                retried = await storage.retry_failed(batch.id, owner=LOCAL_OWNER)
                note(f"Sending the {retried.moved:,} requests that failed the last time again (--retry-failed).")
                batch = retried.batch
        interrupted = False
        if not _finished(batch):
            with display(batch.counts) as progress:
                interrupted = await _drive(storage, daemon, batch, progress)
        await storage.finalize_batches()
        batch = await storage.get_batch(batch.id, owner=LOCAL_OWNER)
        if not interrupted:
            counts = batch.counts
            await _write(storage, batch.output_file_id, files.output, lines=counts.completed)
            await _write(storage, batch.error_file_id, files.errors, lines=counts.failed + counts.canceled)
        return Outcome(batch=batch, interrupted=interrupted)


async def _take_over(storage: Storage, stale_after: timedelta) -> None:
    """Mark dead the daemons of earlier runs on this machine whose process is gone, and put their requests
    back to pending now; refuse to start if one is still running."""
    host, now = socket.gethostname(), datetime.now(UTC)
    for daemon in await storage.list_daemons():
        if daemon.status is not states.DaemonStatus.RUNNING or daemon.hostname != host:
            continue  # daemons of other machines are reclaimed when their heartbeats go stale
        heard_from = now - daemon.last_heartbeat <= stale_after
        if heard_from and daemon.pid != os.getpid() and _process_exists(daemon.pid):
            raise AnotherRun(
                f"Another `fusillade run` (pid {daemon.pid}) is working on this file right now. Wait for it to "
                "finish or stop it (Ctrl-C), then run this command again."
            )
        await storage.mark_daemon_dead(daemon.id)
    while await storage.reclaim_requests(stale_after=stale_after):
        pass


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user's
    return True


async def _find_batch(storage: Storage, sha256: str) -> models.Batch | None:
    after = None
    while True:
        page = await storage.list_batches(owner=LOCAL_OWNER, after=after, limit=100)
        for batch in page.items:
            if (batch.metadata or {}).get(SHA256_KEY) == sha256:
                return batch
        if not page.has_more or not page.items:
            return None
        after = page.items[-1].id


async def _create_batch(
    service: Service, path: Path, checked: CheckedInput, completion_window: str
) -> models.Batch:
    """Store the input and create its batch (the service wakes the daemon, which has not started yet)."""
    file = await service.upload_path(owner=LOCAL_OWNER, path=path)
    return await service.create_batch(
        models.BatchSpec(
            owner=LOCAL_OWNER,
            input_file_id=file.id,
            endpoint=checked.endpoint,
            completion_window=completion_window,
            metadata={SHA256_KEY: checked.sha256, "input_file": path.name[:512]},
            idempotency_key=f"fusillade-run-{checked.sha256}",
        )
    )


def _finished(batch: models.Batch) -> bool:
    return batch.status.is_terminal or (batch.counts.total > 0 and batch.counts.active == 0)


def _resume_message(batch: models.Batch, files: RunFiles) -> str:
    counts = batch.counts
    state = files.database_url.removeprefix(urls.SQLITE_PREFIX)
    if _finished(batch):
        return f"Already run (state in {state}; delete it to run again): writing the files."
    return (
        f"Resuming: {counts.terminal:,} of {counts.total:,} requests were done in an earlier run "
        f"(state in {state}; delete it to start over)."
    )


async def _drive(storage: Storage, daemon: Daemon, batch: models.Batch, progress: Display) -> bool:
    """Run the daemon until the batch is finished or a signal stops it; True if a signal did."""
    interrupted = False
    task = asyncio.create_task(daemon.run(), name="fusillade-daemon")

    def on_signal() -> None:
        nonlocal interrupted
        if interrupted:
            progress.stop()
            print("Quit at once; run the same command again to continue.", file=sys.stderr, flush=True)
            os._exit(130)  # like a kill: the next run takes the requests in flight back
        interrupted = True
        daemon.stop()
        progress.note(
            f"Stopping: the {daemon.in_flight:,} requests in flight may finish (press Ctrl-C again to quit now)."
        )

    estimate = Estimate(daemon.metrics, batch.counts)

    async def refresh(*, count: bool) -> models.Batch | None:
        """Show the progress; the batch read from the database with `count` (None without)."""
        current = None
        if count:
            before = estimate.finished_here()  # before the read: what finishes during it is in neither
            current = await storage.get_batch(batch.id, owner=LOCAL_OWNER)
            estimate.counted(current.counts, finished_before=before)
            counts = current.counts
        else:
            counts = estimate.now()
        progress.update(counts, in_flight=daemon.in_flight, retries=_retries(daemon.metrics))
        return current

    loop = asyncio.get_running_loop()
    counted_at = float("-inf")
    with runtime.stop_signals_handled(on_signal):
        try:
            while not task.done():
                count = loop.time() - counted_at >= COUNT_INTERVAL or estimate.now().active == 0
                if count:
                    counted_at = loop.time()
                current = await refresh(count=count)
                if current is not None and _finished(current):
                    daemon.stop()
                await asyncio.wait({task}, timeout=REFRESH_INTERVAL)
        finally:
            daemon.stop()
            await asyncio.wait({task})
    if not task.cancelled() and (failure := task.exception()) is not None:
        raise failure
    await refresh(count=True)
    return interrupted


class Estimate:
    """The batch's counts between two reads from the database: the last read, with the requests this run's
    daemon finished since moved from active to their outcome (retries and expiry show at the next read).

    The daemon's counters move only once a write committed, so a read started after `finished_before` was
    taken sees at least those requests finished: a request finished while the read ran is then counted twice at
    worst (the estimate shows it finished early, which only brings the next real count forward), never left
    active, which would hold the end of the batch back until the next scheduled count."""

    def __init__(self, metrics: DaemonMetrics, counts: models.RequestCounts) -> None:
        self._metrics = metrics
        self.counted(counts, finished_before=self.finished_here())

    def finished_here(self) -> Counter[str]:
        return _finished_here(self._metrics)

    def counted(self, counts: models.RequestCounts, *, finished_before: Counter[str]) -> None:
        """`counts` were read from the database after the daemon's counters showed `finished_before`."""
        self._counts = counts
        self._finished_then = finished_before

    def now(self) -> models.RequestCounts:
        finished = self.finished_here()
        counts = self._counts
        room = counts.active  # never more finished than there were active requests (the read saw some)
        done: dict[str, int] = {}
        for outcome in ("completed", "failed", "canceled"):
            done[outcome] = min(room, finished[outcome] - self._finished_then[outcome])
            room -= done[outcome]
        moved = sum(done.values())
        in_progress = max(0, counts.in_progress - moved)
        pending = max(0, counts.pending - max(0, moved - counts.in_progress))
        return dataclasses.replace(
            counts,
            pending=pending,
            in_progress=in_progress,
            completed=counts.completed + done["completed"],
            failed=counts.failed + done["failed"],
            canceled=counts.canceled + done["canceled"],
        )


def _finished_here(metrics: DaemonMetrics) -> Counter[str]:
    """Requests this run's daemon finished, by outcome (completed, failed, canceled)."""
    samples = (sample for family in metrics.requests_finished.collect() for sample in family.samples)
    finished: Counter[str] = Counter(completed=0, failed=0, canceled=0)
    for sample in samples:
        if sample.name.endswith("_total"):
            finished[sample.labels["outcome"]] += int(sample.value)
    return finished


def _retries(metrics: DaemonMetrics) -> int:
    """Attempts that failed and were scheduled again, in this run."""
    samples = (sample for family in metrics.retries.collect() for sample in family.samples)
    return int(sum(sample.value for sample in samples if sample.name.endswith("_total")))


async def _write(storage: Storage, file_id: ids.FileId, path: Path, *, lines: int) -> None:
    """Write a result file whole, or not at all (a partial file is renamed into place only when complete).
    A file without lines is not written, as the API lists no empty file; one left at `path` by an earlier run
    of the same batch (before a --retry-failed, say) is removed, so that no stale file remains."""
    if not lines:
        await asyncio.to_thread(path.unlink, missing_ok=True)
        return
    partial = path.with_name(f"{path.name}.partial")
    content = await storage.open_file_content(file_id, owner=LOCAL_OWNER)
    with partial.open("wb") as file:
        async for chunk in content:
            file.write(chunk)
    partial.replace(path)
