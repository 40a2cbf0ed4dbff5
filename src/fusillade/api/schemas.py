"""The objects on the wire: the OpenAI `FileObject`, `Batch` and list envelopes with every field the SDK models
(client code reads `status`, `output_file_id` and `request_counts`; the SDK does not validate, so a missing
field would only surface as `None` in user code), plus fusillade's request object and the error envelope.

Times are Unix seconds (ints), or null when the moment has not come. Ids are the wire forms of
`domain.ids` (`file-…`, `batch_…`, `batch_req_…`).

`output_file_id` and `error_file_id` are set as soon as the file has a line, and grow while the batch runs
(fusillade's output and error files are live views of the finished requests); they are null while the file is
empty, so a batch that ends with every request successful has `error_file_id: null` and one whose requests all
failed has `output_file_id: null`, as on OpenAI.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Final, Literal, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fusillade.domain import ids, models, served, states, usage, usage_report
from fusillade.domain.prices import NO_PRICES, Prices


def unix(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


class WireModel(BaseModel):
    model_config = ConfigDict(frozen=True)


# ---------------------------------------------------------------------------------------------- files


class FileObject(WireModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    """Input: the uploaded size. Output and error files: the size of the lines so far."""
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output", "batch_error"]
    status: Literal["uploaded", "processed", "error"] = "processed"
    """Always `processed`: an upload is validated before it is answered."""
    expires_at: int | None = None
    status_details: str | None = None

    @classmethod
    def of(cls, file: models.File) -> FileObject:
        return cls(
            id=ids.file_wire(file.id),
            bytes=file.bytes,
            created_at=int(file.created_at.timestamp()),
            filename=file.filename,
            purpose=file.purpose.value,
            expires_at=unix(file.expires_at),
        )


class FileDeleted(WireModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# -------------------------------------------------------------------------------------------- batches


class BatchErrorItem(WireModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(WireModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorItem]


class RequestCounts(WireModel):
    total: int
    completed: int
    failed: int
    """Requests that ended failed (upstream error, timeout, expiry); cancelled requests are not counted (they
    appear in the error file with code `batch_cancelled`)."""


class BatchObject(WireModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: states.BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    model: str | None = None
    """The model every request of the batch names; null when its input file mixes models."""
    usage: dict[str, Any] | None = None
    """OpenAI's usage shape: the tokens of the completed requests whose response reported usage."""
    requests_without_usage: int = 0
    """fusillade extra: completed requests whose response carried no usage (not in `usage`, never guessed)."""
    cost: BatchCost | None = None
    """fusillade extra: what `usage` cost, when every model of the batch has `pricing` configured."""
    budget: BatchBudget | None = None
    """fusillade extra: the batch's budget, if it was created with one."""

    @classmethod
    def of(cls, batch: models.Batch, prices: Prices = NO_PRICES) -> BatchObject:
        counts = batch.counts
        cost = prices.batch_cost(batch)
        return cls(
            id=ids.batch_wire(batch.id),
            endpoint=batch.endpoint,
            errors=(
                BatchErrors(
                    data=[
                        BatchErrorItem(code=error.code, message=error.message, param=error.param, line=error.line)
                        for error in batch.errors
                    ]
                )
                if batch.errors
                else None
            ),
            input_file_id=ids.file_wire(batch.input_file_id),
            completion_window=batch.completion_window,
            status=batch.status,
            output_file_id=ids.file_wire(batch.output_file_id) if counts.completed else None,
            error_file_id=ids.file_wire(batch.error_file_id) if counts.failed + counts.canceled else None,
            created_at=int(batch.created_at.timestamp()),
            in_progress_at=unix(batch.in_progress_at),
            expires_at=unix(batch.expires_at),
            finalizing_at=unix(batch.finalizing_at),
            completed_at=unix(batch.completed_at),
            failed_at=unix(batch.failed_at),
            expired_at=unix(batch.expired_at),
            cancelling_at=unix(batch.cancelling_at),
            cancelled_at=unix(batch.cancelled_at),
            request_counts=RequestCounts(total=counts.total, completed=counts.completed, failed=counts.failed),
            metadata=None if batch.metadata is None else dict(batch.metadata),
            model=batch.model,
            usage=usage.openai_usage(batch.total_usage),
            requests_without_usage=batch.usage_unknown,
            cost=None if cost is None else BatchCost.of(cost),
            budget=BatchBudget.of(batch),
        )


class BatchCost(WireModel):
    """What a batch's reported usage cost, in US dollars (exact decimals, as JSON numbers)."""

    currency: Literal["usd"] = "usd"
    input: float
    output: float
    total: float

    @classmethod
    def of(cls, cost: usage.Cost) -> BatchCost:
        return cls(input=float(cost.input), output=float(cost.output), total=float(cost.total))


