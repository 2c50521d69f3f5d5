"""The engine: channels, workers, the writer and housekeeping, wired for one process.

`run`, `send`, `rehearse` and the benchmarks all drive this one class; they differ only in the
clock they pass and in who decides when stages fire (APScheduler, the operator, or the plan).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from dispatcher import audit
from dispatcher.addresses import mask_address
from dispatcher.channels.base import Channel, ChannelContext, OutboundMessage, Outcome, Receipt
from dispatcher.config.loader import Config
from dispatcher.config.models import CampaignConfig, StageConfig
from dispatcher.engine.clock import Clock
from dispatcher.engine.materialise import Interrupted, MaterialiseResult, materialise
from dispatcher.engine.policy import RetryPolicy
from dispatcher.engine.ratelimit import RateLimiter
from dispatcher.engine.worker import ChannelWorker, RunInfo
from dispatcher.engine.writer import DeliveryWriter
from dispatcher.errors import ChannelError, DispatcherError
from dispatcher.logs import first_line
from dispatcher.messages import stage_firing
from dispatcher.plan import Firing, iter_firings
from dispatcher.store import queue, runs, workers
from dispatcher.store.database import Database
from dispatcher.store.tables import Delivery, DeliveryStatus, StageRun, StageRunStatus

log = logging.getLogger("dispatcher.engine")
D = Delivery.__table__  # type: ignore[attr-defined]
R = StageRun.__table__  # type: ignore[attr-defined]


def new_worker_id() -> str:
    """A process-unique worker id: host, pid and a random suffix (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class FireResult:
    """What firing a stage did: the run id, and whether this process created it."""

    run_id: int | None
    created: bool
    materialised: MaterialiseResult | None = None


class Engine:
    """Fires stages and sends their deliveries through the configured channels."""

    def __init__(
        self,
        config: Config,
        db: Database,
        clock: Clock,
        *,
        worker_id: str | None = None,
        channels: dict[str, Channel] | None = None,
        public_url: str | None = None,
        actor: str = "daemon",
    ) -> None:
        self.config = config
        self.db = db
        self.clock = clock
        self.worker_id = worker_id or new_worker_id()
        self.actor = actor
        engine_cfg = config.root.engine
        self.lease = engine_cfg.lease
        self.policy = RetryPolicy(
            max_attempts=engine_cfg.max_attempts,
            max_age=engine_cfg.max_age,
            base=engine_cfg.backoff_base,
            cap=engine_cfg.backoff_max,
        )
        self.writer = DeliveryWriter(db, clock, self.worker_id, self.lease)
        self.public_url = public_url if public_url is not None else config.root.server.public_url
        self.channels: dict[str, Channel] = channels if channels is not None else {}
        self.workers: dict[str, ChannelWorker] = {}
        self._run_info: dict[int, RunInfo | None] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._materialising: set[asyncio.Task[None]] = set()
        self.on_receipt: Callable[[Receipt], Awaitable[None]] | None = None
        #: Receipts applied, by (channel, status, error code or ""), for /metrics.
        self.receipt_counts: Counter[tuple[str, str, str]] = Counter()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, *, send: bool = True) -> None:
        """Register this worker, open channels and start the writer (and send workers)."""
        self.writer.start()
        now = self.clock.now()
        # Registration commits before the live workers are read: of two workers starting at
        # once, the later reader then always sees the other and waits (read in the same
        # transaction, both could see only themselves and both send at the full rate).
        async with self.db.engine.begin() as conn:
            await workers.register(conn, self.worker_id, now=now)
        async with self.db.engine.begin() as conn:
            live = await workers.live_workers(conn, now=now, lease=self.lease, me=self.worker_id)
        # Live workers split each channel's rate. Those already sending learn of this one at
        # their next housekeeping, and their last second of sends still counts against the
        # cap, so this one waits that long before it sends.
        heartbeat = self.config.root.engine.heartbeat.total_seconds()
        margin = max(
            (c.rate_margin.total_seconds() for c in self.config.root.channels.values()),
            default=0.0,
        )
        start_delay = 2 * heartbeat + 1 + margin if len(live) > 1 else 0.0
        if send:
            await self._open_channels()
            for name, channel in self.channels.items():
                cfg = self.config.root.channels[name]
                limiter = RateLimiter(
                    cfg.rate,
                    cfg.bucket_size,
                    self.clock,
                    margin_s=cfg.rate_margin.total_seconds(),
                )
                limiter.set_share(len(live))
                worker = ChannelWorker(
                    name=name,
                    channel=channel,
                    db=self.db,
                    writer=self.writer,
                    limiter=limiter,
                    clock=self.clock,
                    owner=self.worker_id,
                    policy=self.policy,
                    concurrency=cfg.concurrency,
                    batch_size=self.config.root.engine.batch_size,
                    lease=self.lease,
                    run_info=self._lookup_run_info,
                    poll_interval=self.config.root.engine.poll_interval.total_seconds(),
                    start_delay=start_delay,
                )
                self.workers[name] = worker
                self._tasks.append(
                    asyncio.create_task(worker.run(self._stop), name=f"worker-{name}")
                )
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))

    async def _open_channels(self) -> None:
        for channel in self.channels.values():
            # Channels handed in (rehearsal simulators, tests) report receipts here too.
            channel.context.receipt_sink = self._receipt
        for name, cls in self.config.channel_types.items():
            if name in self.channels:
                continue
            context = ChannelContext(
                receipt_sink=self._receipt,
                public_url=self.public_url,
                base_dir=self.config.base_dir,
                logger=logging.getLogger(f"dispatcher.channels.{name}"),
            )
            self.channels[name] = cls(name, self.config.channel_settings[name], context)
        for name, channel in self.channels.items():
            try:
                await channel.start()
            except DispatcherError:
                raise
            except Exception as exc:
                raise ChannelError(f"channel {name!r} could not start: {exc}") from exc

    async def stop(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a grace period
        """Stop claiming, let in-flight sends finish (up to `timeout`), close everything."""
        self._stop.set()
        timeout = (
            timeout
            if timeout is not None
            else self.config.root.engine.shutdown_timeout.total_seconds()
        )
        # Only sends are ever cut off. A task cancelled in the middle of a database statement
        # can leave the connection holding SQLite's write lock, and the rest of the shutdown
        # then fails with "database is locked": so the loops around the sends, and the
        # materialisations (which stop at their next batch), are left to finish what they do.
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            if still:
                for worker in self.workers.values():
                    worker.cancel_sends()
                await self._wait_or_cancel(list(still))
        await self._wait_or_cancel(list(self._materialising))
        for channel in self.channels.values():
            try:
                await channel.close()
            except Exception as exc:
                log.warning("channel %s did not close cleanly: %s", channel.name, exc)
        await self.writer.close()
        now = self.clock.now()
        async with self.db.engine.begin() as conn:
            # What this worker still holds once its tasks are over (sends cut off by the timeout,
            # a materialisation stopped half-way) is settled now, not when its leases run out:
            # claimed rows go back to the queue, rows in flight become unknown, and runs being
            # materialised are left for the next worker to resume from their checkpoint.
            released, unknown = await queue.recover_expired(
                conn, now=now, dead_owners=[self.worker_id]
            )
            handed_over = await runs.release(conn, owner=self.worker_id, now=now)
            if released or unknown or handed_over:
                await audit.append(
                    conn,
                    [
                        audit.AuditEvent(
                            "recovery",
                            self.actor,
                            data={
                                "stopping": self.worker_id,
                                "released": released,
                                "unknown": unknown,
                                "runs": handed_over,
                            },
                        )
                    ],
                    now,
                )
            await workers.stopped(conn, self.worker_id, now=now)
        if released or unknown or handed_over:
            log.warning(
                "stopped before finishing: %d deliveries back to pending, %d in flight now "
                "unknown, %d materialisations to resume",
                released,
                len(unknown),
                len(handed_over),
            )

    @staticmethod
    async def _wait_or_cancel(tasks: list[asyncio.Task[None]], grace_s: float = 30.0) -> None:
        """Let tasks that were told to stop finish; cancel them only if they hang past `grace_s`."""
        if not tasks:
            return
        _, still = await asyncio.wait(tasks, timeout=grace_s)
        for task in still:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- firing ------------------------------------------------------------------------------

    async def fire(
        self,
        campaign: CampaignConfig,
        stage: StageConfig,
        firing: Firing,
        *,
        trigger: str = "scheduled",
        wait: bool = True,
    ) -> FireResult:
        """Create the stage run for `firing` (once, whoever asks) and materialise it."""
        run_id = await self._create_run(
            stage,
            firing,
            trigger=trigger,
            status=StageRunStatus.MATERIALISING,
            owned=True,
            event="firing",
            data={"trigger": trigger, "worker": self.worker_id},
        )
        if run_id is None:
            log.info("%s/%s at %s was already fired", campaign.id, stage.id, firing.at.isoformat())
            async with self.db.engine.connect() as conn:
                existing = await runs.find_run(conn, campaign.id, stage.id, firing.at)
            return FireResult(existing["id"] if existing else None, created=False)
        log.info("firing %s/%s (%s, run %s)", campaign.id, stage.id, trigger, run_id)
        job = stage_firing(self.config, campaign, stage, firing)
        start = functools.partial(
            materialise,
            self.db,
            run_id,
            job,
            owner=self.worker_id,
            clock=self.clock,
            lease=self.lease,
            batch_size=1000,
            on_batch=self._wake_workers,
            stopping=self._stop.is_set,
        )
        if wait:
            result = await start()
            self._wake_workers()
            return FireResult(run_id, True, result)
        task = asyncio.create_task(self._background(run_id, start), name=f"materialise-{run_id}")
        self._materialising.add(task)
        task.add_done_callback(self._materialising.discard)
        return FireResult(run_id, True)

    async def _background(
        self, run_id: int, start: Callable[[], Awaitable[MaterialiseResult]]
    ) -> None:
        # A locked or restarting database interrupts a materialisation: every batch commits
        # with its checkpoint, so starting again resumes where it stopped, and the unique
        # (run, channel, address) key keeps a batch that did commit from being added twice.
        delay = 0.5
        try:
            while True:
                try:
                    await start()
                    return
                except (runs.LostLease, Interrupted):
                    return
                except DispatcherError as exc:
                    log.error("materialisation failed: %s", exc)
                    return
                except (OperationalError, InterfaceError, OSError) as exc:
                    log.warning(
                        "materialisation of run %s interrupted (database unavailable), "
                        "resuming from its checkpoint in %.1fs: %s",
                        run_id,
                        delay,
                        first_line(exc),
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    return  # stop() hands the run over; the next worker resumes it
                delay = min(delay * 2, 5.0)
        finally:
            self._wake_workers()

    async def _create_run(
        self,
        stage: StageConfig,
        firing: Firing,
        *,
        trigger: str,
        status: str,
        owned: bool,
        event: str,
        data: dict[str, object],
    ) -> int | None:
        """Insert the firing's unique stage run and audit it; None if it already existed."""
        now = self.clock.now()
        async with self.db.engine.begin() as conn:
            run_id = await runs.create_run(
                conn,
                campaign=firing.campaign,
                stage=stage.id,
                fire_time=firing.at,
                firing_index=firing.index,
                channel=stage.channel,
                trigger=trigger,
                status=status,
                owner=self.worker_id if owned else None,
                lease_until=now + self.lease if owned else None,
                now=now,
            )
            if run_id is not None:
                subject = f"{firing.campaign}/{stage.id}@{firing.at.isoformat()}"
                event_data = {"run": run_id, **data}
                await audit.append(
                    conn,
                    [audit.AuditEvent(event, self.actor, subject=subject, data=event_data)],
                    now,
                )
        return run_id

    async def record_missed(
        self, campaign: CampaignConfig, stage: StageConfig, firing: Firing
    ) -> bool:
        """Record a firing that was not run in time (outside its grace); True if newly recorded."""
        run_id = await self._create_run(
            stage,
            firing,
            trigger="missed",
            status=StageRunStatus.MISSED,
            owned=False,
            event="firing.missed",
            data={"grace_s": stage.grace.total_seconds()},
        )
        if run_id is not None:
            log.warning(
                "%s/%s at %s was missed (more than %s late): recorded as missed",
                campaign.id,
                stage.id,
                firing.at.isoformat(),
                stage.grace,
            )
        return run_id is not None

    async def catch_up(self, now: datetime) -> list[FireResult]:
        """Handle firings due before `now` without a stage run: fire within grace, else missed."""
        results = []
        for campaign, stage in self.config.stages():
            async with self.db.engine.connect() as conn:
                done = await runs.existing_fire_times(conn, campaign.id, stage.id)
            for firing in iter_firings(campaign, stage):
                if firing.at > now:
                    break
                if firing.at in done:
                    continue
                if now - firing.at <= stage.grace:
                    results.append(
                        await self.fire(campaign, stage, firing, trigger="catch-up", wait=False)
                    )
                else:
                    await self.record_missed(campaign, stage, firing)
        return results

    def _wake_workers(self) -> None:
        for worker in self.workers.values():
            worker.wake.set()

    # -- receipts ----------------------------------------------------------------------------

    async def _receipt(self, receipt: Receipt) -> None:
        self.receipt_counts[(receipt.channel, receipt.status.value, receipt.error_code or "")] += 1
        await self.writer.receipt(receipt)
        if self.on_receipt is not None:
            await self.on_receipt(receipt)

    async def receipt(self, receipt: Receipt) -> None:
        """Apply a receipt that arrived from outside (HTTP callback)."""
        await self._receipt(receipt)

    # -- housekeeping ------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        interval = self.config.root.engine.heartbeat.total_seconds()
        while not self._stop.is_set():
            try:
                await self.housekeep()
            except Exception as exc:  # the database may be briefly unavailable: try again later
                log.warning("housekeeping failed, will try again: %s", first_line(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.clock.real_seconds(interval))

    async def housekeep(self) -> None:
        """Heartbeat, renew leases, settle dead workers' leases, resume orphaned runs."""
        now = self.clock.now()
        lease_until = now + self.lease
        async with self.db.engine.begin() as conn:
            await workers.heartbeat(conn, self.worker_id, now=now)
            await queue.renew_leases(conn, owner=self.worker_id, lease_until=lease_until)
            await runs.renew(conn, owner=self.worker_id, lease_until=lease_until)
            dead = await workers.dead_workers(conn, now=now, lease=self.lease, me=self.worker_id)
            released, unknown = await queue.recover_expired(conn, now=now, dead_owners=dead)
            taken = await runs.take_over_stale(
                conn, owner=self.worker_id, now=now, lease_until=lease_until, dead_owners=dead
            )
            if dead:
                await workers.mark_dead(conn, dead, now=now)
            if released or unknown:
                await audit.append(
                    conn,
                    [
                        audit.AuditEvent(
                            "recovery",
                            self.actor,
                            data={"dead_workers": dead, "released": released, "unknown": unknown},
                        )
                    ],
                    now,
                )
            live = await workers.live_workers(conn, now=now, lease=self.lease, me=self.worker_id)
        for worker in self.workers.values():
            worker.limiter.set_share(len(live))
        if released or unknown:
            log.warning(
                "recovered leases of stopped workers: %d back to pending, %d in flight now unknown",
                released,
                len(unknown),
            )
            self._wake_workers()
        for run_id in taken:
            await self._resume(run_id)
        await self.reconcile_unknown()

    async def _resume(self, run_id: int) -> None:
        async with self.db.engine.connect() as conn:
            run = await runs.get_run(conn, run_id)
        if run is None:
            return
        campaign = self.config.campaign(run["campaign"])
        stage = campaign.stage(run["stage"]) if campaign else None
        if campaign is None or stage is None:
            log.error(
                "stage run %s: %s/%s is no longer in the configuration",
                run_id,
                run["campaign"],
                run["stage"],
            )
            return
        log.info("resuming materialisation of run %s from line %s", run_id, run["checkpoint_line"])
        firing = Firing(campaign.id, stage.id, run["fire_time"], run["firing_index"])
        job = stage_firing(self.config, campaign, stage, firing)
        start = functools.partial(
            materialise,
            self.db,
            run_id,
            job,
            owner=self.worker_id,
            clock=self.clock,
            lease=self.lease,
            on_batch=self._wake_workers,
            stopping=self._stop.is_set,
        )
        task = asyncio.create_task(self._background(run_id, start), name=f"materialise-{run_id}")
        self._materialising.add(task)
        task.add_done_callback(self._materialising.discard)

    async def reconcile_unknown(self, limit: int = 100) -> int:
        """Ask channels that can look messages up about `unknown` deliveries; settle those."""
        settled = 0
        for name, channel in self.channels.items():
            if not channel.can_reconcile:
                continue
            async with self.db.engine.connect() as conn:
                rows = (
                    await conn.execute(
                        select(
                            D.c.id,
                            D.c.address,
                            D.c.body,
                            D.c.subject,
                            D.c.claimed_at,
                            D.c.stage_run_id,
                            D.c.created_at,
                        )
                        .where(
                            D.c.channel == name,
                            D.c.status == DeliveryStatus.UNKNOWN,
                            # Once the provider could not say, leave it to an operator.
                            D.c.error_code.is_(None) | (D.c.error_code != "unreconciled"),
                        )
                        .order_by(D.c.id)
                        .limit(limit)
                    )
                ).all()
            for row in rows:
                info = await self._lookup_run_info(row.stage_run_id)
                message = OutboundMessage(
                    delivery_id=row.id,
                    address=row.address,
                    body=row.body,
                    campaign=info.campaign if info else "",
                    stage=info.stage if info else "",
                    subject=row.subject,
                )
                try:
                    found = await channel.reconcile(message, row.claimed_at or row.created_at)
                except Exception as exc:
                    log.warning("reconcile of %s failed: %s", mask_address(row.address), exc)
                    found = None
                now = self.clock.now()
                if found is None:
                    outcome = queue.Outcome(
                        row.id,
                        DeliveryStatus.UNKNOWN,
                        from_status=DeliveryStatus.UNKNOWN,
                        error_code="unreconciled",
                        error_reason="the provider could not say whether it was sent",
                        final_at=now,
                    )
                elif found.outcome is Outcome.ACCEPTED:
                    outcome = queue.Outcome(
                        row.id,
                        DeliveryStatus.SENT,
                        from_status=DeliveryStatus.UNKNOWN,
                        provider_id=found.provider_id,
                        sent_at=now,
                        final_at=now,
                        reason="reconciled",
                    )
                else:  # the provider certainly does not have it: safe to send
                    outcome = queue.Outcome(
                        row.id,
                        DeliveryStatus.PENDING,
                        from_status=DeliveryStatus.UNKNOWN,
                        error_code=found.error_code,
                        error_reason="reconciled: not at provider",
                        not_before=now,
                    )
                await self.writer.record(outcome)
                settled += outcome.status != DeliveryStatus.UNKNOWN
        if settled:
            self._wake_workers()
        return settled

    # -- lookups -----------------------------------------------------------------------------

    async def _lookup_run_info(self, run_id: int) -> RunInfo | None:
        if run_id not in self._run_info:
            async with self.db.engine.connect() as conn:
                run = await runs.get_run(conn, run_id)
            if run is None:
                return None
            self._remember_run(run_id, run["campaign"], run["stage"])
        return self._run_info[run_id]

    def _remember_run(self, run_id: int, campaign_id: str, stage_id: str) -> None:
        campaign = self.config.campaign(campaign_id)
        stage = campaign.stage(stage_id) if campaign else None
        if campaign is None or stage is None:
            self._run_info[run_id] = None
            return
        self._run_info[run_id] = RunInfo(
            campaign=campaign.id,
            stage=stage.id,
            window=campaign.campaign.send_window,
            tz=campaign.tz,
            max_attempts=stage.max_attempts or self.policy.max_attempts,
        )

    async def open_deliveries(self, run_ids: list[int] | None = None) -> int:
        async with self.db.engine.connect() as conn:
            return await queue.open_count(conn, run_ids)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()
