"""The daemon's knobs. Defaults suit a single `fusillade serve`; every duration is a `timedelta`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from fusillade.domain.retry import RetryPolicy


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonSettings:
    """How a daemon claims, commits, heartbeats, retries and stops (`Config.daemon_settings()` reads them
    from the configuration's `[daemon]` and `[retry]`)."""

    claim_batch_size: int = 100
    """Most requests taken per claim transaction."""
    idle_poll_interval: timedelta = timedelta(seconds=1)
    """With free capacity and nothing claimed, claim again after this (new work in this process, freed
    capacity and due retries wake the loop earlier)."""
    commit_max_delay: timedelta = timedelta(milliseconds=5)
    """Group commit: a state write waits at most this long for others to join its transaction."""
    commit_max_size: int = 500
    """Group commit: most state writes per transaction."""
    min_tick_interval: timedelta = timedelta(milliseconds=2)
    """Ticks start at most this often: under load, the writes and freed slots of this long go to the database
    in one trip (fewer, larger transactions cost less per request)."""
    ticks_in_flight: int = 2
    """Trips to the database (a group commit and a claim each) the daemon keeps going at once: while one is
    on its way, slots it freed are claimed for by the next. 1: one after the other."""
    processing_mark_delay: timedelta = timedelta(milliseconds=100)
    """A request is marked `processing` once its call has run this long; a faster call goes from `claimed`
    straight to its result (one state write instead of two; `started_at` is then its claim time)."""
    heartbeat_interval: timedelta = timedelta(seconds=5)
    stale_after: timedelta = timedelta(seconds=30)
    """A daemon whose last heartbeat is older than this is dead; its requests are reclaimed."""
    maintenance_interval: timedelta = timedelta(seconds=1)
    """How often reclaim, expiry and finalization sweeps run."""
    cancellation_poll_interval: timedelta = timedelta(milliseconds=250)
    """How often the daemon looks for cancelled batches among its in-flight requests."""
    expiry_grace: timedelta = timedelta(0)
    """Unfinished requests of a batch end `batch_expired` this long after its `expires_at`."""
    purge_interval: timedelta | None = timedelta(minutes=10)
    """None: never purge deleted data from this daemon."""
    purge_batch_size: int = 1000
    purge_throttle: timedelta = timedelta(milliseconds=100)
    shutdown_grace: timedelta = timedelta(seconds=30)
    """On stop, in-flight calls get this long to finish; the rest are released for another daemon."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    rate_limit_pause: timedelta = timedelta(seconds=1)
    """A 429 without Retry-After pauses its model's lane this long."""
    database_backoff_max: timedelta = timedelta(seconds=10)
    """Longest pause between retries of a failing database call."""
    batch_metadata_headers: Sequence[str] = ()
    """Keys of a batch's metadata sent upstream as `x-fusillade-batch-<key>` headers."""
    endpoint_cool_down: timedelta = timedelta(seconds=10)
    """An endpoint of a pool that fails (no connection, or a streak of 5xx and timeouts) is left out this long,
    then probed with one call; each ejection in a row doubles it."""
    endpoint_cool_down_max: timedelta = timedelta(minutes=5)
    """The longest an endpoint of a pool is left out at once."""
    traceparent: bool = False
    """Send a W3C `traceparent` header with each call: the trace id is the request's id (so every attempt of a
    request shares one trace in the upstream's logs), the span id is new per attempt."""

    @property
    def claim_max_age(self) -> timedelta:
        """A claimed request whose call has not started this long after its claim is given back unsent: the
        daemon was paused (SIGSTOP, a VM pause, a stalled database round trip) long enough that the other
        daemons may have declared it dead and taken the request over; its last heartbeat may predate the claim
        by up to one interval."""
        return self.stale_after - self.heartbeat_interval

    def __post_init__(self) -> None:
        if self.claim_batch_size < 1:
            raise ValueError(f"claim_batch_size must be at least 1, not {self.claim_batch_size}.")
        if self.ticks_in_flight < 1:
            raise ValueError(f"ticks_in_flight must be at least 1, not {self.ticks_in_flight}.")
        if self.commit_max_size < 1:
            raise ValueError(f"commit_max_size must be at least 1, not {self.commit_max_size}.")
        if self.stale_after <= self.heartbeat_interval:
            raise ValueError(
                f"stale_after ({self.stale_after}) must be longer than heartbeat_interval "
                f"({self.heartbeat_interval}), or live daemons would be reclaimed."
            )
        if self.endpoint_cool_down_max < self.endpoint_cool_down:
            raise ValueError(
                f"endpoint_cool_down_max ({self.endpoint_cool_down_max}) must not be shorter than "
                f"endpoint_cool_down ({self.endpoint_cool_down})."
            )
        for name in (
            "endpoint_cool_down",
            "idle_poll_interval",
            "heartbeat_interval",
            "maintenance_interval",
            "cancellation_poll_interval",
        ):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be positive.")