class CreateBatchBody(BaseModel):
    """`POST /v1/batches`. Unknown fields are ignored, so newer SDKs keep working."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    """OpenAI accepts only "24h"; fusillade accepts any duration such as "30m", "2h" or "7d" (up to 365 days)."""
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None
    """Accepted for compatibility and ignored: output files live as long as their batch."""
    budget: BudgetBody | None = None
    """fusillade extra (the SDK: `extra_body={"budget": {...}}`): what the batch may spend."""


class BudgetBody(BaseModel):
    """A batch's budget: once its completed requests reach either limit, its pending requests end failed with
    `budget_exceeded` (calls in flight finish and count)."""

    model_config = ConfigDict(extra="forbid")

    max_total_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    """Input plus output tokens of the completed requests."""
    max_cost: Annotated[Decimal, Field(gt=0, allow_inf_nan=False)] | None = None
    """USD at the configured pricing of the batch's models (each must have `pricing`)."""

    @model_validator(mode="after")
    def _one_limit(self) -> Self:
        if self.max_total_tokens is None and self.max_cost is None:
            raise ValueError("set max_total_tokens, max_cost or both")
        return self

    def budget(self) -> models.Budget:
        return models.Budget(max_total_tokens=self.max_total_tokens, max_cost=self.max_cost)


class BatchBudget(WireModel):
    """A batch's budget as the batch object shows it (fusillade extra)."""

    max_total_tokens: int | None
    max_cost: float | None
    exceeded_at: int | None
    """When its completed requests reached it (its pending requests then ended `budget_exceeded`)."""

    @classmethod
    def of(cls, batch: models.Batch) -> BatchBudget | None:
        budget = batch.budget
        if budget is None:
            return None
        return cls(
            max_total_tokens=budget.max_total_tokens,
            max_cost=None if budget.max_cost is None else float(budget.max_cost),
            exceeded_at=unix(batch.budget_exceeded_at),
        )


# ------------------------------------------------------------------------------------------- requests


class RequestResponse(WireModel):
    status_code: int
    body: Any


class RequestError(WireModel):
    code: str
    message: str | None


class RequestObject(WireModel):
    """One request of a batch (`GET /v1/batches/{id}/requests`, a fusillade extra)."""

    id: str
    object: Literal["batch.request"] = "batch.request"
    batch_id: str
    custom_id: str
    model: str
    line: int
    """1-based line of the input file."""
    state: states.RequestState
    attempt: int
    """Earlier attempts that failed with a retriable error."""
    not_before: int | None
    claimed_at: int | None
    started_at: int | None
    finished_at: int | None
    response: RequestResponse | None
    """The upstream's answer (final, or of the last failed attempt)."""
    error: RequestError | None
    """Why the request failed, or why its last attempt failed while it waits to be retried."""

    @classmethod
    def of(cls, request: models.Request) -> RequestObject:
        response = None
        if request.response_status is not None:
            response = RequestResponse(status_code=request.response_status, body=_json(request.response_body))
        error = None
        if request.error_code is not None:
            error = RequestError(code=request.error_code, message=request.error_message)
        return cls(
            id=ids.request_wire(request.id),
            batch_id=ids.batch_wire(request.batch_id),
            custom_id=request.custom_id,
            model=request.model,
            line=request.line_number,
            state=request.state,
            attempt=request.attempt,
            not_before=unix(request.not_before),
            claimed_at=unix(request.claimed_at),
            started_at=unix(request.started_at),
            finished_at=unix(request.finished_at),
            response=response,
            error=error,
        )


_MAX_NESTING = 254
"""orjson writes JSON nested this deep at most (and pydantic one level more); it reads deeper."""


def _json(text: str | None) -> Any:
    """A stored body as a JSON value; the text itself (a JSON string) when it is not JSON, or when it is
    nested too deeply to be written back (an upstream may answer anything)."""
    if text is None:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    if text.count("[") + text.count("{") >= _MAX_NESTING:  # only then can it be too deep
        try:
            orjson.dumps(value)
        except orjson.JSONEncodeError:
            return text
    return value


# -------------------------------------------------------------------------------------------- listings


class ListEnvelope(WireModel):
    """The OpenAI cursor page: the next page is asked with `after=<last_id>`; `has_more` says if there is one."""

    object: Literal["list"] = "list"
    first_id: str | None
    last_id: str | None
    has_more: bool

    @staticmethod
    def cursors(data: Sequence[FileObject | BatchObject | RequestObject], *, has_more: bool) -> dict[str, Any]:
        """The envelope's fields for a page of `data`."""
        return {
            "first_id": data[0].id if data else None,
            "last_id": data[-1].id if data else None,
            "has_more": has_more,
        }


