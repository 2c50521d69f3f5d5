"""Worker (daemon process) registry: heartbeats tell live workers from dead ones."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from dispatcher.store.runs import insert_ignoring_conflicts
from dispatcher.store.tables import Worker

W = Worker.__table__  # type: ignore[attr-defined]


async def register(conn: AsyncConnection, worker_id: str, *, now: datetime) -> None:
    await conn.execute(
        insert_ignoring_conflicts(conn, W).values(
            id=worker_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            started_at=now,
            heartbeat_at=now,
        )
    )


async def heartbeat(conn: AsyncConnection, worker_id: str, *, now: datetime) -> None:
    await conn.execute(update(W).where(W.c.id == worker_id).values(heartbeat_at=now))


async def stopped(conn: AsyncConnection, worker_id: str, *, now: datetime) -> None:
    await conn.execute(
        update(W).where(W.c.id == worker_id).values(stopped_at=now, heartbeat_at=now)
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def dead_workers(
    conn: AsyncConnection, *, now: datetime, lease: timedelta, me: str
) -> list[str]:
    """Workers that hold nothing any more: stopped, silent for a lease, or a gone pid on this host.

    The pid check lets a daemon restarted after a crash settle its predecessor's leases at once
    instead of waiting for them to expire.
    """
    rows = (
        await conn.execute(
            select(W.c.id, W.c.hostname, W.c.pid, W.c.heartbeat_at, W.c.stopped_at).where(
                W.c.id != me, W.c.stopped_at.is_(None)
            )
        )
    ).all()
    host = socket.gethostname()
    dead = []
    for worker_id, hostname, pid, heartbeat_at, stopped_at in rows:
        silent = stopped_at is not None or heartbeat_at + lease < now
        if silent or (hostname == host and not _pid_alive(pid)):
            dead.append(worker_id)
    return dead


async def mark_dead(conn: AsyncConnection, worker_ids: Sequence[str], *, now: datetime) -> None:
    """Mark workers stopped so their rows are not examined again; keeps them for the record."""
    await conn.execute(
        update(W)
        .where(W.c.id.in_(list(worker_ids)), W.c.stopped_at.is_(None))
        .values(stopped_at=now)
    )


async def live_workers(
    conn: AsyncConnection, *, now: datetime, lease: timedelta, me: str
) -> list[str]:
    """This worker and every other one that may be sending: registered, not stopped, not dead."""
    rows = (await conn.execute(select(W.c.id).where(W.c.id != me, W.c.stopped_at.is_(None)))).all()
    dead = set(await dead_workers(conn, now=now, lease=lease, me=me))
    return [me, *(worker_id for (worker_id,) in rows if worker_id not in dead)]
