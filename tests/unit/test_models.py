"""Domain records (`domain.models`): completion windows, aware datetimes, write reports."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusillade import errors
from fusillade.domain import ids, models, states

NOW = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", timedelta(hours=24)),
        ("1s", timedelta(seconds=1)),
        ("90m", timedelta(minutes=90)),
        ("7d", timedelta(days=7)),
        ("007h", timedelta(hours=7)),
        ("365d", timedelta(days=365)),
        ("8760h", timedelta(days=365)),
    ],
)
def test_completion_windows(text: str, expected: timedelta) -> None:
    assert models.parse_completion_window(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "24",
        "h",
        "0h",
        "-1h",
        "1.5h",
        "24H",
        " 24h",
        "24h ",
        "24h\n",
        "24 h",
        "1w",
        "\u0662\u0664h",
        "1" * 10 + "s",
        "1" * 5000 + "h",
        "366d",
        "999999999d",
    ],
)
def test_bad_completion_windows_are_validation_errors(text: str) -> None:
    with pytest.raises(errors.ValidationError, match="completion_window"):
        models.parse_completion_window(text)


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[0-9]{1,10}[smhdw]?", fullmatch=True) | st.text())
def test_a_window_parses_or_is_a_validation_error(text: str) -> None:
    try:
        window = models.parse_completion_window(text)
    except errors.ValidationError:
        return
    assert window > timedelta(0)
    assert window.total_seconds() % {"s": 1, "m": 60, "h": 3600, "d": 86400}[text[-1]] == 0


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        models.File(
            id=ids.new_file_id(),
            owner="alice",
            filename="in.jsonl",
            purpose=states.FilePurpose.BATCH,
            bytes=1,
            created_at=NOW.replace(tzinfo=None),
        )
    with pytest.raises(ValueError, match="timezone-aware"):
        models.Request(
            id=ids.new_request_id(),
            batch_id=ids.new_batch_id(),
            template_id=ids.new_template_id(),
            owner="alice",
            custom_id="a",
            model="m",
            line_number=1,
            state=states.RequestState.PENDING,
            not_before=datetime(2025, 1, 1),
        )


def test_request_counts_sums() -> None:
    counts = models.RequestCounts(total=10, pending=2, in_progress=3, completed=1, failed=1, canceled=3)
    assert (counts.active, counts.terminal) == (5, 5)


APPLIED = ids.RequestId(uuid.UUID(int=1))
CONFLICTED = ids.RequestId(uuid.UUID(int=2))
MISSING = ids.RequestId(uuid.UUID(int=3))
UNKNOWN = ids.RequestId(uuid.UUID(int=4))
REPORT = models.WriteReport(
    applied=frozenset({APPLIED}),
    conflicts={CONFLICTED: states.RequestState.COMPLETED},
    missing=frozenset({MISSING}),
)


def test_write_report_check_passes_an_applied_write() -> None:
    REPORT.check(APPLIED)


def test_write_report_check_raises_state_conflict_with_the_state() -> None:
    with pytest.raises(errors.StateConflict, match=ids.request_wire(CONFLICTED)) as caught:
        REPORT.check(CONFLICTED)
    assert caught.value.current_state == "completed"
    assert "completed" in caught.value.message


@pytest.mark.parametrize("request_id", [MISSING, UNKNOWN])
def test_write_report_check_raises_not_found(request_id: ids.RequestId) -> None:
    with pytest.raises(errors.NotFound, match=ids.request_wire(request_id)):
        REPORT.check(request_id)


def test_records_are_frozen() -> None:
    with pytest.raises(AttributeError):
        REPORT.applied = frozenset()  # type: ignore[misc]
