"""`rehearse`: the campaign's plan on a virtual clock, channels simulated, a throwaway database.

It drives the same Engine as the daemon; only the clock (scaled, jumping over idle time) and
who decides when stages fire (the plan, in order) differ.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from dispatcher.channels.base import Channel, ChannelContext
from dispatcher.channels.simulator import SimulatorChannel, SimulatorSettings
from dispatcher.config.loader import Config
from dispatcher.engine.clock import ScaledClock, VirtualClock
from dispatcher.engine.engine import Engine
from dispatcher.plan import Firing, firings
from dispatcher.reports.status import RunSummary, summaries
from dispatcher.store import queue
from dispatcher.store.database import Database

log = logging.getLogger("dispatcher.rehearsal")
INSTANT_SPEED = 100_000.0


@dataclass
class RehearsalResult:
    """The accounting at the end of a rehearsal."""

    database: Path | None  # None when the throwaway database was removed
    firings: int
    summaries: list[RunSummary]
    started: datetime
    ended: datetime


def simulators(config: Config, speed: float) -> dict[str, Channel]:
    """One simulator per configured channel: its own settings if it is one, else a quiet default."""
    out: dict[str, Channel] = {}
    for name, cls in config.channel_types.items():
        settings = config.channel_settings[name]
        if not (cls is SimulatorChannel and isinstance(settings, SimulatorSettings)):
            settings = SimulatorSettings(receipts=True, seed=0)
        if speed >= INSTANT_SPEED:
            settings = settings.model_copy(
                update={
                    "latency_ms": 0.0,
                    "latency_jitter_ms": 0.0,
                    "receipt_delay_ms": 0.0,
                    "log": None,
                }
            )
        context = ChannelContext(base_dir=config.base_dir)
        out[name] = SimulatorChannel(name, settings, context)
    return out


async def rehearse(
    config: Config,
    *,
    speed: float = INSTANT_SPEED,
    database: Path | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    on_firing: Callable[[Firing], None] | None = None,
) -> RehearsalResult:
    """Run every planned firing on a virtual clock and return the final accounting."""
    plan = firings(config, since=since, until=until)
    if database is not None:
        return await _rehearse(config, plan, speed, database, on_firing, keep=True)
    # Without a path to keep it at, the database lives in a temporary folder removed at the end.
    with tempfile.TemporaryDirectory(prefix="dispatcher-rehearsal-") as scratch:
        return await _rehearse(
            config, plan, speed, Path(scratch) / "rehearsal.db", on_firing, keep=False
        )


async def _rehearse(
    config: Config,
    plan: list[Firing],
    speed: float,
    database: Path,
    on_firing: Callable[[Firing], None] | None,
    *,
    keep: bool,
) -> RehearsalResult:
    db = Database.open(f"sqlite:///{database}")
    await db.upgrade()
    start = (plan[0].at if plan else datetime.now().astimezone()) - timedelta(minutes=1)
    # Instant rehearsals run on simulated time, so that how fast this machine works cannot
    # change what the rehearsal reports (see VirtualClock); a given speed plays it in real time.
    clock: ScaledClock | VirtualClock = (
        VirtualClock(start) if speed >= INSTANT_SPEED else ScaledClock(start, speed)
    )
    engine = Engine(config, db, clock, channels=simulators(config, speed), actor="rehearsal")
    await engine.start()
    try:
        for firing in plan:
            await _advance_until(engine, db, clock, firing.at)
            campaign = config.campaign(firing.campaign)
            assert campaign is not None
            stage = campaign.stage(firing.stage)
            assert stage is not None
            if on_firing is not None:
                on_firing(firing)
            await engine.fire(campaign, stage, firing, trigger="rehearsal", wait=True)
        await _advance_until(engine, db, clock, None)
        await _wait_for_receipts(engine)
    finally:
        await engine.stop(timeout=10)
    async with db.engine.connect() as conn:
        result = await summaries(conn, now=clock.now())
    await db.close()
    return RehearsalResult(database if keep else None, len(plan), result, start, clock.now())


async def _advance_until(
    engine: Engine, db: Database, clock: ScaledClock | VirtualClock, target: datetime | None
) -> None:
    """Let the engine work; whenever nothing is due now, jump the clock to the next event."""
    while True:
        now = clock.now()
        if target is not None and now >= target:
            return
        async with db.engine.connect() as conn:
            busy = await queue.open_count(conn)
            next_due = await queue.next_due(conn) if busy else None
        if not busy:
            if target is None:
                return
            clock.jump_to(target)
            continue
        idle = not any(w.in_flight for w in engine.workers.values())
        if next_due is not None and next_due > now and idle and await _nothing_due_now(db, now):
            clock.jump_to(min(next_due, target) if target else next_due)
            for worker in engine.workers.values():
                worker.wake.set()
            continue
        await asyncio.sleep(0.01)


async def _nothing_due_now(db: Database, now: datetime) -> bool:
    from sqlalchemy import func, or_, select

    from dispatcher.store.tables import Delivery, DeliveryStatus

    d = Delivery.__table__  # type: ignore[attr-defined]
    async with db.engine.connect() as conn:
        due = (
            await conn.execute(
                select(func.count())
                .select_from(d)
                .where(
                    or_(
                        d.c.status.in_([DeliveryStatus.CLAIMED, DeliveryStatus.SENDING]),
                        (d.c.status == DeliveryStatus.PENDING)
                        & (or_(d.c.not_before.is_(None), d.c.not_before <= now)),
                    )
                )
            )
        ).scalar_one()
    return int(due) == 0


async def _wait_for_receipts(engine: Engine, stall_s: float = 10.0) -> None:
    """Wait until the simulators have handed over every receipt, as long as they make progress.

    A fixed limit would cut a large rehearsal short and report its tail `sent` instead of
    `delivered`; only a pump that stopped moving for `stall_s` is given up on.
    """
    loop = asyncio.get_running_loop()
    last, since = -1, loop.time()
    while pending := sum(getattr(c, "pending_receipts", 0) for c in engine.channels.values()):
        if pending != last:
            last, since = pending, loop.time()
        elif loop.time() - since > stall_s:
            log.warning("%d receipts still pending after %.0fs without progress", pending, stall_s)
            break
        await asyncio.sleep(0.02)
    # Let the writer commit the last receipts.
    await asyncio.sleep(0.05)
