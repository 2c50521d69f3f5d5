"""The delivery queue's SQL: claim with a lease, mark in flight, record outcomes, recover leases.

This is the SQL that keeps the promises, kept in one place: a delivery is claimed by one worker
(`FOR UPDATE SKIP LOCKED` on PostgreSQL, the single-writer lock on SQLite), marked `sending`
(with the opt-out list checked in the same statement) before the provider is called, and only
`claimed` rows (never `sending` ones) are ever handed back to `pending`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, func, insert, literal_column, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from dispatcher.store.tables import Attempt, Delivery, DeliveryStatus, OptOut

D = Delivery.__table__  # type: ignore[attr-defined]
A = Attempt.__table__  # type: ignore[attr-defined]
OPT_OUTS = OptOut.__table__  # type: ignore[attr-defined]
S = DeliveryStatus
# As the leased-rows index's condition reads (see tables.LEASED_CONDITION): literals, not
# parameters, or SQLite does not use the index.
_LEASED = D.c.status.in_([literal_column(f"'{status}'") for status in S.LEASED])


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A claimed delivery row, with what a worker needs to send it."""

    id: int
    stage_run_id: int
    channel: str
    address: str
    body: str
    subject: str | None
    html: str | None
    encoding: str
    segments: int
    attempts: int
    valid_until: datetime | None
    created_at: datetime
    claimed_at: datetime | None


_CLAIM_COLUMNS = [getattr(D.c, name) for name in ClaimedDelivery.__slots__]


async def claim(
    conn: AsyncConnection,
    *,
    channel: str,
    owner: str,
    now: datetime,
    lease_until: datetime,
    limit: int,
) -> list[ClaimedDelivery]:
    """Lease up to `limit` due pending deliveries of `channel` to `owner`, earliest due first.

    A delivery is due from its `not_before`: its firing's time, a retry's backoff, a send
    window's opening, a channel's resumption. Those due earliest go first (so everyone's first
    attempt of a blast goes before retries that came due during it), then in audience order (id).
    A delivery without `not_before` counts as due since ever.
    """
    # Two claims, each one range of the (channel, status, not_before, id) index read in its
    # order. One condition `not_before IS NULL OR not_before <= now` in id order read past every
    # row not due yet: a million held for a window's opening cost 200 ms per claim, each second
    # until it opened.
    rows: list[ClaimedDelivery] = []
    for due, order in (
        (D.c.not_before.is_(None), (D.c.id,)),
        (D.c.not_before <= now, (D.c.not_before, D.c.id)),
    ):
        if len(rows) >= limit:
            break
        ids = (
            select(D.c.id)
            .where(D.c.channel == channel, D.c.status == S.PENDING, due)
            .order_by(*order)
            .limit(limit - len(rows))
            .with_for_update(skip_locked=True)
        )
        stmt = (
            update(D)
            .where(D.c.id.in_(ids.scalar_subquery()), D.c.status == S.PENDING)
            .values(status=S.CLAIMED, owner=owner, lease_until=lease_until, claimed_at=now)
            .returning(*_CLAIM_COLUMNS)
        )
        # RETURNING comes in no particular order; a batch is sent in id order (one firing's
        # rows share their due time).
        rows += sorted(
            (ClaimedDelivery(*row) for row in (await conn.execute(stmt)).all()),
            key=lambda r: r.id,
        )
    return rows


async def mark_sending(
    conn: AsyncConnection, *, ids: Sequence[int], owner: str, now: datetime, lease_until: datetime
) -> tuple[set[int], set[int]]:
    """Move claimed rows to `sending` unless opted out; returns (marked, suppressed opted out)."""
    if not ids:
        return set(), set()
    opted = select(OPT_OUTS.c.address)
    suppressed = await conn.execute(
        update(D)
        .where(D.c.id.in_(ids), D.c.status == S.CLAIMED, D.c.owner == owner, D.c.address.in_(opted))
        .values(status=S.SUPPRESSED, reason="opted_out", final_at=now, owner=None, lease_until=None)
        .returning(D.c.id)
    )
    marked = await conn.execute(
        update(D)
        .where(D.c.id.in_(ids), D.c.status == S.CLAIMED, D.c.owner == owner)
        .values(status=S.SENDING, attempts=D.c.attempts + 1, lease_until=lease_until)
        .returning(D.c.id)
    )
    return {r[0] for r in marked.all()}, {r[0] for r in suppressed.all()}


