"""The database tables (SQLModel). Times are stored as naive UTC and read back as aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, DateTime, Index, Text, UniqueConstraint, text
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC out, naive UTC in the database (SQLite has no time zones)."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # raw SQL on SQLite returns text
            value = datetime.fromisoformat(value)
        moment: datetime = value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def utc_column(*, nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class DeliveryStatus:
    """Delivery states. Terminal: SENT, DELIVERED, FAILED, SUPPRESSED, UNKNOWN."""

    PENDING = "pending"  # waiting to be claimed (maybe until not_before)
    CLAIMED = "claimed"  # leased by a worker, provider not yet called: safe to give back
    SENDING = "sending"  # provider call may have happened: never resent blindly
    SENT = "sent"  # accepted by the provider
    DELIVERED = "delivered"  # receipt says it arrived
    FAILED = "failed"  # permanently refused or undelivered, with code and reason
    SUPPRESSED = "suppressed"  # not sent on purpose: opted out, expired
    UNKNOWN = "unknown"  # in flight when the answer was lost: needs reconciliation

    ALL = (PENDING, CLAIMED, SENDING, SENT, DELIVERED, FAILED, SUPPRESSED, UNKNOWN)
    OPEN = (PENDING, CLAIMED, SENDING)
    TERMINAL = (SENT, DELIVERED, FAILED, SUPPRESSED, UNKNOWN)
    LEASED = (CLAIMED, SENDING)  # held by a worker: a lease to renew or to recover


#: The condition of the leased-rows index. A query uses that index only when its own condition
#: contains this one as written (SQLite proves nothing about bound parameters), hence literals.
LEASED_CONDITION = "status IN ({})".format(", ".join(f"'{s}'" for s in DeliveryStatus.LEASED))


class StageRunStatus:
    """Stage-run states."""

    MATERIALISING = "materialising"
    READY = "ready"
    MISSED = "missed"
    FAILED = "failed"


class StageRun(SQLModel, table=True):
    """One firing of one stage; unique per (campaign, stage, fire time) so a firing happens once."""

    __tablename__ = "stage_runs"
    __table_args__ = (
        UniqueConstraint("campaign", "stage", "fire_time", name="uq_stage_run_firing"),
    )

    id: int | None = Field(default=None, primary_key=True)
    campaign: str = Field(max_length=64)
    stage: str = Field(max_length=64)
    fire_time: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    firing_index: int = 0
    channel: str = Field(max_length=64)
    trigger: str = Field(max_length=16)  # scheduled | catch-up | manual | rehearsal
    status: str = Field(max_length=16)
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    materialised_at: datetime | None = utc_column()
    rows_read: int = 0
    invalid: int = 0
    duplicates: int = 0
    deliveries: int = 0
    checkpoint_line: int = 0
    owner: str | None = Field(default=None, max_length=128)
    lease_until: datetime | None = utc_column()
    error: str | None = Field(default=None, sa_column=Column(Text))


class Delivery(SQLModel, table=True):
    """One recipient of one stage run on one channel: the per-recipient delivery log."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("stage_run_id", "channel", "address", name="uq_delivery_recipient"),
        # Claims read it in order: earliest due first, then by id (see queue.claim; 0003).
        Index("ix_deliveries_due", "channel", "status", "not_before", "id"),
        Index("ix_deliveries_run_status", "stage_run_id", "status"),
        # Housekeeping renews and recovers leases at every heartbeat: only the rows under a
        # lease, a few hundred whatever the queue's size (migration 0003).
        Index(
            "ix_deliveries_leased",
            "owner",
            "lease_until",
            sqlite_where=text(LEASED_CONDITION),
            postgresql_where=text(LEASED_CONDITION),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    stage_run_id: int = Field(foreign_key="stage_runs.id")
    channel: str = Field(max_length=64)
    address: str = Field(max_length=320)
    line: int = 0
    body: str = Field(sa_column=Column(Text, nullable=False))
    subject: str | None = Field(default=None, sa_column=Column(Text))
    html: str | None = Field(default=None, sa_column=Column(Text))
    encoding: str = Field(default="GSM-7", max_length=8)
    segments: int = 1
    status: str = Field(max_length=16)
    reason: str | None = Field(default=None, max_length=64)
    provider_id: str | None = Field(default=None, max_length=128, index=True)
    error_code: str | None = Field(default=None, max_length=64)
    error_reason: str | None = Field(default=None, sa_column=Column(Text))
    attempts: int = 0
    not_before: datetime | None = utc_column()
    valid_until: datetime | None = utc_column()
    owner: str | None = Field(default=None, max_length=128)
    lease_until: datetime | None = utc_column()
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    claimed_at: datetime | None = utc_column()
    sent_at: datetime | None = utc_column()
    final_at: datetime | None = utc_column()


class Attempt(SQLModel, table=True):
    """One provider call for one delivery, with its outcome and latency."""

    __tablename__ = "attempts"

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: int = Field(foreign_key="deliveries.id", index=True)
    number: int
    worker: str = Field(max_length=128)
    started_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    latency_ms: float
    outcome: str = Field(max_length=16)
    provider_id: str | None = Field(default=None, max_length=128)
    error_code: str | None = Field(default=None, max_length=64)
    reason: str | None = Field(default=None, sa_column=Column(Text))


class Rejection(SQLModel, table=True):
    """An audience row that produced no delivery (invalid address, duplicate), with its line."""

    __tablename__ = "rejections"

    id: int | None = Field(default=None, primary_key=True)
    stage_run_id: int = Field(foreign_key="stage_runs.id", index=True)
    file: str = Field(max_length=512)
    line: int
    reason: str = Field(sa_column=Column(Text, nullable=False))
    masked: str = Field(max_length=320)


class OptOut(SQLModel, table=True):
    """An address that must not be sent to (STOP reply, provider 21610, imported list)."""

    __tablename__ = "opt_outs"

    address: str = Field(primary_key=True, max_length=320)
    source: str = Field(max_length=64)
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    note: str | None = Field(default=None, sa_column=Column(Text))


class Worker(SQLModel, table=True):
    """A live (or dead) `dispatcher run` process, known by its heartbeat."""

    __tablename__ = "workers"

    id: str = Field(primary_key=True, max_length=128)
    hostname: str = Field(max_length=255)
    pid: int
    started_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    heartbeat_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    stopped_at: datetime | None = utc_column()


class AuditEntry(SQLModel, table=True):
    """One entry of the append-only, hash-chained audit log."""

    __tablename__ = "audit_log"

    seq: int = Field(primary_key=True)
    at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    actor: str = Field(max_length=128)
    kind: str = Field(max_length=64, index=True)
    subject: str | None = Field(default=None, max_length=256)
    data: str = Field(sa_column=Column(Text, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


metadata = SQLModel.metadata
