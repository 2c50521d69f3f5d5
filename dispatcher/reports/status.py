"""`status`: per stage run, where every materialised recipient is, and how fast things move."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from dispatcher.store import runs
from dispatcher.store.tables import Delivery, DeliveryStatus, StageRun

D = Delivery.__table__  # type: ignore[attr-defined]
R = StageRun.__table__  # type: ignore[attr-defined]
S = DeliveryStatus


@dataclass
class RunSummary:
    """One stage run: its rows and deliveries by status, which must add up."""

    run_id: int
    campaign: str
    stage: str
    fire_time: datetime
    trigger: str
    status: str
    channel: str
    rows_read: int
    invalid: int
    duplicates: int
    deliveries: int
    by_status: dict[str, int] = field(default_factory=dict)
    errors: list[tuple[str, int]] = field(default_factory=list)
    rate_per_s: float = 0.0
    eta_s: float | None = None
    error: str | None = None

    @property
    def counted(self) -> int:
        return sum(self.by_status.values())

    @property
    def adds_up(self) -> bool:
        """Every recipient is in exactly one state, and rows = deliveries + invalid + duplicates."""
        return self.counted == self.deliveries and (
            self.status != "ready"
            or self.rows_read == self.deliveries + self.invalid + self.duplicates
        )

    @property
    def open(self) -> int:
        return sum(self.by_status.get(s, 0) for s in S.OPEN)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run_id,
            "campaign": self.campaign,
            "stage": self.stage,
            "fire_time": self.fire_time.isoformat(),
            "trigger": self.trigger,
            "status": self.status,
            "channel": self.channel,
            "rows_read": self.rows_read,
            "invalid": self.invalid,
            "duplicates": self.duplicates,
            "deliveries": self.deliveries,
            "by_status": {s: self.by_status.get(s, 0) for s in S.ALL},
            "adds_up": self.adds_up,
            "errors": [{"code": c, "count": n} for c, n in self.errors],
            "rate_per_s": round(self.rate_per_s, 2),
            "eta_s": self.eta_s,
            "error": self.error,
        }


async def summaries(
    conn: AsyncConnection,
    *,
    now: datetime,
    campaign: str | None = None,
    stage: str | None = None,
    window: timedelta = timedelta(seconds=60),
) -> list[RunSummary]:
    """Summaries of stage runs in firing order (optionally one campaign or stage)."""
    stmt = select(R).order_by(R.c.fire_time, R.c.id)
    if campaign:
        stmt = stmt.where(R.c.campaign == campaign)
    if stage:
        stmt = stmt.where(R.c.stage == stage)
    run_rows = (await conn.execute(stmt)).mappings().all()
    ids = [r["id"] for r in run_rows]
    counts = await runs.status_counts(conn, ids) if ids else {}
    errors: dict[int, list[tuple[str, int]]] = {}
    recent: dict[int, int] = {}
    if ids:
        err_rows = (
            await conn.execute(
                select(D.c.stage_run_id, D.c.error_code, func.count())
                .where(
                    D.c.stage_run_id.in_(ids),
                    D.c.error_code.is_not(None),
                    D.c.status.in_([S.FAILED, S.UNKNOWN, S.PENDING, S.SUPPRESSED]),
                )
                .group_by(D.c.stage_run_id, D.c.error_code)
            )
        ).all()
        for run_id, code, n in err_rows:
            errors.setdefault(run_id, []).append((code, int(n)))
        sent_rows = await conn.execute(
            select(D.c.stage_run_id, func.count())
            .where(D.c.stage_run_id.in_(ids), D.c.sent_at >= now - window)
            .group_by(D.c.stage_run_id)
        )
        recent = {int(run_id): int(n) for run_id, n in sent_rows.all()}
    out = []
    for r in run_rows:
        summary = RunSummary(
            run_id=r["id"],
            campaign=r["campaign"],
            stage=r["stage"],
            fire_time=r["fire_time"],
            trigger=r["trigger"],
            status=r["status"],
            channel=r["channel"],
            rows_read=r["rows_read"],
            invalid=r["invalid"],
            duplicates=r["duplicates"],
            deliveries=r["deliveries"],
            by_status=counts.get(r["id"], {}),
            error=r["error"],
            errors=sorted(errors.get(r["id"], []), key=lambda e: -e[1])[:5],
        )
        summary.rate_per_s = recent.get(r["id"], 0) / window.total_seconds()
        if summary.open and summary.rate_per_s > 0:
            summary.eta_s = summary.open / summary.rate_per_s
        out.append(summary)
    return out