@dataclass(frozen=True, slots=True)
class Outcome:
    """The new state of one delivery after a provider call (or a decision not to call)."""

    delivery_id: int
    status: str
    from_status: str = S.SENDING
    reason: str | None = None
    provider_id: str | None = None
    error_code: str | None = None
    error_reason: str | None = None
    not_before: datetime | None = None
    sent_at: datetime | None = None
    final_at: datetime | None = None
    # -1 when an in-flight mark is undone before the provider was called (see the worker).
    attempts_delta: int = 0


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One provider call to log."""

    delivery_id: int
    number: int
    worker: str
    started_at: datetime
    latency_ms: float
    outcome: str
    provider_id: str | None
    error_code: str | None
    reason: str | None


_OUTCOME_UPDATE = (
    update(D)
    .where(D.c.id == bindparam("b_id"), D.c.status == bindparam("b_from"))
    .values(
        status=bindparam("b_status"),
        reason=bindparam("b_reason"),
        provider_id=func.coalesce(bindparam("b_provider_id"), D.c.provider_id),
        error_code=bindparam("b_error_code"),
        error_reason=bindparam("b_error_reason"),
        not_before=bindparam("b_not_before", type_=D.c.not_before.type),
        sent_at=func.coalesce(bindparam("b_sent_at", type_=D.c.sent_at.type), D.c.sent_at),
        final_at=bindparam("b_final_at", type_=D.c.final_at.type),
        attempts=D.c.attempts + bindparam("b_attempts_delta"),
        owner=None,
        lease_until=None,
    )
)


async def record_outcomes(
    conn: AsyncConnection, outcomes: Sequence[Outcome], attempts: Sequence[AttemptRecord]
) -> None:
    """Write outcomes (only from the state they expect) and attempts in the caller's transaction."""
    if outcomes:
        await conn.execute(
            _OUTCOME_UPDATE,
            [
                {
                    "b_id": o.delivery_id,
                    "b_from": o.from_status,
                    "b_status": o.status,
                    "b_reason": o.reason,
                    "b_provider_id": o.provider_id,
                    "b_error_code": o.error_code,
                    "b_error_reason": o.error_reason,
                    "b_not_before": o.not_before,
                    "b_sent_at": o.sent_at,
                    "b_final_at": o.final_at,
                    "b_attempts_delta": o.attempts_delta,
                }
                for o in outcomes
            ],
        )
    if attempts:
        await conn.execute(
            insert(A),
            [
                {
                    "delivery_id": a.delivery_id,
                    "number": a.number,
                    "worker": a.worker,
                    "started_at": a.started_at,
                    "latency_ms": a.latency_ms,
                    "outcome": a.outcome,
                    "provider_id": a.provider_id,
                    "error_code": a.error_code,
                    "reason": a.reason,
                }
                for a in attempts
            ],
        )


async def add_opt_outs(
    conn: AsyncConnection,
    addresses: Iterable[str],
    *,
    source: str,
    now: datetime,
    note: str | None = None,
) -> list[str]:
    """Insert opt-outs that are not there yet; returns the addresses newly added."""
    wanted = sorted(set(addresses))
    if not wanted:
        return []
    existing = await conn.execute(select(OPT_OUTS.c.address).where(OPT_OUTS.c.address.in_(wanted)))
    known = {r[0] for r in existing.all()}
    new = [a for a in wanted if a not in known]
    if new:
        await conn.execute(
            insert(OPT_OUTS),
            [{"address": a, "source": source, "created_at": now, "note": note} for a in new],
        )
    return new


async def renew_leases(conn: AsyncConnection, *, owner: str, lease_until: datetime) -> int:
    """Extend the leases `owner` holds (its heartbeat); returns how many rows were renewed.

    Rows locked right now are skipped: they are the owner's own writer settling them or
    marking them in flight, in its own order, and waiting for them here deadlocked with it on
    PostgreSQL. A skipped lease is renewed at the next heartbeat, well within the lease.
    """
    mine = select(D.c.id).where(D.c.owner == owner, _LEASED).with_for_update(skip_locked=True)
    result = await conn.execute(
        update(D)
        .where(D.c.id.in_(mine.scalar_subquery()), D.c.owner == owner)
        .values(lease_until=lease_until)
    )
    return result.rowcount or 0


