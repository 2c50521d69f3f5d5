"""The SQL behind `dispatcher report`: per-recipient rows streamed in batches, and summaries.

Every query reads the delivery log as it is: nothing is cached or kept between batches, and each
batch runs in its own short transaction, so a report over a large database neither holds memory
in proportion to the audience nor keeps SQLite's write lock from a running daemon for long.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import astuple, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import phonenumbers
from sqlalchemy import ColumnElement, Select, case, func, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from dispatcher.store.tables import Delivery, DeliveryStatus, StageRun

D = Delivery.__table__  # type: ignore[attr-defined]
R = StageRun.__table__  # type: ignore[attr-defined]
S = DeliveryStatus

# A span of sends up to this long is charted per minute, anything longer per hour.
MINUTE_BUCKETS_UP_TO = timedelta(hours=6)
# Region of an E.164 number: its country code and this many national digits (+86 138: carrier).
NATIONAL_PREFIX_DIGITS = 3


@dataclass(frozen=True, slots=True)
class ReportFilter:
    """Which deliveries a report covers: all, one campaign, one stage (of one campaign)."""

    campaign: str | None = None
    stage: str | None = None

    def runs(self) -> Select[Any]:
        """The ids of the stage runs this filter selects."""
        stmt = select(R.c.id)
        if self.campaign:
            stmt = stmt.where(R.c.campaign == self.campaign)
        if self.stage:
            stmt = stmt.where(R.c.stage == self.stage)
        return stmt

    def where(self) -> ColumnElement[bool] | None:
        """The condition on deliveries, or None for every delivery."""
        if not self.campaign and not self.stage:
            return None
        condition: ColumnElement[bool] = D.c.stage_run_id.in_(self.runs())
        return condition

    def describe(self) -> str:
        """How the filter reads in a message: 'campaign X, stage Y' or 'all campaigns'."""
        parts = []
        if self.campaign:
            parts.append(f"campaign {self.campaign}")
        if self.stage:
            parts.append(f"stage {self.stage}")
        return ", ".join(parts) or "all campaigns"


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """One recipient of one stage run: what happened to the message (address unmasked)."""

    id: int
    run_id: int
    campaign: str
    stage: str
    fire_time: datetime
    channel: str
    address: str
    status: str
    reason: str | None
    provider_id: str | None
    error_code: str | None
    error_reason: str | None
    attempts: int
    sent_at: datetime | None
    final_at: datetime | None


@dataclass(frozen=True, slots=True)
class Counts:
    """Deliveries by outcome.

    `sent` is the funnel's middle step: every message a provider accepted, whatever happened
    next (so it includes `delivered`, and failures reported after acceptance). The statuses
    (`delivered`, `sent_only`, `failed`, `suppressed`, `unknown`, `open`) add up to `total`.
    """

    total: int = 0
    sent: int = 0
    delivered: int = 0
    sent_only: int = 0  # status "sent": accepted, no receipt (yet, or none expected)
    failed: int = 0
    suppressed: int = 0
    unknown: int = 0
    open: int = 0  # pending, claimed or sending: not settled yet

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def by_status(self) -> dict[str, int]:
        """The partition of `total` by final state (open states together)."""
        return {
            S.DELIVERED: self.delivered, S.SENT: self.sent_only, S.FAILED: self.failed,
            S.SUPPRESSED: self.suppressed, S.UNKNOWN: self.unknown, "open": self.open,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class ChannelCounts:
    """Deliveries of one channel by outcome."""

    channel: str
    counts: Counts


@dataclass(frozen=True, slots=True)
class ErrorCount:
    """How many deliveries ended (or wait) with one error code (or reason) on one channel."""

    channel: str
    status: str
    code: str
    count: int
    example: str | None


@dataclass(frozen=True, slots=True)
class RegionCount:
    """Deliveries to one region: `+86138` (country code and carrier prefix) or an e-mail domain."""

    region: str
    counts: Counts


@dataclass(frozen=True, slots=True)
class Timeline:
    """Messages accepted per minute or hour (bucket starts in UTC); empty buckets left out."""

    unit: Literal["minute", "hour"]
    buckets: list[tuple[datetime, int]]
    first_sent: datetime | None = None
    last_sent: datetime | None = None

    @property
    def step(self) -> timedelta:
        return timedelta(minutes=1) if self.unit == "minute" else timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Audience:
    """What the stage runs read: audience rows, rejected ones, and how many runs."""

    runs: int = 0
    rows_read: int = 0
    invalid: int = 0
    duplicates: int = 0


@dataclass
class ReportSummary:
    """Everything a report shows besides the per-recipient rows."""

    filter: ReportFilter
    generated_at: datetime
    audience: Audience
    totals: Counts
    channels: list[ChannelCounts] = field(default_factory=list)
    errors: list[ErrorCount] = field(default_factory=list)
    regions: list[RegionCount] = field(default_factory=list)
    timeline: Timeline = field(default_factory=lambda: Timeline("hour", []))

    @property
    def empty(self) -> bool:
        return self.totals.total == 0


def _where(stmt: Select[Any], condition: ColumnElement[bool] | None) -> Select[Any]:
    return stmt if condition is None else stmt.where(condition)


def _count_if(condition: ColumnElement[bool]) -> Any:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


_SENT = or_(D.c.sent_at.is_not(None), D.c.status.in_([S.SENT, S.DELIVERED]))
_COUNT_COLUMNS = (
    func.count().label("total"),
    _count_if(_SENT).label("sent"),
    _count_if(D.c.status == S.DELIVERED).label("delivered"),
    _count_if(D.c.status == S.SENT).label("sent_only"),
    _count_if(D.c.status == S.FAILED).label("failed"),
    _count_if(D.c.status == S.SUPPRESSED).label("suppressed"),
    _count_if(D.c.status == S.UNKNOWN).label("unknown"),
    _count_if(D.c.status.in_(S.OPEN)).label("open"),
)


def _counts(row: Any) -> Counts:
    return Counts(*(int(row._mapping[column.name]) for column in _COUNT_COLUMNS))


async def known_stages(engine: AsyncEngine) -> set[tuple[str, str]]:
    """Every (campaign, stage) that has at least one stage run in the database."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(R.c.campaign, R.c.stage).distinct())).all()
    return {(str(c), str(s)) for c, s in rows}


