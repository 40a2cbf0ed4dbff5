"""The daemon: claims requests from the queue, calls the upstreams within each model's limit, and writes the
outcomes back in group commits; it also heartbeats, reclaims dead daemons' work, propagates cancellation,
expires and finalizes batches, and purges deleted data."""

from __future__ import annotations

from fusillade.daemon.daemon import Daemon, DaemonFenced, run_until_signalled
from fusillade.daemon.settings import DaemonSettings

__all__ = ["Daemon", "DaemonFenced", "DaemonSettings", "run_until_signalled"]
