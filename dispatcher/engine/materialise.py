"""Materialise a firing: stream the audience into one pending delivery row per recipient.

Rows are rendered and inserted in batches; each batch commits together with the stage run's
counters and a checkpoint (the last audience line done), so a crash resumes where it stopped
and counts stay exact. Duplicates are dropped by the unique (run, channel, address) key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from dispatcher import audit
from dispatcher.audience import Recipient, Rejection, read_audience
from dispatcher.engine.clock import Clock
from dispatcher.errors import DispatcherError
from dispatcher.messages import StageFiring, audience_source
from dispatcher.store import runs
from dispatcher.store.database import Database
from dispatcher.store.tables import DeliveryStatus, OptOut, StageRunStatus

log = logging.getLogger("dispatcher.engine")
OPT_OUTS = OptOut.__table__  # type: ignore[attr-defined]


class Interrupted(Exception):
    """Materialisation stopped at a batch boundary because the engine is stopping."""


@dataclass(frozen=True, slots=True)
class MaterialiseResult:
    run_id: int
    rows_read: int
    deliveries: int
    invalid: int
    duplicates: int


async def materialise(
    db: Database,
    run_id: int,
    job: StageFiring,
    *,
    owner: str,
    clock: Clock,
    lease: timedelta,
    batch_size: int = 1000,
    on_batch: Callable[[], None] | None = None,
    stopping: Callable[[], bool] | None = None,
) -> MaterialiseResult:
    """Fill stage run `run_id` (owned by `owner`) with deliveries, resuming from its checkpoint.

    When `stopping()` turns true it raises `Interrupted` after the next committed batch, so a
    shutdown never cuts a transaction in half; the run resumes from that checkpoint later.
    """
    async with db.engine.connect() as conn:
        run = await runs.get_run(conn, run_id)
    if run is None:
        raise DispatcherError(f"stage run {run_id} does not exist")
    checkpoint = int(run["checkpoint_line"])
    source = audience_source(job.campaign, job.stage.audience)
    valid_until = job.firing.at + job.stage.validity
    max_segments = job.stage.max_segments

    deliveries: list[dict[str, Any]] = []
    rejections: list[dict[str, Any]] = []
    rows_read = invalid = 0
    last_line = checkpoint

    async def flush() -> None:
        nonlocal deliveries, rejections, rows_read, invalid
        now = clock.now()
        await _suppress_opted_out(db, deliveries, now)
        async with db.engine.begin() as conn:
            await runs.insert_batch(
                conn,
                run_id=run_id,
                deliveries=deliveries,
                rejections=rejections,
                rows_read=rows_read,
                invalid=invalid,
                checkpoint_line=last_line,
                owner=owner,
                lease_until=now + lease,
            )
        deliveries, rejections, rows_read, invalid = [], [], 0, 0
        if on_batch is not None:
            on_batch()

    try:
        rows = read_audience(source)
        for row in rows:
            if row.line <= checkpoint:
                continue
            rows_read += 1
            last_line = row.line
            now = clock.now()
            if isinstance(row, Rejection):
                if row.duplicate_of is not None:
                    continue  # read_audience does not dedupe; kept for clarity
                invalid += 1
                rejections.append(
                    {
                        "stage_run_id": run_id,
                        "file": row.file,
                        "line": row.line,
                        "reason": row.reason,
                        "masked": row.masked,
                    }
                )
            else:
                deliveries.append(_delivery_row(job, run_id, row, now, valid_until, max_segments))
            if len(deliveries) + len(rejections) >= batch_size:
                await flush()
                if stopping is not None and stopping():
                    raise Interrupted(run_id)
                # Rendering is CPU work: yield between batches so sends keep flowing.
                await asyncio.sleep(0)
        await flush()
    except runs.LostLease:
        log.warning("stage run %s: another process took over its materialisation", run_id)
        raise
    except DispatcherError as exc:
        async with db.engine.begin() as conn:
            await runs.finish_run(
                conn,
                run_id,
                owner=owner,
                now=clock.now(),
                status=StageRunStatus.FAILED,
                error=str(exc),
            )
            await audit.append(
                conn,
                [
                    audit.AuditEvent(
                        "firing.failed",
                        owner,
                        subject=_subject(job),
                        data={"run": run_id, "error": str(exc)},
                    )
                ],
                clock.now(),
            )
        raise
    async with db.engine.begin() as conn:
        await runs.finish_run(conn, run_id, owner=owner, now=clock.now())
        final = await runs.get_run(conn, run_id)
        assert final is not None
        await audit.append(
            conn,
            [
                audit.AuditEvent(
                    "firing.materialised",
                    owner,
                    subject=_subject(job),
                    data={
                        "run": run_id,
                        "rows": final["rows_read"],
                        "deliveries": final["deliveries"],
                        "invalid": final["invalid"],
                        "duplicates": final["duplicates"],
                    },
                )
            ],
            clock.now(),
        )
    return MaterialiseResult(
        run_id, final["rows_read"], final["deliveries"], final["invalid"], final["duplicates"]
    )


def _subject(job: StageFiring) -> str:
    return f"{job.campaign.id}/{job.stage.id}@{job.firing.at.isoformat()}"


def _delivery_row(
    job: StageFiring,
    run_id: int,
    recipient: Recipient,
    now: datetime,
    valid_until: datetime,
    max_segments: int,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "stage_run_id": run_id,
        "channel": job.stage.channel,
        "address": recipient.address,
        "line": recipient.line,
        "status": DeliveryStatus.PENDING,
        "attempts": 0,
        "not_before": job.firing.at,
        "valid_until": valid_until,
        "created_at": now,
        "subject": None,
        "html": None,
        "encoding": "text",
        "segments": 1,
        "reason": None,
        "error_code": None,
        "error_reason": None,
        "final_at": None,
    }
    try:
        message = job.render(recipient)
    except DispatcherError as exc:
        row.update(
            status=DeliveryStatus.SUPPRESSED,
            reason="template_error",
            body="",
            error_code="template",
            error_reason=str(exc),
            final_at=now,
        )
        return row
    row.update(
        body=message.body,
        subject=message.subject,
        html=message.html,
        encoding=message.encoding,
        segments=message.segments,
    )
    if job.kind == "phone" and message.segments > max_segments:
        row.update(
            status=DeliveryStatus.SUPPRESSED,
            reason="too_long",
            error_code="too-long",
            error_reason=f"{message.segments} segments, the stage allows {max_segments}",
            final_at=now,
        )
    return row


async def _suppress_opted_out(
    db: Database, deliveries: list[dict[str, Any]], now: datetime
) -> None:
    addresses = [d["address"] for d in deliveries if d["status"] == DeliveryStatus.PENDING]
    if not addresses:
        return
    async with db.engine.connect() as conn:
        result = await conn.execute(
            select(OPT_OUTS.c.address).where(OPT_OUTS.c.address.in_(addresses))
        )
        opted = {r[0] for r in result.all()}
    for row in deliveries:
        if row["address"] in opted and row["status"] == DeliveryStatus.PENDING:
            row.update(status=DeliveryStatus.SUPPRESSED, reason="opted_out", final_at=now)