class FileList(ListEnvelope):
    data: list[FileObject]


class BatchList(ListEnvelope):
    data: list[BatchObject]


class RequestList(ListEnvelope):
    data: list[RequestObject]


# ---------------------------------------------------------------------------------------------- models


OWNED_BY: Final = "fusillade"
"""`owned_by` of every model: never the upstream's host, which would tell internal addresses."""


class ModelObject(WireModel):
    """One model the server serves (`GET /v1/models`, `GET /v1/models/{model}`), as OpenAI shapes it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    """A model with a route of its own: when this process first had the route; a model of the default route:
    when an upload of the caller's owner first named it."""
    owned_by: str = OWNED_BY

    @classmethod
    def of(cls, model: served.ListedModel) -> ModelObject:
        return cls(id=model.name, created=int(model.created_at.timestamp()))


class ModelList(WireModel):
    """OpenAI's models list: every served model in one page (no cursor)."""

    object: Literal["list"] = "list"
    data: list[ModelObject]


# ---------------------------------------------------------------------------------------------- errors


class ErrorLine(WireModel):
    line: int
    """1-based line of the uploaded file; 0 for the file as a whole."""
    message: str


class ErrorBody(WireModel):
    message: str
    type: str
    param: str | None
    code: str | None
    lines: list[ErrorLine] | None = None
    """A rejected upload's bad lines (fusillade extra)."""


class ErrorEnvelope(WireModel):
    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorEnvelope, "description": "Invalid request (bad lines are listed in `error.lines`)."},
    401: {"model": ErrorEnvelope, "description": "Missing, unknown or revoked API key."},
    404: {"model": ErrorEnvelope, "description": "No such object for this caller."},
    503: {"model": ErrorEnvelope, "description": "The database is unavailable; retry after `Retry-After`."},
}
"""For the OpenAPI schema of every authenticated route."""


# ----------------------------------------------------------------------------------------------- usage


class UsageTotals(WireModel):
    """The usage of some completed requests and what it cost."""

    requests: int
    """Completed requests, with or without usage reported."""
    requests_without_usage: int
    """Those of `requests` whose response carried no usage (not in `usage`, never guessed)."""
    usage: dict[str, Any]
    """OpenAI's usage shape (as on the batch object): the tokens of the requests that reported them."""
    cost: BatchCost | None
    """What `usage` cost, in US dollars; null when a model of it has no `pricing` configured."""


def _totals(requests: int, unknown: int, tokens: usage.Usage, cost: usage.Cost | None) -> dict[str, Any]:
    return {
        "requests": requests + unknown,
        "requests_without_usage": unknown,
        "usage": usage.openai_usage(tokens),
        "cost": None if cost is None else BatchCost.of(cost),
    }


class UsageRowObject(UsageTotals):
    """One row of `GET /v1/usage` grouped by model: an owner's model."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    owner: str
    model: str

    @staticmethod
    def of(priced: usage_report.PricedRow) -> UsageRowObject:
        row = priced.row
        common = {
            "owner": row.owner,
            "model": row.model,
            **_totals(row.requests, row.unknown, row.usage, priced.cost),
        }
        if row.day is not None:
            return DayUsageRowObject(day=row.day.isoformat(), **common)
        if row.batch_id is not None:
            return BatchUsageRowObject(batch_id=ids.batch_wire(row.batch_id), **common)
        return UsageRowObject(**common)


class DayUsageRowObject(UsageRowObject):
    """A row grouped by day: an owner's model on one UTC day."""

    day: str
    """`YYYY-MM-DD` (UTC), the day the requests completed on."""


class BatchUsageRowObject(UsageRowObject):
    """A row grouped by batch: an owner's model in one batch."""

    batch_id: str


class UsageList(WireModel):
    """`GET /v1/usage` (fusillade extra): token usage and cost of completed requests, a row per owner and model
    (and per day or batch, as `group_by` says), and their total."""

    object: Literal["list"] = "list"
    group_by: usage_report.UsageGrouping
    since: str | None
    """The first UTC day counted (`YYYY-MM-DD`), or null for every day."""
    data: list[DayUsageRowObject | BatchUsageRowObject | UsageRowObject]
    total: UsageTotals

    @classmethod
    def of(
        cls, report: usage_report.UsageReport, *, by: usage_report.UsageGrouping, since: date | None
    ) -> UsageList:
        return cls(
            group_by=by,
            since=None if since is None else since.isoformat(),
            data=[UsageRowObject.of(row) for row in report.rows],
            total=UsageTotals(**_totals(report.requests, report.unknown, report.usage, report.cost)),
        )
