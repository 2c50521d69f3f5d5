"""Group commit for delivery state changes.

Each send needs two durable writes (in flight before the provider call, outcome after). Doing
them one transaction each would make the database the bottleneck, so concurrent callers queue
their changes here and one task commits everything waiting in a single transaction, then wakes
them. Callers still see "my change is durable" before they go on, except with `record_soon`
(a send's outcome: the next send need not wait for it; a crash before the commit leaves the
delivery in flight, later `unknown`, as a crash during the call would). Claims join the same
commits (see `claim`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from dispatcher import audit
from dispatcher.audit import AuditEvent
from dispatcher.channels.base import Receipt, ReceiptStatus
from dispatcher.engine.clock import Clock
from dispatcher.logs import first_line
from dispatcher.store import queue, sqlite_writes
from dispatcher.store.database import Database

log = logging.getLogger("dispatcher.engine")


@dataclass
class _Batch:
    claims: list[tuple[str, int, asyncio.Future[list[queue.ClaimedDelivery]]]] = field(
        default_factory=list
    )
    sending: list[int] = field(default_factory=list)
    outcomes: list[queue.Outcome] = field(default_factory=list)
    attempts: list[queue.AttemptRecord] = field(default_factory=list)
    opt_outs: list[tuple[str, str]] = field(default_factory=list)
    releases: list[tuple[int, datetime]] = field(default_factory=list)
    events: list[audit.AuditEvent] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def __len__(self) -> int:
        return (
            len(self.claims)
            + len(self.sending)
            + len(self.outcomes)
            + len(self.releases)
            + len(self.events)
            + len(self.receipts)
        )


class DeliveryWriter:
    """Commits delivery state changes in batches; each method returns once its change is durable."""

    def __init__(
        self, db: Database, clock: Clock, owner: str, lease: timedelta, max_batch: int = 1000
    ) -> None:
        self.db = db
        self.clock = clock
        self.owner = owner
        self.lease = lease
        self.max_batch = max_batch
        self._batch = _Batch()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sending_results: dict[int, asyncio.Future[str]] = {}
        self.commits = 0
        # Receipts that raced ahead of the outcome carrying their provider id: tried again on
        # later commits until this deadline (monotonic seconds), then reported as unmatched.
        self._early: list[tuple[Receipt, float]] = []
        self.unmatched_receipts = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="delivery-writer")

    async def close(self) -> None:
        """Commit what is queued and stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if len(self._batch):
            await self._commit(self._batch)
            self._batch = _Batch()

    async def claim(self, channel: str, limit: int) -> list[queue.ClaimedDelivery]:
        """Lease up to `limit` due deliveries of `channel` to this worker, in the next commit.

        Claims share the commit of the other changes: on SQLite, a transaction of their own
        would queue for the single connection behind every commit, and commits behind them.
        """
        result: asyncio.Future[list[queue.ClaimedDelivery]] = (
            asyncio.get_running_loop().create_future()
        )
        self._batch.claims.append((channel, limit, result))
        self._wake.set()
        return await result

    async def mark_sending(self, delivery_id: int) -> str:
        """Mark a claimed delivery in flight: "sending", "opted_out", or "lost" (lease gone)."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[str] = loop.create_future()
        self._sending_results[delivery_id] = result
        self._batch.sending.append(delivery_id)
        self._wake.set()
        return await result

    async def record(
        self,
        outcome: queue.Outcome,
        attempt: queue.AttemptRecord | None = None,
        opt_out: tuple[str, str] | None = None,
    ) -> None:
        """Record a delivery's new state (and the attempt that led to it)."""
        self.record_soon(outcome, attempt, opt_out)
        await self._wait()

    def record_soon(
        self,
        outcome: queue.Outcome,
        attempt: queue.AttemptRecord | None = None,
        opt_out: tuple[str, str] | None = None,
    ) -> None:
        """Queue a delivery's new state for the next commit, without waiting for that commit."""
        self._batch.outcomes.append(outcome)
        if attempt is not None:
            self._batch.attempts.append(attempt)
        if opt_out is not None:
            self._batch.opt_outs.append(opt_out)
        self._wake.set()

    async def release(self, delivery_id: int, not_before: datetime) -> None:
        """Hand a claimed delivery back, due again at `not_before`."""
        self._batch.releases.append((delivery_id, not_before))
        await self._wait()

    async def receipt(self, receipt: Receipt) -> None:
        """Apply a provider's receipt (status callback, DLR) to its delivery."""
        if receipt.status is ReceiptStatus.SENT:
            return  # intermediate: the delivery is already `sent`
        self._batch.receipts.append(receipt)
        await self._wait()

    async def audit(self, event: audit.AuditEvent) -> None:
        """Append an audit event in the next commit."""
        self._batch.events.append(event)
        await self._wait()

    async def _wait(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.waiters.append(future)
        self._wake.set()
        await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # One tick lets every task that is ready add its change before we commit.
            await asyncio.sleep(0)
            batch, self._batch = self._batch, _Batch()
            if not len(batch) and not batch.waiters:
                continue
            try:
                await self._commit_with_retry(batch)
            except Exception as exc:  # keep the writer alive; callers see the error
                log.error("could not commit %d delivery changes: %s", len(batch), exc)
                for fut in batch.waiters:
                    if not fut.done():
                        fut.set_exception(exc)
                for delivery_id in batch.sending:
                    fut2 = self._sending_results.pop(delivery_id, None)
                    if fut2 is not None and not fut2.done():
                        fut2.set_exception(exc)
                for _, _, fut3 in batch.claims:
                    if not fut3.done():
                        fut3.set_exception(exc)

    def _receipts_pending(self, receipts: list[Receipt]) -> list[tuple[Receipt, float]]:
        """The receipts to apply in a commit: the new ones, then those still early."""
        # Early receipts are taken from self._early but only replaced after the commit: if the
        # transaction rolls back and is retried, none is lost or applied twice.
        return [(r, time.monotonic() + EARLY_RECEIPT_GRACE_S) for r in receipts] + self._early

    def _still_early(
        self, pending: list[tuple[Receipt, float]], unknown: list[int]
    ) -> list[tuple[Receipt, float]]:
        """Of the receipts whose message id was unknown, those to try again at later commits."""
        early = []
        for index in unknown:
            receipt, deadline = pending[index]
            if time.monotonic() < deadline:
                early.append((receipt, deadline))
            else:
                self.unmatched_receipts += 1
                log.info(
                    "receipt for unknown message id %s on channel %s ignored",
                    receipt.provider_id,
                    receipt.channel,
                )
        return early

    async def _commit_with_retry(self, batch: _Batch) -> None:
        # A locked SQLite file or a restarting PostgreSQL is waited out: the transaction rolled
        # back, so committing the same batch again is safe, and nothing is lost meanwhile.
        delay = 0.1
        while True:
            try:
                await self._commit(batch)
                return
            except (OperationalError, InterfaceError, OSError) as exc:
                log.warning("database unavailable, retrying in %.1fs: %s", delay, first_line(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _commit(self, batch: _Batch) -> None:
        now = self.clock.now()
        pending = self._receipts_pending(batch.receipts)
        receipts = [_receipt_update(r, now) for r, _ in pending]
        if self.db.is_sqlite and not batch.opt_outs:
            # The usual commit (claims, marks, outcomes, attempts, receipts): one hand-off to
            # SQLite's thread.
            changes = sqlite_writes.Changes(
                owner=self.owner,
                now=now,
                lease_until=now + self.lease,
                claims=[(channel, limit) for channel, limit, _ in batch.claims],
                sending=batch.sending,
                releases=batch.releases,
                outcomes=batch.outcomes,
                attempts=batch.attempts,
                receipts=receipts,
            )
            async with self.db.engine.connect() as conn:
                written = await sqlite_writes.write(
                    conn,
                    changes,
                    lambda m, o, s: self._events(batch, list(batch.events), m, o, s),
                )
            claimed, marked, opted = written.claimed, written.marked, written.opted
            unknown = written.unknown
        else:
            async with self.db.engine.begin() as conn:
                claimed, marked, opted, unknown = await self._write(conn, batch, now, receipts)
        self.commits += 1
        # Only now, the commit done: a retried commit neither loses an early receipt nor counts
        # one as unmatched twice.
        self._early = self._still_early(pending, unknown)
        for (_, _, claim_result), rows in zip(batch.claims, claimed, strict=True):
            if not claim_result.done():
                claim_result.set_result(rows)
        for delivery_id in batch.sending:
            fut = self._sending_results.pop(delivery_id, None)
            if fut is not None and not fut.done():
                fut.set_result(
                    "sending"
                    if delivery_id in marked
                    else "opted_out"
                    if delivery_id in opted
                    else "lost"
                )
        for waiter in batch.waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _write(
        self,
        conn: AsyncConnection,
        batch: _Batch,
        now: datetime,
        receipts: list[queue.ReceiptUpdate],
    ) -> tuple[list[list[queue.ClaimedDelivery]], set[int], set[int], list[int]]:
        """Every kind of change, statement by statement.

        Returns (claimed, marked, opted out, indexes of the receipts whose id is unknown).
        """
        events = list(batch.events)
        claimed = [
            await queue.claim(
                conn,
                channel=channel,
                owner=self.owner,
                now=now,
                lease_until=now + self.lease,
                limit=limit,
            )
            for channel, limit, _ in batch.claims
        ]
        marked: set[int] = set()
        opted: set[int] = set()
        if batch.sending:
            marked, opted = await queue.mark_sending(
                conn, ids=batch.sending, owner=self.owner, now=now, lease_until=now + self.lease
            )
        for delivery_id, not_before in batch.releases:
            await queue.release(conn, ids=[delivery_id], owner=self.owner, not_before=not_before)
        await queue.record_outcomes(conn, batch.outcomes, batch.attempts)
        if batch.opt_outs:
            by_source: dict[str, list[str]] = {}
            for address, source in batch.opt_outs:
                by_source.setdefault(source, []).append(address)
            for source, addresses in by_source.items():
                added = await queue.add_opt_outs(conn, addresses, source=source, now=now)
                events.extend(
                    audit.AuditEvent("optout.add", self.owner, subject=a, data={"source": source})
                    for a in added
                )
        settled, unknown = await queue.apply_receipts(conn, receipts)
        await audit.append(conn, self._events(batch, events, marked, opted, settled), now)
        return claimed, marked, opted, unknown

    def _events(
        self,
        batch: _Batch,
        events: list[AuditEvent],
        marked: set[int],
        opted: set[int],
        settled: Sequence[tuple[int, str, str | None]],
    ) -> list[AuditEvent]:
        """The commit's audit events: `events`, then one entry listing every delivery change."""
        changes = _changes(batch.outcomes, marked, opted) + [list(change) for change in settled]
        if changes:
            events.append(audit.AuditEvent("deliveries", self.owner, data={"changes": changes}))
        return events


_RECEIPT_STATUS = {
    ReceiptStatus.DELIVERED: "delivered",
    ReceiptStatus.UNDELIVERED: "failed",
    ReceiptStatus.FAILED: "failed",
}
EARLY_RECEIPT_GRACE_S = 30.0


def _receipt_update(receipt: Receipt, now: datetime) -> queue.ReceiptUpdate:
    status = _RECEIPT_STATUS[receipt.status]
    return queue.ReceiptUpdate(
        channel=receipt.channel,
        provider_id=receipt.provider_id,
        status=status,
        error_code=receipt.error_code if status == "failed" else None,
        reason=receipt.reason,
        at=receipt.at or now,
    )


def _changes(
    outcomes: Sequence[queue.Outcome], marked: set[int], opted: set[int]
) -> list[list[object]]:
    # Compact rows for the audit chain: [delivery id, new status, code].
    rows: list[list[object]] = [[i, "sending", None] for i in sorted(marked)]
    rows += [[i, "suppressed", "opted_out"] for i in sorted(opted)]
    rows += [[o.delivery_id, o.status, o.error_code or o.reason] for o in outcomes]
    return rows
