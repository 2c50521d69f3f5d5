"""Stage-run SQL: the unique firing row, materialisation checkpoints and leases, bulk inserts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from dispatcher.store.tables import Delivery, Rejection, StageRun, StageRunStatus

R = StageRun.__table__  # type: ignore[attr-defined]
D = Delivery.__table__  # type: ignore[attr-defined]
J = Rejection.__table__  # type: ignore[attr-defined]


def insert_ignoring_conflicts(conn: AsyncConnection, table: Table) -> Any:
    """`INSERT … ON CONFLICT DO NOTHING` for the connection's dialect."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


async def create_run(
    conn: AsyncConnection,
    *,
    campaign: str,
    stage: str,
    fire_time: datetime,
    firing_index: int,
    channel: str,
    trigger: str,
    status: str,
    owner: str | None,
    lease_until: datetime | None,
    now: datetime,
) -> int | None:
    """Insert the stage run for this firing; None if it already exists (someone else fired it)."""
    stmt = (
        insert_ignoring_conflicts(conn, R)
        .values(
            campaign=campaign,
            stage=stage,
            fire_time=fire_time,
            firing_index=firing_index,
            channel=channel,
            trigger=trigger,
            status=status,
            created_at=now,
            owner=owner,
            lease_until=lease_until,
            rows_read=0,
            invalid=0,
            duplicates=0,
            deliveries=0,
            checkpoint_line=0,
        )
        .returning(R.c.id)
    )
    row = (await conn.execute(stmt)).first()
    return None if row is None else int(row[0])


async def get_run(conn: AsyncConnection, run_id: int) -> dict[str, Any] | None:
    row = (await conn.execute(select(R).where(R.c.id == run_id))).mappings().first()
    return None if row is None else dict(row)


async def find_run(
    conn: AsyncConnection, campaign: str, stage: str, fire_time: datetime
) -> dict[str, Any] | None:
    row = (
        (
            await conn.execute(
                select(R).where(
                    R.c.campaign == campaign, R.c.stage == stage, R.c.fire_time == fire_time
                )
            )
        )
        .mappings()
        .first()
    )
    return None if row is None else dict(row)


async def existing_fire_times(conn: AsyncConnection, campaign: str, stage: str) -> set[datetime]:
    rows = await conn.execute(
        select(R.c.fire_time).where(R.c.campaign == campaign, R.c.stage == stage)
    )
    return {r[0] for r in rows.all()}


async def insert_batch(
    conn: AsyncConnection,
    *,
    run_id: int,
    deliveries: Sequence[dict[str, Any]],
    rejections: Sequence[dict[str, Any]],
    rows_read: int,
    invalid: int,
    checkpoint_line: int,
    owner: str,
    lease_until: datetime,
) -> int:
    """Insert one batch and move the run's counters and checkpoint, atomically.

    Returns how many deliveries were new; the rest were duplicates of the same address. The
    checkpoint lets a crashed materialisation resume after the last committed row.
    """
    inserted = 0
    if deliveries:
        result = await conn.execute(
            insert_ignoring_conflicts(conn, D).returning(D.c.id), list(deliveries)
        )
        inserted = len(result.all())
    if rejections:
        await conn.execute(insert(J), list(rejections))
    duplicates = len(deliveries) - inserted
    result = await conn.execute(
        update(R)
        .where(R.c.id == run_id, R.c.owner == owner)
        .values(
            rows_read=R.c.rows_read + rows_read,
            invalid=R.c.invalid + invalid,
            duplicates=R.c.duplicates + duplicates,
            deliveries=R.c.deliveries + inserted,
            checkpoint_line=checkpoint_line,
            lease_until=lease_until,
        )
    )
    if result.rowcount != 1:
        raise LostLease(run_id)
    return inserted


class LostLease(Exception):
    """Another process took over this stage run's materialisation."""


async def finish_run(
    conn: AsyncConnection,
    run_id: int,
    *,
    owner: str,
    now: datetime,
    status: str = StageRunStatus.READY,
    error: str | None = None,
) -> None:
    await conn.execute(
        update(R)
        .where(R.c.id == run_id, R.c.owner == owner)
        .values(status=status, materialised_at=now, owner=None, lease_until=None, error=error)
    )


async def take_over_stale(
    conn: AsyncConnection,
    *,
    owner: str,
    now: datetime,
    lease_until: datetime,
    dead_owners: Sequence[str] = (),
) -> list[int]:
    """Claim materialisations whose owner died, so they resume from their checkpoint."""
    stale = (R.c.lease_until < now) | (R.c.owner.in_(list(dead_owners)) if dead_owners else False)
    rows = await conn.execute(
        update(R)
        .where(R.c.status == StageRunStatus.MATERIALISING, stale)
        .values(owner=owner, lease_until=lease_until)
        .returning(R.c.id)
    )
    return [r[0] for r in rows.all()]


async def release(conn: AsyncConnection, *, owner: str, now: datetime) -> list[int]:
    """Give up the materialisations `owner` holds (it is stopping): the next worker resumes them."""
    rows = await conn.execute(
        update(R)
        .where(R.c.owner == owner, R.c.status == StageRunStatus.MATERIALISING)
        .values(lease_until=now)
        .returning(R.c.id)
    )
    return [r[0] for r in rows.all()]


async def renew(conn: AsyncConnection, *, owner: str, lease_until: datetime) -> None:
    await conn.execute(
        update(R)
        .where(R.c.owner == owner, R.c.status == StageRunStatus.MATERIALISING)
        .values(lease_until=lease_until)
    )


async def status_counts(
    conn: AsyncConnection, run_ids: Sequence[int] | None = None
) -> dict[int, dict[str, int]]:
    """Per stage run, the number of deliveries in each status."""
    stmt = select(D.c.stage_run_id, D.c.status, func.count()).group_by(D.c.stage_run_id, D.c.status)
    if run_ids is not None:
        stmt = stmt.where(D.c.stage_run_id.in_(list(run_ids)))
    out: dict[int, dict[str, int]] = {}
    for run_id, status, n in (await conn.execute(stmt)).all():
        out.setdefault(run_id, {})[status] = int(n)
    return out
