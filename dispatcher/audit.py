"""The audit log: an append-only chain of entries, each hashing its predecessor.

Entry hash = SHA-256 over the previous hash and a canonical JSON encoding of (seq, at, actor,
kind, subject, data). Editing, deleting, reordering or inserting an entry breaks the chain at
that point, which `verify` reports by sequence number.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from dispatcher.store.tables import AuditEntry

T = AuditEntry.__table__  # type: ignore[attr-defined]
GENESIS = "0" * 64
# Serialises appends across processes on PostgreSQL (SQLite's BEGIN IMMEDIATE already does).
_PG_LOCK_KEY = 0x6469_7370  # "disp"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """Something to record: who did what to which subject, with details."""

    kind: str
    actor: str
    subject: str | None = None
    data: Mapping[str, Any] | None = None


def canonical(
    seq: int, at: datetime, actor: str, kind: str, subject: str | None, data: str
) -> bytes:
    """The exact bytes an entry's hash covers (besides the previous hash)."""
    body = {
        "seq": seq,
        "at": at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": actor,
        "kind": kind,
        "subject": subject,
        "data": data,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(prev_hash: str, payload: bytes) -> str:
    return hashlib.sha256(prev_hash.encode() + payload).hexdigest()


def encode_data(data: Mapping[str, Any] | None) -> str:
    return json.dumps(
        data or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )


async def append(conn: AsyncConnection, events: Sequence[AuditEvent], now: datetime) -> None:
    """Append events to the chain inside the caller's transaction."""
    if not events:
        return
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    head = (await conn.execute(select(T.c.seq, T.c.hash).order_by(T.c.seq.desc()).limit(1))).first()
    await conn.execute(
        insert(T), chain_rows(head[0] if head else 0, head[1] if head else GENESIS, events, now)
    )


def chain_rows(
    seq: int, prev: str, events: Sequence[AuditEvent], now: datetime
) -> list[dict[str, Any]]:
    """The rows that append `events` after the entry (`seq`, `prev` hash), linked and hashed."""
    # Stored times lose nothing below microseconds, so hashing the same value we store verifies.
    at = now.astimezone(UTC)
    rows = []
    for event in events:
        seq += 1
        data = encode_data(event.data)
        digest = entry_hash(prev, canonical(seq, at, event.actor, event.kind, event.subject, data))
        rows.append(
            {
                "seq": seq,
                "at": at,
                "actor": event.actor,
                "kind": event.kind,
                "subject": event.subject,
                "data": data,
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    return rows


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of walking the chain: how many entries were read, and the first break if any."""

    entries: int
    broken_at: int | None = None
    problem: str | None = None
    head_seq: int = 0
    head_hash: str = GENESIS

    @property
    def ok(self) -> bool:
        return self.broken_at is None


class ChainVerifier:
    """Checks entries one at a time in stored order, remembering only the last link.

    Constant memory whatever the chain's length: feed it entries with `check` (it returns the
    first break, then keeps returning it), and read the outcome from `result`.
    """

    def __init__(self) -> None:
        self._prev = GENESIS
        self._expected = 1
        self._entries = 0
        self._broken: VerifyResult | None = None

    def check(self, row: Mapping[str, Any]) -> VerifyResult | None:
        """Check the next entry; return the first broken link found so far, or None."""
        if self._broken is not None:
            return self._broken
        self._entries += 1
        seq = int(row["seq"])
        expected = self._expected
        if seq > expected:
            return self._break(
                expected,
                f"entry {expected} is missing: the next entry is {seq} "
                "(entries deleted, or reordered)",
            )
        if seq < expected:
            return self._break(
                expected,
                f"entry {seq} appears again after entry {expected - 1} "
                "(entries duplicated or reordered)",
            )
        if row["prev_hash"] != self._prev:
            return self._break(
                seq,
                f"entry {seq} does not follow entry {seq - 1}: its prev_hash is not "
                f"the hash of entry {seq - 1} (an entry was inserted, replaced "
                "or reordered here)",
            )
        digest = entry_hash(
            self._prev,
            canonical(
                seq, _as_datetime(row["at"]), row["actor"], row["kind"], row["subject"], row["data"]
            ),
        )
        if digest != row["hash"]:
            return self._break(seq, f"entry {seq} was altered: its hash does not match its content")
        self._prev = digest
        self._expected += 1
        return None

    def _break(self, seq: int, problem: str) -> VerifyResult:
        self._broken = VerifyResult(self._entries, seq, problem, self._expected - 1, self._prev)
        return self._broken

    @property
    def result(self) -> VerifyResult:
        """The outcome so far: the first break, or an intact chain ending at its head."""
        if self._broken is not None:
            return self._broken
        return VerifyResult(self._entries, head_seq=self._expected - 1, head_hash=self._prev)


def _as_datetime(value: datetime | str) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def verify_entries(entries: Iterable[Mapping[str, Any]]) -> VerifyResult:
    """Walk entries in stored order and report the first broken link (streaming)."""
    verifier = ChainVerifier()
    for row in entries:
        if verifier.check(row) is not None:
            break
    return verifier.result


async def iter_entries(
    source: AsyncConnection | AsyncEngine, batch: int = 5000
) -> AsyncIterator[dict[str, Any]]:
    """Every entry in storage order (by seq), streamed in batches.

    Given an engine rather than a connection, each batch is read in its own short transaction,
    so a long walk never holds SQLite's write lock (taken by BEGIN IMMEDIATE) for long.
    """
    last = 0
    stmt = select(T).order_by(T.c.seq).limit(batch)
    while True:
        if isinstance(source, AsyncEngine):
            async with source.connect() as conn:
                rows = (await conn.execute(stmt.where(T.c.seq > last))).mappings().all()
        else:
            rows = (await source.execute(stmt.where(T.c.seq > last))).mappings().all()
        if not rows:
            return
        for row in rows:
            yield dict(row)
        last = rows[-1]["seq"]


async def verify(source: AsyncConnection | AsyncEngine, batch: int = 5000) -> VerifyResult:
    """Walk the whole chain in the database in constant memory; stop at the first break."""
    verifier = ChainVerifier()
    async for row in iter_entries(source, batch):
        if verifier.check(row) is not None:
            break
    return verifier.result


def export_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """One entry as an export line's object: every stored field, the time as ISO 8601 UTC."""
    at = _as_datetime(row["at"]).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "seq": row["seq"],
        "at": at,
        "actor": row["actor"],
        "kind": row["kind"],
        "subject": row["subject"],
        "data": row["data"],
        "prev_hash": row["prev_hash"],
        "hash": row["hash"],
    }


def export_line(row: Mapping[str, Any]) -> str:
    """One entry as a JSON line (no newline) that `verify_entries` accepts back as it is."""
    return json.dumps(export_record(row), ensure_ascii=False, separators=(",", ":"))


async def count(conn: AsyncConnection) -> int:
    return int((await conn.execute(select(func.count()).select_from(T))).scalar_one())