async def iter_rows(
    engine: AsyncEngine, where: ReportFilter, *, batch: int = 2000, limit: int | None = None
) -> AsyncIterator[list[DeliveryRow]]:
    """The filter's deliveries in id order, in batches of `batch` (at most `limit` in all)."""
    condition = where.where()
    stmt = select(
        D.c.id, D.c.stage_run_id, R.c.campaign, R.c.stage, R.c.fire_time, D.c.channel,
        D.c.address, D.c.status, D.c.reason, D.c.provider_id, D.c.error_code, D.c.error_reason,
        D.c.attempts, D.c.sent_at, D.c.final_at,
    ).join(R, R.c.id == D.c.stage_run_id)  # fmt: skip
    stmt = _where(stmt, condition).order_by(D.c.id)
    last = 0
    remaining = limit
    while remaining is None or remaining > 0:
        size = batch if remaining is None else min(batch, remaining)
        async with engine.connect() as conn:
            rows = (await conn.execute(stmt.where(D.c.id > last).limit(size))).all()
        if not rows:
            return
        yield [DeliveryRow(*row) for row in rows]
        last = rows[-1][0]
        if remaining is not None:
            remaining -= len(rows)


async def summary(engine: AsyncEngine, where: ReportFilter, *, now: datetime) -> ReportSummary:
    """Funnel, channels, errors, regions and sends over time for the filter's deliveries."""
    condition = where.where()
    async with engine.connect() as conn:
        audience_row = (
            await conn.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(R.c.rows_read), 0),
                    func.coalesce(func.sum(R.c.invalid), 0),
                    func.coalesce(func.sum(R.c.duplicates), 0),
                ).where(R.c.id.in_(where.runs()))
            )
        ).one()
        channel_rows = (
            await conn.execute(
                _where(select(D.c.channel, *_COUNT_COLUMNS), condition)
                .group_by(D.c.channel)
                .order_by(D.c.channel)
            )
        ).all()
    channels = [ChannelCounts(str(row.channel), _counts(row)) for row in channel_rows]
    totals = sum((c.counts for c in channels), Counts())
    return ReportSummary(
        filter=where,
        generated_at=now,
        audience=Audience(*(int(v) for v in audience_row)),
        totals=totals,
        channels=channels,
        errors=await errors(engine, condition),
        regions=await regions(engine, condition),
        timeline=await timeline(engine, condition),
    )


