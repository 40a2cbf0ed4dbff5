"""`fusillade usage`: the token usage and cost of completed requests by model, day or batch, read straight from the
database's usage sums (every owner's unless `--owner` says which: an operator's view, like `fusillade status`),
priced with the configuration's `[models."NAME".pricing]`. The numbers are those of `GET /v1/usage`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from decimal import Decimal
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.markup import escape
from rich.table import Table

from fusillade.cli import common
from fusillade.domain import ids, models, usage, usage_report
from fusillade.domain.usage_report import UsageGrouping

T = TypeVar("T")
INVALID = common.ExitCode.INVALID

_TOKEN_COLUMNS = ("requests", "without usage", "input", "cached", "output", "reasoning", "total")


def usage_command(
    by: Annotated[
        str,
        typer.Option(
            "--by",
            metavar="GROUPING",
            help="What a row sums: model, day (UTC) or batch; rows are split by owner and model too.",
        ),
    ] = "model",
    owner: Annotated[
        str | None,
        typer.Option(
            "--owner", metavar="NAME", help="Only this owner's usage (default: every owner's).", show_default=False
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since", metavar="DATE", help="Only the UTC days from DATE (YYYY-MM-DD) on.", show_default=False
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    config: common.ConfigOption = None,
    database_url: common.DatabaseUrlOption = None,
) -> None:
    """Show the token usage and cost, by model, day or batch.

    Reads the database directly: every owner's usage unless --owner names one. Each row sums an owner's model
    (per day or batch with --by); cost comes from the configuration's pricing, "-" for a model without.
    """
    grouping = _parsed(usage_report.grouping, by, "--by")
    first_day = None if since is None else _parsed(usage_report.since_day, since, "--since")
    if owner is not None and not owner.strip():
        common.fail("--owner must name an owner, such as --owner alice; leave it out for every owner.", INVALID)
    owner = None if owner is None else owner.strip()
    scope: models.OwnerScope = models.ALL_OWNERS if owner is None else owner
    settings = common.load(config, FUSILLADE_DATABASE_URL=("--database-url", database_url))
    found = common.execute(
        common.using_storage(
            settings, lambda storage: storage.usage_report(owner=scope, since=first_day, by=grouping)
        )
    )
    prices = settings.prices()
    report = usage_report.priced(found, prices)
    if as_json:
        document = {
            "group_by": str(grouping),
            "owner": owner,
            "since": None if first_day is None else first_day.isoformat(),
            "data": [_row_json(row) for row in report.rows],
            "total": _totals_json(report.requests, report.unknown, report.usage, report.cost),
        }
        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        return
    if not report.rows:
        common.stdout.print(f"No usage{_scope_words(owner, first_day)}.", highlight=False, markup=False)
        return
    common.stdout.print(_table(report, grouping, owner, first_day, priced=prices.configured))


def _parsed(parse: Callable[[str], T], text: str, option: str) -> T:
    try:
        return parse(text)
    except ValueError as exc:
        common.fail(f"{option} {exc}", INVALID)


def _scope_words(owner: str | None, since: date | None) -> str:
    who = " of every owner" if owner is None else f" of {owner}"
    return who + ("" if since is None else f" since {since.isoformat()}")


# ------------------------------------------------------------------------------------------------- table


def _table(
    report: usage_report.UsageReport,
    grouping: UsageGrouping,
    owner: str | None,
    since: date | None,
    *,
    priced: bool,
) -> Table:
    keys = ([] if owner is not None else ["owner"]) + ([] if grouping is UsageGrouping.MODEL else [str(grouping)])
    headers = [*keys, "model", *_TOKEN_COLUMNS, *(["cost (USD)"] if priced else [])]
    title = escape(f"Usage by {grouping}{_scope_words(owner, since)}")
    table = common.table(title, *headers, identifiers=len(keys) + 1)
    for column in table.columns[len(keys) + 1 :]:
        column.justify = "right"
    for index, priced_row in enumerate(report.rows):
        row = priced_row.row
        cells = ([] if owner is not None else [escape(row.owner)]) + _key_cells(row, grouping)
        table.add_row(
            *cells,
            escape(row.model),
            *_token_cells(row.completed, row.unknown, row.usage),
            *([_money(priced_row.cost)] if priced else []),
            end_section=index == len(report.rows) - 1,
        )
    blanks = [""] * len(keys)
    table.add_row(
        "total",
        *blanks,
        *_token_cells(report.completed, report.unknown, report.usage),
        *([_money(report.cost)] if priced else []),
        style="bold",
    )
    return table


def _key_cells(row: usage_report.UsageRow, grouping: UsageGrouping) -> list[str]:
    if row.day is not None:
        return [row.day.isoformat()]
    if row.batch_id is not None:
        return [ids.batch_wire(row.batch_id)]
    return []


def _token_cells(completed: int, unknown: int, tokens: usage.Usage) -> list[str]:
    counts = (
        completed,
        unknown,
        tokens.input_tokens,
        tokens.cached_tokens,
        tokens.output_tokens,
        tokens.reasoning_tokens,
        tokens.total_tokens,
    )
    return [f"{count:,}" for count in counts]


def _money(cost: usage.Cost | None) -> str:
    """The exact total (never rounded: a million cheap tokens may cost a fraction of a cent); "-" for none."""
    return "-" if cost is None else _decimal_text(cost.total)


def _decimal_text(value: Decimal) -> str:
    text = f"{value:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


# --------------------------------------------------------------------------------------------------- json


def _row_json(priced: usage_report.PricedRow) -> dict[str, Any]:
    row = priced.row
    keys: dict[str, Any] = {"owner": row.owner, "model": row.model}
    if row.day is not None:
        keys["day"] = row.day.isoformat()
    if row.batch_id is not None:
        keys["batch_id"] = ids.batch_wire(row.batch_id)
    return {**keys, **_totals_json(row.requests, row.unknown, row.usage, priced.cost)}


def _totals_json(requests: int, unknown: int, tokens: usage.Usage, cost: usage.Cost | None) -> dict[str, Any]:
    """As `GET /v1/usage` writes them: `requests` counts every completed request, with or without usage."""
    return {
        "requests": requests + unknown,
        "requests_without_usage": unknown,
        "usage": usage.openai_usage(tokens),
        "cost": usage.cost_fields(cost),
    }
