"""`fusillade run`'s progress between two reads of the batch's counts (`local_run.Estimate`)."""

from __future__ import annotations

from fusillade.cli import local_run
from fusillade.domain import models
from fusillade.metrics import DaemonMetrics


def _finish(metrics: DaemonMetrics, outcome: str, count: int) -> None:
    metrics.model("m").finished[outcome].inc(count)


def test_requests_finished_since_the_read_move_from_active_to_their_outcome() -> None:
    metrics = DaemonMetrics()
    estimate = local_run.Estimate(metrics, models.RequestCounts(total=10, pending=8, in_progress=2))
    _finish(metrics, "completed", 3)
    _finish(metrics, "failed", 1)
    assert estimate.now() == models.RequestCounts(total=10, pending=6, in_progress=0, completed=3, failed=1)


def test_a_request_finished_while_the_counts_were_read_is_not_left_active() -> None:
    # The read's snapshot predates 4 commits whose counters moved before the read returned: the estimate must
    # still reach no active request once the daemon finished all 10 (else the run waits for its next count).
    metrics = DaemonMetrics()
    estimate = local_run.Estimate(metrics, models.RequestCounts(total=10, pending=10))
    before = estimate.finished_here()
    _finish(metrics, "completed", 4)  # committed during the read, after its snapshot
    estimate.counted(models.RequestCounts(total=10, pending=10), finished_before=before)
    assert estimate.now().active == 6
    _finish(metrics, "completed", 6)
    assert estimate.now() == models.RequestCounts(total=10, completed=10)


def test_the_estimate_never_goes_below_zero_when_the_read_already_saw_a_finish() -> None:
    metrics = DaemonMetrics()
    estimate = local_run.Estimate(metrics, models.RequestCounts(total=4, pending=4))
    before = estimate.finished_here()
    _finish(metrics, "completed", 2)  # committed before the read's snapshot: in the counts and in the counters
    estimate.counted(models.RequestCounts(total=4, pending=2, completed=2), finished_before=before)
    _finish(metrics, "completed", 2)
    now = estimate.now()
    assert (now.pending, now.in_progress) == (0, 0)
    assert now.terminal == now.total == 4  # shown finished, never more than the batch holds