async def recover_expired(
    conn: AsyncConnection, *, now: datetime, dead_owners: Sequence[str] = ()
) -> tuple[int, list[int]]:
    """Settle leases of dead workers: claimed rows go back to pending, sending rows to unknown.

    A lease is dead when it expired or its owner is known dead. Returns (released, unknown ids).
    """
    dead = (
        or_(D.c.lease_until < now, D.c.owner.in_(list(dead_owners)))
        if dead_owners
        else D.c.lease_until < now
    )
    # Found through the leased-rows index, then updated by id: a condition on status alone
    # would read the whole table at every heartbeat.
    dead_leases = select(D.c.id).where(_LEASED, dead).scalar_subquery()
    released = await conn.execute(
        update(D)
        .where(D.c.id.in_(dead_leases), D.c.status == S.CLAIMED, dead)
        .values(status=S.PENDING, owner=None, lease_until=None)
    )
    unknown = await conn.execute(
        update(D)
        .where(D.c.id.in_(dead_leases), D.c.status == S.SENDING, dead)
        .values(
            status=S.UNKNOWN,
            owner=None,
            lease_until=None,
            final_at=now,
            error_code="in-flight",
            error_reason="in flight when its worker stopped; not resent until reconciled",
        )
        .returning(D.c.id)
    )
    return released.rowcount or 0, [r[0] for r in unknown.all()]


async def release(
    conn: AsyncConnection, *, ids: Sequence[int], owner: str, not_before: datetime
) -> None:
    """Give claimed rows back to the queue, due again at `not_before` (e.g. a window opening)."""
    if ids:
        await conn.execute(
            update(D)
            .where(D.c.id.in_(list(ids)), D.c.status == S.CLAIMED, D.c.owner == owner)
            .values(status=S.PENDING, owner=None, lease_until=None, not_before=not_before)
        )


async def requeue_unknown(
    conn: AsyncConnection, *, stage_run_ids: Sequence[int], now: datetime
) -> list[int]:
    """Operator's order: resend deliveries left unknown in these stage runs."""
    result = await conn.execute(
        update(D)
        .where(D.c.stage_run_id.in_(list(stage_run_ids)), D.c.status == S.UNKNOWN)
        .values(status=S.PENDING, not_before=now, final_at=None, error_code=None, error_reason=None)
        .returning(D.c.id)
    )
    return [r[0] for r in result.all()]


async def open_count(conn: AsyncConnection, stage_run_ids: Sequence[int] | None = None) -> int:
    """How many deliveries are not yet in a terminal state (optionally within some stage runs)."""
    stmt = select(func.count()).select_from(D).where(D.c.status.in_(S.OPEN))
    if stage_run_ids is not None:
        stmt = stmt.where(D.c.stage_run_id.in_(list(stage_run_ids)))
    return int((await conn.execute(stmt)).scalar_one())


async def next_due(conn: AsyncConnection, channel: str | None = None) -> datetime | None:
    """The earliest `not_before` among pending deliveries (when the queue wakes up next)."""
    stmt = select(func.min(D.c.not_before)).where(D.c.status == S.PENDING)
    if channel is not None:
        stmt = stmt.where(D.c.channel == channel)
    value = (await conn.execute(stmt)).scalar_one_or_none()
    if value is None:
        return None
    return D.c.not_before.type.process_result_value(value, None)  # type: ignore[no-any-return]


__all__ = [
    "AttemptRecord",
    "ClaimedDelivery",
    "Outcome",
    "ReceiptUpdate",
    "add_opt_outs",
    "apply_receipts",
    "claim",
    "mark_sending",
    "next_due",
    "open_count",
    "record_outcomes",
    "recover_expired",
    "release",
    "renew_leases",
    "requeue_unknown",
]


@dataclass(frozen=True, slots=True)
class ReceiptUpdate:
    """A provider's final word on one message, to apply to the delivery holding its message id."""

    channel: str
    provider_id: str
    status: str  # delivered | failed
    error_code: str | None
    reason: str | None
    at: datetime


