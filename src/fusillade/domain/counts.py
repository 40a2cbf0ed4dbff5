"""Batch progress: the OpenAI status of a batch, derived from its timestamps and request counts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fusillade.domain import states

if TYPE_CHECKING:
    from fusillade.domain import models

FINISHED_STATUS_BY_TIMESTAMP = (
    ("failed_at", states.BatchStatus.FAILED),
    ("cancelled_at", states.BatchStatus.CANCELLED),
    ("expired_at", states.BatchStatus.EXPIRED),
    ("completed_at", states.BatchStatus.COMPLETED),
)


def batch_status(batch: models.Batch) -> states.BatchStatus:
    """The first that holds, in this order:

    | condition                                          | status        |
    |----------------------------------------------------|---------------|
    | `failed_at` set (the input could not be run)       | `failed`      |
    | `cancelled_at` set                                 | `cancelled`   |
    | `expired_at` set                                   | `expired`     |
    | `completed_at` set                                 | `completed`   |
    | `cancelling_at` set                                | `cancelling`  |
    | `in_progress_at` not set                           | `validating`  |
    | `finalizing_at` set, or every request is terminal  | `finalizing`  |
    | otherwise                                          | `in_progress` |

    A batch whose requests all failed ends `completed` (as OpenAI does); `failed` is for a batch that could
    not start at all.
    """
    for attribute, status in FINISHED_STATUS_BY_TIMESTAMP:
        if getattr(batch, attribute) is not None:
            return status
    if batch.cancelling_at is not None:
        return states.BatchStatus.CANCELLING
    if batch.in_progress_at is None:
        return states.BatchStatus.VALIDATING
    counts = batch.counts
    if batch.finalizing_at is not None or (counts.total > 0 and counts.active == 0):
        return states.BatchStatus.FINALIZING
    return states.BatchStatus.IN_PROGRESS
