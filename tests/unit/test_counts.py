"""The OpenAI status of a batch, derived from its timestamps and counts (`domain.counts`)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusillade.domain import counts, ids, models, states

CREATED = datetime(2025, 1, 1, tzinfo=UTC)
LATER = CREATED + timedelta(minutes=5)
B = states.BatchStatus

RUNNING = models.RequestCounts(total=4, pending=1, in_progress=1, completed=1, failed=1)
ALL_DONE = models.RequestCounts(total=3, completed=1, failed=1, canceled=1)
ALL_FAILED = models.RequestCounts(total=2, failed=2)


def batch(counts_: models.RequestCounts = RUNNING, **timestamps: Any) -> models.Batch:
    moments: dict[str, Any] = dict.fromkeys(timestamps, LATER)
    return models.Batch(
        id=ids.BatchId(uuid.UUID(int=1)),
        owner="alice",
        input_file_id=ids.FileId(uuid.UUID(int=2)),
        output_file_id=ids.FileId(uuid.UUID(int=3)),
        error_file_id=ids.FileId(uuid.UUID(int=4)),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=None,
        created_at=CREATED,
        expires_at=CREATED + timedelta(hours=24),
        counts=counts_,
        **moments,
    )


# One case per row of the table in counts.batch_status, plus the rows it must win over.
@pytest.mark.parametrize(
    ("timestamps", "request_counts", "expected"),
    [
        ({"failed_at"}, models.RequestCounts(), B.FAILED),
        ({"in_progress_at", "failed_at", "cancelled_at", "expired_at", "completed_at"}, ALL_DONE, B.FAILED),
        ({"in_progress_at", "cancelling_at", "cancelled_at"}, ALL_DONE, B.CANCELLED),
        ({"in_progress_at", "cancelled_at", "expired_at", "completed_at"}, ALL_DONE, B.CANCELLED),
        ({"in_progress_at", "expired_at"}, RUNNING, B.EXPIRED),
        ({"in_progress_at", "expired_at", "completed_at", "cancelling_at"}, RUNNING, B.EXPIRED),
        ({"in_progress_at", "finalizing_at", "completed_at"}, ALL_DONE, B.COMPLETED),
        ({"in_progress_at", "finalizing_at", "completed_at"}, ALL_FAILED, B.COMPLETED),
        ({"in_progress_at", "cancelling_at", "completed_at"}, ALL_DONE, B.COMPLETED),
        ({"in_progress_at", "cancelling_at"}, RUNNING, B.CANCELLING),
        ({"cancelling_at"}, RUNNING, B.CANCELLING),
        ({"in_progress_at", "finalizing_at", "cancelling_at"}, ALL_DONE, B.CANCELLING),
        (set(), RUNNING, B.VALIDATING),
        (set(), ALL_DONE, B.VALIDATING),
        ({"finalizing_at"}, ALL_DONE, B.VALIDATING),
        ({"in_progress_at", "finalizing_at"}, RUNNING, B.FINALIZING),
        ({"in_progress_at"}, ALL_DONE, B.FINALIZING),
        ({"in_progress_at"}, ALL_FAILED, B.FINALIZING),
        ({"in_progress_at"}, RUNNING, B.IN_PROGRESS),
        ({"in_progress_at"}, models.RequestCounts(), B.IN_PROGRESS),
        ({"in_progress_at"}, models.RequestCounts(total=2, completed=1, in_progress=1), B.IN_PROGRESS),
    ],
)
def test_batch_status_table(timestamps: set[str], request_counts: models.RequestCounts, expected: B) -> None:
    subject = batch(request_counts, **dict.fromkeys(timestamps))
    assert counts.batch_status(subject) == expected
    assert subject.status == expected


TIMESTAMPS = [
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
]
request_counts = st.builds(
    lambda pending, in_progress, completed, failed, canceled: models.RequestCounts(
        total=pending + in_progress + completed + failed + canceled,
        pending=pending,
        in_progress=in_progress,
        completed=completed,
        failed=failed,
        canceled=canceled,
    ),
    *[st.integers(0, 3)] * 5,
)


@settings(max_examples=200, deadline=None)
@given(st.sets(st.sampled_from(TIMESTAMPS)), request_counts)
def test_status_follows_the_first_matching_row(timestamps: set[str], request_counts: models.RequestCounts) -> None:
    subject = batch(request_counts, **dict.fromkeys(timestamps))
    finished = [status for name, status in counts.FINISHED_STATUS_BY_TIMESTAMP if name in timestamps]
    status = counts.batch_status(subject)
    if finished:
        assert status == finished[0]
        assert status.is_terminal
    else:
        assert not status.is_terminal
    if status is B.IN_PROGRESS:
        assert request_counts.total == 0 or request_counts.active > 0


def test_counts_properties() -> None:
    assert RUNNING.terminal == 2
    assert RUNNING.active == 2
    assert dataclasses.replace(RUNNING, canceled=3).terminal == 5