#: The states a receipt moves forward (`unknown`: the receipt proves the message went out).
RECEIPT_SETTLES = (S.SENT, S.UNKNOWN, S.SENDING)

_RECEIPT_UPDATE = (
    update(D)
    # Equalities, not IN: an executemany statement cannot carry an expanding IN parameter.
    .where(
        D.c.id == bindparam("b_id"),
        or_(*(D.c.status == status for status in RECEIPT_SETTLES)),
    )
    .values(
        status=bindparam("b_status"),
        error_code=bindparam("b_error_code"),
        error_reason=bindparam("b_reason"),
        final_at=bindparam("b_final_at", type_=D.c.final_at.type),
        owner=None,
        lease_until=None,
    )
)
# Message ids looked up per statement: well under SQLite's limit on bound parameters.
_LOOKUP_CHUNK = 500


async def apply_receipts(
    conn: AsyncConnection, receipts: Sequence[ReceiptUpdate]
) -> tuple[list[tuple[int, str, str | None]], list[int]]:
    """Settle deliveries from receipts, in order; returns (changes made, indexes of unknown ids).

    Only forward moves: a `sent` (or `unknown`: the receipt proves it went out) delivery becomes
    `delivered` or `failed`; a settled one never changes again, so a replayed or contradicting
    late receipt changes nothing and is not reported as a change. A receipt whose message id is
    not in the database yet (it raced ahead of the outcome that records the id) is reported back
    by index, to be tried again. One lookup per 500 ids and one batched update, not two
    statements per receipt: receipts come in bursts as large as the send rate.
    """
    if not receipts:
        return [], []
    found: dict[tuple[str, str], tuple[int, str]] = {}
    for channel, provider_ids in receipt_lookups(receipts):
        stmt = select(D.c.id, D.c.provider_id, D.c.status).where(
            D.c.channel == channel, D.c.provider_id.in_(provider_ids)
        )
        if conn.dialect.name == "postgresql":  # SQLite's BEGIN IMMEDIATE already serialises
            stmt = stmt.with_for_update()
        for delivery_id, provider_id, status in (await conn.execute(stmt)).all():
            found[(channel, provider_id)] = (delivery_id, status)
    changes, unknown, settle = settle_receipts(receipts, found)
    params = [
        {
            "b_id": delivery_id,
            "b_status": r.status,
            "b_error_code": r.error_code,
            "b_reason": r.reason,
            "b_final_at": r.at,
        }
        for delivery_id, r in settle
    ]
    if params:
        await conn.execute(_RECEIPT_UPDATE, params)
    return changes, unknown


def receipt_lookups(receipts: Sequence[ReceiptUpdate]) -> list[tuple[str, list[str]]]:
    """The lookups `receipts` need: (channel, message ids), at most 500 ids each."""
    wanted: dict[str, set[str]] = {}
    for r in receipts:
        wanted.setdefault(r.channel, set()).add(r.provider_id)
    lookups = []
    for channel, provider_ids in wanted.items():
        ordered = sorted(provider_ids)
        for i in range(0, len(ordered), _LOOKUP_CHUNK):
            lookups.append((channel, ordered[i : i + _LOOKUP_CHUNK]))
    return lookups


def settle_receipts(
    receipts: Sequence[ReceiptUpdate], found: dict[tuple[str, str], tuple[int, str]]
) -> tuple[list[tuple[int, str, str | None]], list[int], list[tuple[int, ReceiptUpdate]]]:
    """Decide what `receipts` change, given the deliveries `found` by (channel, message id).

    Returns (changes for the audit, indexes of receipts whose id is unknown, the updates to
    make as (delivery id, receipt)). `found` is updated as receipts settle deliveries, so of
    two receipts for one message in a batch only the first counts.
    """
    changes: list[tuple[int, str, str | None]] = []
    unknown: list[int] = []
    settle: list[tuple[int, ReceiptUpdate]] = []
    for index, r in enumerate(receipts):
        key = (r.channel, r.provider_id)
        hit = found.get(key)
        if hit is None:
            unknown.append(index)
            continue
        delivery_id, status = hit
        if status not in RECEIPT_SETTLES:
            continue
        found[key] = (delivery_id, r.status)
        changes.append((delivery_id, r.status, r.error_code))
        settle.append((delivery_id, r))
    return changes, unknown, settle
