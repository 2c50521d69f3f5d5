"""The group commit's statements on SQLite, run in the driver's thread in one hand-off.

Through SQLAlchemy and aiosqlite, each statement is several hand-offs between the event loop and
SQLite's thread (cursor, execute, fetch, close), and each hand-off waits for its turn on the
loop. With a few hundred sends ready on the loop, the writer's two dozen hand-offs made a commit
of a few milliseconds' work take 17 ms, and every send waiting for its in-flight mark waited for
that. Here the writer's usual statements (claims, in-flight marks, releases, outcomes, attempts,
receipts, audit entries) run as one function in aiosqlite's thread, their transaction included. They
are the SQL of `queue.claim`, `queue.mark_sending`, `queue.release`,
`queue.record_outcomes`, `queue.apply_receipts` and `audit.append`, which the writer uses
everywhere else (PostgreSQL, and commits carrying opt-outs); the tests run both.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from dispatcher import audit
from dispatcher.store import queue
from dispatcher.store.queue import AttemptRecord, ClaimedDelivery, Outcome
from dispatcher.store.tables import DeliveryStatus as S
from dispatcher.store.tables import UTCDateTime

_CLAIM_ROWS = f"""
UPDATE deliveries SET status = '{S.CLAIMED}', owner = ?, lease_until = ?, claimed_at = ?
WHERE id IN (
    SELECT id FROM deliveries
    WHERE channel = ? AND status = '{S.PENDING}' AND {{due}}
    ORDER BY {{order}} LIMIT ?
) AND status = '{S.PENDING}'
RETURNING {", ".join(ClaimedDelivery.__slots__)}"""
# As queue.claim: rows due since ever (no not_before), then the others earliest due first.
_CLAIM_UNTIMED = _CLAIM_ROWS.format(due="not_before IS NULL", order="id")
_CLAIM_DUE = _CLAIM_ROWS.format(due="not_before <= ?", order="not_before, id")
_CLAIMED_TIMES = [
    ClaimedDelivery.__slots__.index(name) for name in ("valid_until", "created_at", "claimed_at")
]
_IDS = "id IN (SELECT value FROM json_each(?))"
_SUPPRESS_OPTED_OUT = f"""
UPDATE deliveries
SET status = '{S.SUPPRESSED}', reason = 'opted_out', final_at = ?, owner = NULL, lease_until = NULL
WHERE {_IDS} AND status = '{S.CLAIMED}' AND owner = ?
  AND address IN (SELECT address FROM opt_outs)
RETURNING id"""
_MARK_SENDING = f"""
UPDATE deliveries SET status = '{S.SENDING}', attempts = attempts + 1, lease_until = ?
WHERE {_IDS} AND status = '{S.CLAIMED}' AND owner = ?
RETURNING id"""
_RELEASE = f"""
UPDATE deliveries SET status = '{S.PENDING}', owner = NULL, lease_until = NULL, not_before = ?
WHERE id = ? AND status = '{S.CLAIMED}' AND owner = ?"""
_OUTCOME = """
UPDATE deliveries
SET status = ?, reason = ?, provider_id = coalesce(?, provider_id), error_code = ?,
    error_reason = ?, not_before = ?, sent_at = coalesce(?, sent_at), final_at = ?,
    attempts = attempts + ?, owner = NULL, lease_until = NULL
