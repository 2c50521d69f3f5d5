"""`dispatcher run`: scheduler, send workers and HTTP endpoint in one asyncio process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.exc import InterfaceError, OperationalError

from dispatcher import audit
from dispatcher.config.loader import Config
from dispatcher.config.models import CampaignConfig, StageConfig
from dispatcher.engine import heap
from dispatcher.engine.clock import SystemClock
from dispatcher.engine.engine import Engine
from dispatcher.logs import first_line
from dispatcher.plan import build_trigger, latest_firing
from dispatcher.store.database import Database

log = logging.getLogger("dispatcher.daemon")

ServerFactory = Callable[
    [Engine, Database, asyncio.Event], Awaitable[Callable[[], Awaitable[None]]]
]


class Daemon:
    """One `dispatcher run` process."""

    def __init__(self, config: Config, *, server: ServerFactory | None = None) -> None:
        self.config = config
        self.clock = SystemClock()
        self.db = Database.open(config.database_url)
        self.engine = Engine(config, self.db, self.clock)
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.stop_requested = asyncio.Event()
        self._server_factory = server

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig.name)
        with contextlib.suppress(NotImplementedError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, self._hup)
        await self.db.upgrade()
        stop_server = None
        if self._server_factory is not None:
            # Bind first: a port already in use is reported before anything is claimed.
            stop_server = await self._server_factory(self.engine, self.db, self.stop_requested)
        started = False
        try:
            await self.engine.start()
            started = True
            heap.settle()
            await self._audit(
                "daemon.start",
                {
                    "config_sha256": self.config.digest,
                    "worker": self.engine.worker_id,
                    "sources": [str(p) for p in self.config.sources],
                },
            )
            await self._until_database_answers(
                "catching up", lambda: self.engine.catch_up(self.clock.now())
            )
            self._schedule()
            self.scheduler.start()
            log.info(
                "dispatcher running as %s (config %s…)",
                self.engine.worker_id,
                self.config.digest[:12],
            )
            await self.stop_requested.wait()
        finally:
            log.info("stopping: no new claims, waiting for in-flight sends")
            if self.scheduler.running:
                self.scheduler.shutdown(wait=False)
            if stop_server is not None:
                await stop_server()
            if started:
                await self.engine.stop()
                await self._audit("daemon.stop", {"worker": self.engine.worker_id})
            else:  # a channel failed to start: release what did start, keep its error
                with contextlib.suppress(Exception):
                    await self.engine.stop(timeout=5)
            await self.db.close()
            log.info("stopped")

    def _schedule(self) -> None:
        for campaign, stage in self.config.stages():
            self.scheduler.add_job(
                self._fire,
                build_trigger(campaign, stage),
                args=[campaign, stage],
                id=f"{campaign.id}/{stage.id}",
                name=f"{campaign.id}/{stage.id}",
                misfire_grace_time=int(stage.grace.total_seconds()) or 1,
                coalesce=False,
                max_instances=4,
            )

    async def _fire(self, campaign: CampaignConfig, stage: StageConfig) -> None:
        firing = latest_firing(campaign, stage, self.clock.now())
        if firing is None:
            return
        # Idempotent by the firing's key, so trying again is safe; a firing tried again past
        # its grace would no longer be a catch-up the operator asked for.
        label = f"firing {campaign.id}/{stage.id} at {firing.at.isoformat()}"
        try:
            await self._until_database_answers(
                label,
                lambda: self.engine.fire(campaign, stage, firing, trigger="scheduled", wait=False),
                deadline=firing.at + stage.grace,
            )
        except Exception as exc:  # a failed firing must not stop the scheduler
            log.error("%s failed: %s", label, first_line(exc))

    async def _until_database_answers(
        self,
        what: str,
        action: Callable[[], Awaitable[object]],
        *,
        deadline: datetime | None = None,
    ) -> None:
        """Run `action`, waiting out a locked or restarting database (one warning line a try).

        Gives up (with an error line) once `deadline` has passed, and quietly when the daemon
        is stopping: what was not done is left to the next start's catch-up.
        """
        delay = 1.0
        while True:
            try:
                await action()
                return
            except (OperationalError, InterfaceError, OSError) as exc:
                if deadline is not None and self.clock.now() + timedelta(seconds=delay) > deadline:
                    log.error("%s: database unavailable past its grace: %s", what, first_line(exc))
                    return
                log.warning(
                    "%s waits for the database, trying again in %.0fs: %s",
                    what,
                    delay,
                    first_line(exc),
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), delay)
            if self.stop_requested.is_set():
                return
            delay = min(delay * 2, 30.0)

    def _request_stop(self, name: str) -> None:
        log.info("%s received", name)
        self.stop_requested.set()

    def _hup(self) -> None:
        log.warning("SIGHUP: configuration changes take effect on restart (restarting is safe)")

    async def _audit(self, kind: str, data: dict[str, object]) -> None:
        async with self.db.engine.begin() as conn:
            await audit.append(
                conn, [audit.AuditEvent(kind, "daemon", data=data)], datetime.now(UTC)
            )