async def errors(engine: AsyncEngine, condition: ColumnElement[bool] | None) -> list[ErrorCount]:
    """Deliveries with an error code (or, without one, a reason) by channel, status and code."""
    code = func.coalesce(D.c.error_code, D.c.reason, literal("-"))
    stmt = _where(
        select(D.c.channel, D.c.status, code.label("code"), func.count().label("n"),
               func.max(D.c.error_reason).label("example"))
        .where(or_(D.c.error_code.is_not(None), D.c.reason.is_not(None),
                   D.c.status.in_([S.FAILED, S.UNKNOWN, S.SUPPRESSED]))),
        condition,
    ).group_by(D.c.channel, D.c.status, code)  # fmt: skip
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    out = [
        ErrorCount(str(r.channel), str(r.status), str(r.code), int(r.n), r.example) for r in rows
    ]
    return sorted(out, key=lambda e: (-e.count, e.channel, e.code))


def region_of(address: str) -> str:
    """The region an address counts under: `+86138` for E.164, an e-mail's domain, or 'other'."""
    if address.startswith("+") and address[1:].isdigit():
        digits = address[1:]
        for length in (1, 2, 3):
            # Country codes are prefix-free: the first known one is the code.
            if int(digits[:length]) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
                return "+" + digits[: length + NATIONAL_PREFIX_DIGITS]
        return "+" + digits[: 3 + NATIONAL_PREFIX_DIGITS]
    if "@" in address:
        return address.rpartition("@")[2].lower()
    return "other"


def _after_at(engine: AsyncEngine) -> Any:
    """SQL for the part of `address` after its '@' (the dialects name `position` differently)."""
    position = func.strpos if engine.dialect.name == "postgresql" else func.instr
    return func.lower(func.substr(D.c.address, position(D.c.address, "@") + 1))


async def regions(engine: AsyncEngine, condition: ColumnElement[bool] | None) -> list[RegionCount]:
    """Deliveries by region prefix, largest first.

    The database groups by the address's first 7 characters ('+' and up to 3 + 3 digits) or its
    domain, so only a few thousand groups at most come back; they fold here into regions.
    """
    key = case(
        (D.c.address.like("+%"), func.substr(D.c.address, 1, 4 + NATIONAL_PREFIX_DIGITS)),
        (D.c.address.like("%@%"), literal("@") + _after_at(engine)),
        else_=literal("other"),
    )
    stmt = _where(select(key.label("key"), *_COUNT_COLUMNS), condition).group_by(key)
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    folded: dict[str, Counts] = {}
    for row in rows:
        raw = str(row.key)
        region = raw[1:] if raw.startswith("@") else region_of(raw)
        folded[region] = folded.get(region, Counts()) + _counts(row)
    return sorted(
        (RegionCount(region, counts) for region, counts in folded.items()),
        key=lambda r: (-r.counts.total, r.region),
    )


def _bucket(engine: AsyncEngine, unit: Literal["minute", "hour"]) -> Any:
    if engine.dialect.name == "postgresql":
        return func.date_trunc(unit, D.c.sent_at)
    pattern = "%Y-%m-%d %H:%M:00" if unit == "minute" else "%Y-%m-%d %H:00:00"
    return func.strftime(pattern, D.c.sent_at)


def _as_utc(value: Any) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


async def timeline(engine: AsyncEngine, condition: ColumnElement[bool] | None) -> Timeline:
    """Messages accepted per minute (spans up to 6 hours) or per hour, by `sent_at`."""
    sent = D.c.sent_at.is_not(None)
    async with engine.connect() as conn:
        first, last = (
            await conn.execute(
                _where(select(func.min(D.c.sent_at), func.max(D.c.sent_at)).where(sent), condition)
            )
        ).one()
        if first is None or last is None:
            return Timeline("hour", [])
        first, last = _as_utc(first), _as_utc(last)
        unit: Literal["minute", "hour"] = (
            "minute" if last - first <= MINUTE_BUCKETS_UP_TO else "hour"
        )
        bucket = _bucket(engine, unit).label("bucket")
        rows = (
            await conn.execute(
                _where(select(bucket, func.count()).where(sent), condition)
                .group_by(bucket)
                .order_by(bucket)
            )
        ).all()
    return Timeline(unit, [(_as_utc(b), int(n)) for b, n in rows], first, last)
