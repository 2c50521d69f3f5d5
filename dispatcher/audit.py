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
from sqlalchemy.ext.asyncio import AsyncConnection

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


def canonical(seq: int, at: datetime, actor: str, kind: str, subject: str | None, data: str) -> bytes:
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
    return json.dumps(data or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


async def append(conn: AsyncConnection, events: Sequence[AuditEvent], now: datetime) -> None:
    """Append events to the chain inside the caller's transaction."""
    if not events:
        return
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    head = (await conn.execute(select(T.c.seq, T.c.hash).order_by(T.c.seq.desc()).limit(1))).first()
    seq, prev = (head[0], head[1]) if head else (0, GENESIS)
    # Stored times lose nothing below microseconds, so hashing the same value we store verifies.
    at = now.astimezone(UTC)
    rows = []
    for event in events:
        seq += 1
        data = encode_data(event.data)
        digest = entry_hash(prev, canonical(seq, at, event.actor, event.kind, event.subject, data))
        rows.append(
            {"seq": seq, "at": at, "actor": event.actor, "kind": event.kind,
             "subject": event.subject, "data": data, "prev_hash": prev, "hash": digest}
        )
        prev = digest
    await conn.execute(insert(T), rows)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of walking the chain."""

    entries: int
    broken_at: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def verify_entries(entries: Iterable[Mapping[str, Any]]) -> VerifyResult:
    """Walk entries in stored order and report the first broken link."""
    prev = GENESIS
    expected_seq = 1
    count = 0
    for row in entries:
        count += 1
        seq = int(row["seq"])
        at = row["at"] if isinstance(row["at"], datetime) else datetime.fromisoformat(
            str(row["at"]).replace("Z", "+00:00"))
        if seq != expected_seq:
            what = "missing (deleted)" if seq > expected_seq else "out of order"
            return VerifyResult(count, expected_seq, f"entry {expected_seq} is {what}: found {seq} next")
        if row["prev_hash"] != prev:
            return VerifyResult(count, seq, f"entry {seq} does not point to entry {seq - 1} (reordered or inserted)")
        digest = entry_hash(prev, canonical(seq, at, row["actor"], row["kind"], row["subject"], row["data"]))
        if digest != row["hash"]:
            return VerifyResult(count, seq, f"entry {seq} was altered (its hash does not match its content)")
        prev = digest
        expected_seq += 1
    return VerifyResult(count)


async def iter_entries(conn: AsyncConnection, batch: int = 5000) -> AsyncIterator[dict[str, Any]]:
    """Every entry in storage order (by seq), streamed in batches."""
    last = 0
    while True:
        rows = (await conn.execute(
            select(T).where(T.c.seq > last).order_by(T.c.seq).limit(batch))).mappings().all()
        if not rows:
            return
        for row in rows:
            yield dict(row)
        last = rows[-1]["seq"]


async def verify(conn: AsyncConnection) -> VerifyResult:
    """Walk the whole chain in the database."""
    rows = [row async for row in iter_entries(conn)]
    return verify_entries(rows)


async def count(conn: AsyncConnection) -> int:
    return int((await conn.execute(select(func.count()).select_from(T))).scalar_one())
