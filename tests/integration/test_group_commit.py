"""The SQLite group commit in one hand-off (store/sqlite_writes.py) writes what the general path
writes (writer._write over SQLAlchemy, used on PostgreSQL and for receipts and opt-outs).

The same claims, in-flight marks (one of them opted out), releases and outcomes go through each
path on two identical databases; the deliveries, attempts and audit entries must come out the
same, and the audit chain must verify.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from sqlalchemy import insert
from sqlalchemy.exc import OperationalError

from dispatcher import audit
from dispatcher.channels.base import Receipt, ReceiptStatus
from dispatcher.engine.clock import Clock
from dispatcher.engine.writer import DeliveryWriter, _Batch
from dispatcher.store import queue, sqlite_writes
from dispatcher.store.database import Database
from dispatcher.store.tables import Delivery, OptOut, StageRun
from dispatcher.store.tables import DeliveryStatus as S

NOW = datetime(2010, 8, 31, 1, 0, tzinfo=UTC)
OPTED_OUT_ID = 4
OWNER = "worker-1"
LEASE = timedelta(minutes=5)
D = Delivery.__table__  # type: ignore[attr-defined]


class FixedClock(Clock):
    def now(self) -> datetime:
        return NOW

    def monotonic(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        return None

    def real_seconds(self, seconds: float) -> float:
        return seconds


async def seeded(path: Path) -> Database:
    """A database with one stage run of 9 pending deliveries (the 4th one's address opted out).

    As the materialiser writes them, due from the firing's time; but the 3rd has no due time
    (due since ever), the 6th is a retry due since 10 s ago and the 8th is due in an hour.
    """
    db = Database.open(f"sqlite:///{path}")
    await db.upgrade()
    async with db.engine.begin() as conn:
        await conn.execute(
            insert(StageRun.__table__),  # type: ignore[attr-defined]
            [
                {
                    "id": 1,
                    "campaign": "drill",
                    "stage": "blast",
                    "fire_time": NOW,
                    "channel": "sms",
                    "trigger": "manual",
                    "status": "ready",
                    "created_at": NOW,
                }
            ],
        )
        await conn.execute(
            insert(D),
            [
                {
                    "stage_run_id": 1,
                    "channel": "sms",
                    "address": f"+86138000000{i:02d}",
                    "line": i + 2,
                    "body": f"第{i}条",
                    "status": S.PENDING,
                    "created_at": NOW - timedelta(minutes=1),
                    "valid_until": NOW + timedelta(hours=2) if i % 2 else None,
                    "not_before": {
                        2: None,
                        5: NOW - timedelta(seconds=10),
                        7: NOW + timedelta(hours=1),
                    }.get(i, NOW - timedelta(minutes=1)),
                }
                for i in range(9)
            ],
        )
        await conn.execute(
            insert(OptOut.__table__),  # type: ignore[attr-defined]
            [{"address": "+8613800000003", "source": "import", "created_at": NOW}],
        )
    return db


def changes_for(claimed: list[queue.ClaimedDelivery]) -> tuple[list[int], list[Any], list[Any]]:
    """In-flight marks for all but the last two claimed, and outcomes for the marked."""
    sending = [d.id for d in claimed[:-2]]
    outcomes = []
    attempts = []
    for n, delivery_id in enumerate(i for i in sending if i != OPTED_OUT_ID):
        status = (S.SENT, S.PENDING, S.FAILED, S.UNKNOWN)[n % 4]
        outcomes.append(
            queue.Outcome(
                delivery_id,
                status,
                provider_id=f"SM{delivery_id}" if status == S.SENT else None,
                error_code=None if status == S.SENT else "30003",
                error_reason=None if status == S.SENT else "it went wrong",
                not_before=NOW + timedelta(seconds=30) if status == S.PENDING else None,
                sent_at=NOW if status == S.SENT else None,
                final_at=None if status == S.PENDING else NOW,
                # As when a mark is undone, the provider not called (see the worker).
                attempts_delta=-1 if status == S.PENDING else 0,
            )
        )
        attempts.append(
            queue.AttemptRecord(
                delivery_id, 1, OWNER, NOW, 12.5, status, f"SM{delivery_id}", None, None
            )
        )
    return sending, outcomes, attempts


async def run_path(db: Database, *, fast: bool) -> list[queue.ClaimedDelivery]:
    """Commits as the engine makes them: a claim, marks and a release, outcomes, receipts."""
    writer = DeliveryWriter(db, FixedClock(), OWNER, LEASE)
    future = asyncio.get_running_loop().create_future()
    claimed = (await commit(writer, db, _Batch(claims=[("sms", 7, future)]), fast))[0]
    sending, outcomes, attempts = changes_for(claimed)
    release = [(claimed[-2].id, NOW + timedelta(minutes=30))]
    await commit(writer, db, _Batch(sending=sending, releases=release), fast)
    await commit(writer, db, _Batch(outcomes=outcomes, attempts=attempts), fast)
    sent = next(o for o in outcomes if o.status == S.SENT)
    receipts = [
        Receipt("sms", f"SM{sent.delivery_id}", ReceiptStatus.DELIVERED, at=NOW),
        # A second word on a settled message changes nothing; an unknown id waits (early).
        Receipt("sms", f"SM{sent.delivery_id}", ReceiptStatus.FAILED, "30005", "gone", NOW),
        Receipt("sms", "SM-not-yet-known", ReceiptStatus.DELIVERED, at=NOW),
    ]
    await commit(writer, db, _Batch(receipts=receipts), fast)
    assert [r.provider_id for r, _ in writer._early] == ["SM-not-yet-known"]
    return claimed


async def commit(
    writer: DeliveryWriter, db: Database, batch: _Batch, fast: bool
) -> list[list[queue.ClaimedDelivery]]:
    """Commit `batch` as the writer does: on SQLite (fast), or as on any other database."""
    if fast:
        await writer._commit(batch)
    else:
        with mock.patch.object(Database, "is_sqlite", new=property(lambda _: False)):
            await writer._commit(batch)
    return [claim.result() for _, _, claim in batch.claims]


def stored(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        return {
            "deliveries": conn.execute("SELECT * FROM deliveries ORDER BY id").fetchall(),
            "attempts": conn.execute(
                "SELECT delivery_id, number, worker, started_at, latency_ms, outcome, "
                "provider_id, error_code, reason FROM attempts ORDER BY delivery_id"
            ).fetchall(),
            "audit": [
                (kind, actor, json.loads(data))
                for kind, actor, data in conn.execute(
                    "SELECT kind, actor, data FROM audit_log ORDER BY seq"
                )
            ],
        }
    finally:
        conn.close()


async def test_both_paths_store_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_hand_off = 0
    write = sqlite_writes.write

    async def counted(*args: Any) -> sqlite_writes.Written:
        nonlocal one_hand_off
        one_hand_off += 1
        return await write(*args)

    monkeypatch.setattr(sqlite_writes, "write", counted)
    fast_db = await seeded(tmp_path / "fast.db")
    general_db = await seeded(tmp_path / "general.db")
    try:
        fast_claimed = await run_path(fast_db, fast=True)
        general_claimed = await run_path(general_db, fast=False)
        async with fast_db.engine.connect() as conn:
            verified = await audit.verify(conn)
    finally:
        await fast_db.close()
        await general_db.close()
    assert one_hand_off == 4  # every commit of the fast run took the one hand-off
    assert fast_claimed == general_claimed
    # Earliest due first: the 3rd (no due time), then the blast's; the retry due later and the
    # 8th (not due) wait.
    assert [d.id for d in fast_claimed] == [3, 1, 2, 4, 5, 7, 9]
    assert fast_claimed[2].valid_until == NOW + timedelta(hours=2)  # read back as aware UTC
    assert fast_claimed[0].claimed_at == NOW
    fast, general = stored(tmp_path / "fast.db"), stored(tmp_path / "general.db")
    assert fast == general
    statuses = statuses_of(tmp_path / "fast.db")
    assert statuses == {
        3: S.DELIVERED,  # sent, then its receipt
        1: S.PENDING,  # to be tried again
        2: S.FAILED,
        4: S.SUPPRESSED,  # opted out at the in-flight mark
        5: S.UNKNOWN,
        7: S.PENDING,  # released
        9: S.CLAIMED,  # claimed, never marked
        6: S.PENDING,  # a retry due after the blast's rows: the next claim's
        8: S.PENDING,  # not due
    }
    # The marks', the outcomes' and the receipts' commits each log their changes; the claim and
    # the release change no recorded state.
    assert verified.ok and verified.entries == 3
    # Only the first receipt moved its delivery; the contradicting one came after it settled.
    assert fast["audit"][-1][2] == {"changes": [[3, S.DELIVERED, None]]}


def statuses_of(path: Path) -> dict[int, str]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT id, status FROM deliveries"))
    finally:
        conn.close()


async def test_a_locked_database_surfaces_as_sqlalchemy_operational_error(
    tmp_path: Path,
) -> None:
    # The writer waits out OperationalError (a locked or restarting database): the fast path
    # must raise the same type, not sqlite3's own.
    db = await seeded(tmp_path / "locked.db")
    locker = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    fast_db = Database.open(f"sqlite:///{tmp_path / 'locked.db'}?timeout=0.1")
    try:
        changes = sqlite_writes.Changes(
            owner=OWNER,
            now=NOW,
            lease_until=NOW + LEASE,
            claims=[("sms", 5)],
            sending=[],
            releases=[],
            outcomes=[],
            attempts=[],
        )
        async with fast_db.engine.connect() as conn:
            with pytest.raises(OperationalError, match="locked"):
                await sqlite_writes.write(conn, changes, lambda m, o, s: [])
    finally:
        locker.execute("ROLLBACK")
        locker.close()
        await fast_db.close()
        await db.close()
    # Nothing was claimed: the transaction rolled back.
    assert set(statuses_of(tmp_path / "locked.db").values()) == {S.PENDING}