WHERE id = ? AND status = ?"""
_ATTEMPT = """
INSERT INTO attempts
    (delivery_id, number, worker, started_at, latency_ms, outcome, provider_id, error_code, reason)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"""
_RECEIPT_LOOKUP = """
SELECT id, provider_id, status FROM deliveries WHERE channel = ? AND provider_id IN ({})"""
_RECEIPT = f"""
UPDATE deliveries
SET status = ?, error_code = ?, error_reason = ?, final_at = ?, owner = NULL, lease_until = NULL
WHERE id = ? AND status IN ({", ".join(f"'{s}'" for s in queue.RECEIPT_SETTLES)})"""
_AUDIT_HEAD = "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
_AUDIT_ENTRY = """
INSERT INTO audit_log (seq, at, actor, kind, subject, data, prev_hash, hash)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)"""


@dataclass(frozen=True, slots=True)
class Changes:
    """One group commit's delivery changes, all made by `owner` at `now`."""

    owner: str
    now: datetime
    lease_until: datetime
    claims: Sequence[tuple[str, int]]  # (channel, how many)
    sending: Sequence[int]
    releases: Sequence[tuple[int, datetime]]
    outcomes: Sequence[Outcome]
    attempts: Sequence[AttemptRecord]
    receipts: Sequence[queue.ReceiptUpdate] = ()


_UTC = UTCDateTime()

#: A delivery a receipt settled: (id, new status, error code), as the audit lists changes.
Settled = tuple[int, str, str | None]

#: Builds the commit's audit events once its changes are known: the in-flight marks (marked,
#: opted out) and the deliveries the receipts settled (id, status, code).
EventsFor = Callable[[set[int], set[int], list[Settled]], list[audit.AuditEvent]]


@dataclass(frozen=True, slots=True)
class Written:
    """What a commit of `Changes` did: the claimed rows (per claim), the deliveries marked and
    opted out, those the receipts settled, and the indexes of receipts whose id is unknown."""

    claimed: list[list[ClaimedDelivery]]
    marked: set[int]
    opted: set[int]
    settled: list[Settled]
    unknown: list[int]


async def write(conn: AsyncConnection, changes: Changes, events_for: EventsFor) -> Written:
    """Apply `changes` and their audit events in one transaction.

    `conn` is a connection with no transaction open: this opens and commits its own.
    """
    dialect = conn.dialect
    written: Written = await _in_thread(
        conn,
        _write,
        changes,
        events_for,
        _UTC.dialect_impl(dialect).bind_processor(dialect),
        _UTC.dialect_impl(dialect).result_processor(dialect, None),
    )
    return written


