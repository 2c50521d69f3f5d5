"""Report writers: per-recipient rows as CSV or JSON lines, and summary tables for a terminal.

Writers take rows batch by batch and keep nothing once a batch is written. Addresses are masked
here, at the last moment, unless the operator asked for them unmasked. Times are shown in the
report's time zone, as ISO 8601 with their offset in files (unambiguous, and Excel-readable).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol, TextIO
from zoneinfo import ZoneInfo

from rich.table import Table

from dispatcher.addresses import mask_address
from dispatcher.reports.queries import Counts, DeliveryRow, ReportSummary

COLUMNS = (
    "delivery_id", "run_id", "campaign", "stage", "fired_at", "channel", "address", "status",
    "reason", "provider_id", "error_code", "error_reason", "attempts", "sent_at", "final_at",
)  # fmt: skip
# What a terminal has room for; files get every column.
TABLE_COLUMNS = ("stage", "channel", "address", "status", "error", "attempts", "sent", "final")
COUNT_COLUMNS = ("total", "sent", "delivered", "failed", "suppressed", "unknown", "open")


def local_time(moment: datetime | None, tz: ZoneInfo) -> str | None:
    """`moment` in `tz` as ISO 8601 with its offset, to the second (None stays None)."""
    if moment is None:
        return None
    return moment.astimezone(tz).isoformat(timespec="seconds")


def short_time(moment: datetime | None, tz: ZoneInfo) -> str:
    """`moment` in `tz` as 'YYYY-MM-DD HH:MM:SS' for tables people read ('' when absent)."""
    return "" if moment is None else moment.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")


def shown_address(address: str, unmasked: bool) -> str:
    """The address as a report shows it: masked unless the operator asked otherwise."""
    return address if unmasked else mask_address(address)


def record(row: DeliveryRow, *, unmasked: bool, tz: ZoneInfo) -> dict[str, Any]:
    """One delivery as a flat mapping with the keys of `COLUMNS`."""
    return {
        "delivery_id": row.id,
        "run_id": row.run_id,
        "campaign": row.campaign,
        "stage": row.stage,
        "fired_at": local_time(row.fire_time, tz),
        "channel": row.channel,
        "address": shown_address(row.address, unmasked),
        "status": row.status,
        "reason": row.reason,
        "provider_id": row.provider_id,
        "error_code": row.error_code,
        "error_reason": row.error_reason,
        "attempts": row.attempts,
        "sent_at": local_time(row.sent_at, tz),
        "final_at": local_time(row.final_at, tz),
    }


class RowWriter(Protocol):
    """Something that writes batches of delivery rows to a text stream."""

    def write(self, rows: Sequence[DeliveryRow]) -> None: ...


class CsvWriter:
    """CSV with a header line; give it a stream opened with encoding 'utf-8-sig' and newline=''.

    The BOM that 'utf-8-sig' writes first is what makes Excel (on Chinese Windows too) read
    the file as UTF-8 instead of the local code page.
    """

    def __init__(self, stream: TextIO, *, unmasked: bool, tz: ZoneInfo) -> None:
        self._csv = csv.DictWriter(stream, fieldnames=COLUMNS, lineterminator="\r\n")
        self._unmasked = unmasked
        self._tz = tz
        self._csv.writeheader()

    def write(self, rows: Sequence[DeliveryRow]) -> None:
        """Append rows (absent values as empty cells)."""
        self._csv.writerows(
            {
                k: "" if v is None else v
                for k, v in record(r, unmasked=self._unmasked, tz=self._tz).items()
            }
            for r in rows
        )


class JsonLinesWriter:
    """One JSON object per delivery per line, keys as in `COLUMNS`, absent values as null."""

    def __init__(self, stream: TextIO, *, unmasked: bool, tz: ZoneInfo) -> None:
        self._stream = stream
        self._unmasked = unmasked
        self._tz = tz

    def write(self, rows: Sequence[DeliveryRow]) -> None:
        """Append one line per row."""
        self._stream.writelines(
            json.dumps(record(r, unmasked=self._unmasked, tz=self._tz), ensure_ascii=False) + "\n"
            for r in rows
        )


def _count_cells(counts: Counts) -> list[str]:
    return [str(getattr(counts, column)) for column in COUNT_COLUMNS]


def percent(part: int, whole: int) -> str:
    """`part` of `whole` as '12.3%' ('-' when there is no whole)."""
    return f"{100 * part / whole:.1f}%" if whole else "-"


def summary_tables(
    summary: ReportSummary, tz: ZoneInfo, *, regions: int = 15, time_lines: int = 48
) -> list[Table]:
    """The summaries as terminal tables: funnel, channels, errors, top regions, sends over time."""
    totals = summary.totals
    funnel = Table(title="funnel", show_edge=False, title_justify="left")
    for column in ("step", "deliveries", "of materialised"):
        funnel.add_column(column, justify="right" if column != "step" else "left")
    audience = summary.audience
    funnel.add_row("audience rows read", str(audience.rows_read), "")
    funnel.add_row("  invalid / duplicates", f"{audience.invalid} / {audience.duplicates}", "")
    for step, count in (
        ("materialised", totals.total),
        ("sent (accepted by provider)", totals.sent),
        ("delivered (receipt)", totals.delivered),
    ):
        funnel.add_row(step, str(count), percent(count, totals.total))
    for status, count in totals.by_status.items():
        if status != "delivered" and count:
            funnel.add_row(f"  ended {status}" if status != "open" else "  still open", str(count),
                           percent(count, totals.total))  # fmt: skip

    channels = Table(title="by channel", show_edge=False, title_justify="left")
    for column in ("channel", *COUNT_COLUMNS):
        channels.add_column(column, justify="left" if column == "channel" else "right")
    for item in summary.channels:
        channels.add_row(item.channel, *_count_cells(item.counts))

    errors = Table(title="by error code", show_edge=False, title_justify="left")
    for column in ("channel", "status", "code", "count", "example reason"):
        errors.add_column(column, justify="right" if column == "count" else "left")
    for error in summary.errors:
        errors.add_row(
            error.channel, error.status, error.code, str(error.count), error.example or ""
        )

    region_table = Table(title="by region", show_edge=False, title_justify="left")
    for column in ("region", *COUNT_COLUMNS):
        region_table.add_column(column, justify="left" if column == "region" else "right")
    for region in summary.regions[:regions]:
        region_table.add_row(region.region, *_count_cells(region.counts))
    if len(summary.regions) > regions:
        rest = sum((r.counts for r in summary.regions[regions:]), Counts())
        region_table.add_row(f"{len(summary.regions) - regions} others", *_count_cells(rest))

    over_time = _over_time_table(summary, tz, max_lines=time_lines)
    return [funnel, channels, errors, region_table, over_time]


def _over_time_table(summary: ReportSummary, tz: ZoneInfo, *, max_lines: int) -> Table:
    """Sends per minute or hour; per day instead when that would not fit on a screen."""
    timeline = summary.timeline
    unit: str = timeline.unit
    fmt = "%Y-%m-%d %H:%M"
    lines: list[tuple[str, int]] = [
        (start.astimezone(tz).strftime(fmt), count) for start, count in timeline.buckets
    ]
    if len(lines) > max_lines:
        unit, days = "day", dict[str, int]()
        for start, count in timeline.buckets:
            day = start.astimezone(tz).strftime("%Y-%m-%d")
            days[day] = days.get(day, 0) + count
        lines = list(days.items())
    table = Table(title=f"sends per {unit} ({tz.key})", show_edge=False, title_justify="left")
    table.add_column(unit)
    table.add_column("sent", justify="right")
    table.add_column("")
    peak = max((count for _, count in lines), default=0)
    for label, count in lines:
        table.add_row(label, str(count), "█" * max(1, round(30 * count / peak)) if peak else "")
    return table


def rows_table(rows: Iterable[DeliveryRow], *, unmasked: bool, tz: ZoneInfo) -> Table:
    """Per-recipient rows as a terminal table (the columns a terminal has room for)."""
    table = Table(title="deliveries", show_edge=False, title_justify="left")
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="right" if column == "attempts" else "left")
    for row in rows:
        error = ": ".join(p for p in (row.error_code, row.error_reason or row.reason) if p)
        table.add_row(
            f"{row.campaign}/{row.stage}",
            row.channel,
            shown_address(row.address, unmasked),
            row.status,
            error,
            str(row.attempts),
            short_time(row.sent_at, tz),
            short_time(row.final_at, tz),
        )
    return table