async def _in_thread(conn: AsyncConnection, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(sqlite3_connection, *args)` in aiosqlite's thread for `conn`."""
    driver: Any = (await conn.get_raw_connection()).driver_connection
    # aiosqlite runs each call it is given in its own thread, in order; the pool's single
    # connection is ours while `conn` is open, so nothing else runs in between.
    try:
        return await driver._execute(fn, driver._conn, *args)
    except sqlite3.Error as exc:
        # As SQLAlchemy would wrap it: callers tell a locked database (OperationalError, waited
        # out) from other errors the same way whichever path wrote.
        raise DBAPIError.instance(
            fn.__name__, None, exc, sqlite3.Error, dialect=conn.dialect
        ) from exc


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
    cursor = db.cursor()
    # As the engine's own transactions do (see database.py): the write lock up front.
    cursor.execute("BEGIN IMMEDIATE")
    try:
        yield cursor
        cursor.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.rollback()
        raise
    finally:
        cursor.close()


def _write(
    db: sqlite3.Connection,
    changes: Changes,
    events_for: EventsFor,
    dt: Callable[[datetime | None], Any],
    parse: Callable[[Any], datetime | None],
) -> Written:
    # Stored times are text: `dt` writes them as SQLAlchemy does, `parse` reads them back.
    with _transaction(db) as cursor:
        marked: set[int] = set()
        opted: set[int] = set()
        owner = changes.owner
        claimed = [
            _claim(cursor, channel, limit, changes, dt, parse) for channel, limit in changes.claims
        ]
        if changes.sending:
            ids = json.dumps(list(changes.sending))
            cursor.execute(_SUPPRESS_OPTED_OUT, (dt(changes.now), ids, owner))
            opted = {row[0] for row in cursor.fetchall()}
            cursor.execute(_MARK_SENDING, (dt(changes.lease_until), ids, owner))
            marked = {row[0] for row in cursor.fetchall()}
        if changes.releases:
            cursor.executemany(
                _RELEASE, [(dt(when), delivery_id, owner) for delivery_id, when in changes.releases]
            )
        if changes.outcomes:
            cursor.executemany(
                _OUTCOME,
                [
                    (
                        o.status,
                        o.reason,
                        o.provider_id,
                        o.error_code,
                        o.error_reason,
                        dt(o.not_before),
                        dt(o.sent_at),
                        dt(o.final_at),
                        o.attempts_delta,
                        o.delivery_id,
                        o.from_status,
                    )
                    for o in changes.outcomes
                ],
            )
        if changes.attempts:
            cursor.executemany(
                _ATTEMPT,
                [
                    (
                        a.delivery_id,
                        a.number,
                        a.worker,
                        dt(a.started_at),
                        a.latency_ms,
                        a.outcome,
                        a.provider_id,
                        a.error_code,
                        a.reason,
                    )
                    for a in changes.attempts
                ],
            )
        settled, unknown = _apply_receipts(cursor, changes.receipts, dt)
        events = events_for(marked, opted, settled)
        if events:
            head = cursor.execute(_AUDIT_HEAD).fetchone()
            rows = audit.chain_rows(
                head[0] if head else 0, head[1] if head else audit.GENESIS, events, changes.now
            )
            cursor.executemany(
                _AUDIT_ENTRY,
                [
                    (
                        r["seq"],
                        dt(r["at"]),
                        r["actor"],
                        r["kind"],
                        r["subject"],
                        r["data"],
                        r["prev_hash"],
                        r["hash"],
                    )
                    for r in rows
                ],
            )
    return Written(claimed, marked, opted, settled, unknown)


def _apply_receipts(
    cursor: sqlite3.Cursor,
    receipts: Sequence[queue.ReceiptUpdate],
    dt: Callable[[datetime | None], Any],
) -> tuple[list[Settled], list[int]]:
    """As `queue.apply_receipts`: (changes made, indexes of receipts whose id is unknown)."""
    found: dict[tuple[str, str], tuple[int, str]] = {}
    for channel, provider_ids in queue.receipt_lookups(receipts):
        lookup = _RECEIPT_LOOKUP.format(", ".join("?" * len(provider_ids)))
        for delivery_id, provider_id, status in cursor.execute(lookup, (channel, *provider_ids)):
            found[(channel, provider_id)] = (delivery_id, status)
    settled, unknown, settle = queue.settle_receipts(receipts, found)
    if settle:
        cursor.executemany(
            _RECEIPT,
            [(r.status, r.error_code, r.reason, dt(r.at), id_) for id_, r in settle],
        )
    return settled, unknown


def _claim(
    cursor: sqlite3.Cursor,
    channel: str,
    limit: int,
    changes: Changes,
    dt: Callable[[datetime | None], Any],
    parse: Callable[[Any], datetime | None],
) -> list[ClaimedDelivery]:
    now = dt(changes.now)
    lease = (changes.owner, dt(changes.lease_until), now)
    cursor.execute(_CLAIM_UNTIMED, (*lease, channel, limit))
    claimed = _claimed_rows(cursor, parse)
    if len(claimed) < limit:
        cursor.execute(_CLAIM_DUE, (*lease, channel, now, limit - len(claimed)))
        claimed += _claimed_rows(cursor, parse)
    return claimed


def _claimed_rows(
    cursor: sqlite3.Cursor, parse: Callable[[Any], datetime | None]
) -> list[ClaimedDelivery]:
    claimed = []
    for row in cursor.fetchall():
        values = list(row)
        for index in _CLAIMED_TIMES:
            values[index] = parse(values[index])
        claimed.append(ClaimedDelivery(*values))
    claimed.sort(key=lambda r: r.id)
    return claimed
