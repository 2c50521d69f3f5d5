"""A channel's send worker: claim due deliveries, check them, pace, send, record.

Per delivery, in this order: expired? → suppressed. Outside the send window? → back to the queue
until the window opens. Then a rate-limit grant, then the in-flight mark (which re-checks the
opt-out list in the same statement), then the provider call, then the outcome.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from dispatcher.addresses import mask_address
from dispatcher.channels.base import Channel, OutboundMessage, Outcome, SendResult, pacing
from dispatcher.config.models import SendWindow
from dispatcher.engine.clock import Clock
from dispatcher.engine.policy import RetryPolicy
from dispatcher.engine.ratelimit import RateLimiter
from dispatcher.engine.writer import DeliveryWriter
from dispatcher.logs import first_line
from dispatcher.plan import in_window, next_window_opening
from dispatcher.store import queue
from dispatcher.store.database import Database
from dispatcher.store.tables import DeliveryStatus as S

log = logging.getLogger("dispatcher.engine")

#: How long a channel's sends pause when it reports itself unavailable without a Retry-After.
CHANNEL_PAUSE_S = 5.0

#: Sender tasks per slot: one calling, one getting its token and in-flight mark meanwhile.
PIPELINE_FACTOR = 2


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What a worker needs to know about a delivery's stage run."""

    campaign: str
    stage: str
    window: SendWindow
    tz: ZoneInfo
    max_attempts: int


#: Upper bounds (seconds) of the provider-call latency histogram exposed on /metrics.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass
class WorkerStats:
    claimed: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0
    unknown: int = 0
    suppressed: int = 0
    deferred: int = 0
    # For /metrics: provider answers by outcome and code, and call latency per bucket
    # (the last slot counts calls slower than the largest bound).
    outcomes: Counter[str] = field(default_factory=Counter)
    error_codes: Counter[str] = field(default_factory=Counter)
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0

    def observe(self, result: SendResult, latency_s: float) -> None:
        """Count one provider call: its outcome, its error code and how long it took."""
        self.outcomes[result.outcome.value] += 1
        if result.error_code:
            self.error_codes[result.error_code] += 1
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)] += 1
        self.latency_sum_s += latency_s


class ChannelWorker:
    """Sends one channel's deliveries with bounded concurrency and a rate limit."""

    def __init__(
        self,
        *,
        name: str,
        channel: Channel,
        db: Database,
        writer: DeliveryWriter,
        limiter: RateLimiter,
        clock: Clock,
        owner: str,
        policy: RetryPolicy,
        concurrency: int,
        batch_size: int,
        lease: timedelta,
        run_info: Callable[[int], Awaitable[RunInfo | None]],
        poll_interval: float = 1.0,
        send_timeout: float = 120.0,
        start_delay: float = 0.0,
    ) -> None:
        self.name = name
        self.channel = channel
        self.db = db
        self.writer = writer
        self.limiter = limiter
        self.clock = clock
        self.owner = owner
        self.policy = policy
        self.batch_size = batch_size
        self.lease = lease
        self.run_info = run_info
        self.poll_interval = poll_interval
        self.send_timeout = send_timeout
        self.start_delay = start_delay
        self.stats = WorkerStats()
        self.wake = asyncio.Event()
        # `concurrency` bounds the provider calls. A send's in-flight mark is committed before
        # it takes a slot, and its outcome's commit is not waited for, so the slots hold calls
        # only: a commit's latency (a loop turn or two when busy) does not idle the provider.
        self._slots = asyncio.Semaphore(concurrency)
        # Sends granted a token but not calling yet (their mark being committed): at most as
        # many as the slots, which bounds the deliveries marked in flight but not called (a
        # crash leaves them `unknown`) and keeps grants close to the calls they stand for (the
        # rate limit's windows count grants; twice as many made an instant rehearsal's blast
        # 10 % slower than live).
        self._ahead = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._calling = 0
        # Long-lived sender tasks take claimed deliveries from the queue (a task per delivery
        # cost a tenth of the engine's CPU at a few thousand sends a second).
        self._queue: asyncio.Queue[queue.ClaimedDelivery] = asyncio.Queue()
        self._senders: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[Any]] = set()  # senders with a delivery in hand
        self._under_way = 0  # deliveries queued or in a sender's hands (see _room)
        self._freed = asyncio.Event()  # a sender finished a delivery
        self._stopping = False
        self._pacing: set[asyncio.Task[Any]] = set()  # sends waiting for a token or a slot
        self._rng = random.Random()
        # Until when (monotonic) the channel said it cannot take messages: nothing is called.
        self._paused_until = 0.0

    @property
    def in_flight(self) -> int:
        """Provider calls in progress."""
        return self._calling

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and send until `stop` is set, then let in-flight sends finish."""
        if self.start_delay > 0:
            # Other workers share this channel's rate: give them time to notice this one and
            # lower their share before it adds its own sends (see Engine.start).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.clock.real_seconds(self.start_delay))
        self._senders = [
            asyncio.create_task(self._sender(), name=f"send-{self.name}-{index}")
            for index in range(self._concurrency * PIPELINE_FACTOR)
        ]
        while not stop.is_set():
            room = self._room()
            if room < self._claim_at_least():  # enough under way: wait for senders to finish
                await self._wait_for_room(stop)
                continue
            try:
                claimed = await self._claim(room)
            except Exception as exc:
                log.warning(
                    "channel %s: cannot claim deliveries, will try again: %s",
                    self.name,
                    first_line(exc),
                )
                claimed = []
            if not claimed:
                await self._idle(stop)
                continue
            if self._paused():
                await self._release_all(claimed, self._resume_at())
                await self._idle(stop, self._paused_until - self.clock.monotonic())
                continue
            for delivery in claimed:
                if stop.is_set():
                    # Not yet in flight: hand it straight back.
                    await self.writer.release(delivery.id, self.clock.now())
                    continue
                self._under_way += 1
                self._queue.put_nowait(delivery)
        await self._stop_senders()

    async def _sender(self) -> None:
        """Take claimed deliveries one after another and send them, until the worker stops."""
        current = asyncio.current_task()
        assert current is not None
        while not self._stopping:
            delivery = await self._queue.get()
            self._busy.add(current)
            try:
                await self._deliver(delivery, current)
            except Exception as exc:  # a bug: the delivery stays as it is (recovered later)
                log.error("channel %s: send failed: %r", self.name, exc)
            finally:
                self._busy.discard(current)
                self._under_way -= 1
                self._freed.set()

    async def _stop_senders(self) -> None:
        self._stopping = True
        # Nothing below awaits until every queued delivery is taken back and every idle sender
        # cancelled, so no sender picks up a delivery meanwhile.
        queued = []
        while not self._queue.empty():
            queued.append(self._queue.get_nowait())
            self._under_way -= 1
        for sender in self._senders:
            if sender not in self._busy:
                sender.cancel()
        # Sends still waiting for a token or a slot are not called yet: at a low rate they could
        # hold the shutdown for long, so they are handed back (see _send) instead of waited for.
        for task in list(self._pacing):
            task.cancel()
        for delivery in queued:
            await self.writer.release(delivery.id, self.clock.now())
        await self.drain()

    def cancel_sends(self) -> None:
        """Cut off every send still under way (the shutdown timeout ran out)."""
        for sender in self._senders:
            sender.cancel()

    async def drain(self) -> None:
        """Wait for in-flight sends."""
        await asyncio.gather(*self._senders, return_exceptions=True)

    async def _idle(self, stop: asyncio.Event, seconds: float | None = None) -> None:
        self.wake.clear()
        waits: list[Awaitable[Any]] = [
            stop.wait(),
            asyncio.sleep(self.clock.real_seconds(seconds or self.poll_interval)),
        ]
        if seconds is None:  # new work wakes an idle worker, not a paused one
            waits.append(self.wake.wait())
        await _first_of(waits)

    def _paused(self) -> bool:
        return self.clock.monotonic() < self._paused_until

    def _resume_at(self) -> datetime:
        return self.clock.now() + timedelta(
            seconds=max(0.0, self._paused_until - self.clock.monotonic())
        )

    def _pause(self, result: SendResult) -> None:
        seconds = result.retry_after if result.retry_after is not None else CHANNEL_PAUSE_S
        until = self.clock.monotonic() + seconds
        if until > self._paused_until:
            if not self._paused():
                log.warning(
                    "channel %s unavailable, sends paused for %.0fs: %s",
                    self.name,
                    seconds,
                    result.reason,
                )
            self._paused_until = until

    async def _release_all(self, claimed: list[queue.ClaimedDelivery], when: datetime) -> None:
        for delivery in claimed:
            await self.writer.release(delivery.id, when)

    def _ahead_of_senders(self) -> int:
        # At the rate limit, a batch's last delivery waits this long for its token: claims stay
        # small enough that their leases are not held long, and other workers get their share.
        return min(self.batch_size, int(self.limiter.rate) + 1)

    def _room(self) -> int:
        """How many more deliveries to claim: every sender one, plus about a second's worth."""
        return self._concurrency * PIPELINE_FACTOR + self._ahead_of_senders() - self._under_way

    def _claim_at_least(self) -> int:
        # Claims of one delivery each time a sender finishes would make a claim per send.
        return max(1, self._ahead_of_senders() // 2)

    async def _wait_for_room(self, stop: asyncio.Event) -> None:
        self._freed.clear()
        await _first_of([self._freed.wait(), stop.wait()])

    async def _claim(self, room: int) -> list[queue.ClaimedDelivery]:
        limit = min(self.batch_size, room)
        rows = await self.writer.claim(self.name, limit)
        self.stats.claimed += len(rows)
        return rows

    async def _deliver(self, delivery: queue.ClaimedDelivery, sender: asyncio.Task[Any]) -> None:
        try:
            info = await self.run_info(delivery.stage_run_id)
        except Exception as exc:  # the database is unavailable: hand it back (the writer waits)
            log.warning(
                "channel %s: cannot look up stage run %s, will try again: %s",
                self.name,
                delivery.stage_run_id,
                first_line(exc),
            )
            await self.writer.release(delivery.id, self.clock.now() + timedelta(seconds=1))
            return
        now = self.clock.now()
        if info is None:
            await self.writer.release(delivery.id, now + timedelta(minutes=1))
            return
        if _expired(delivery, now):
            self.stats.suppressed += 1
            await self.writer.record(_expiry(delivery, now, from_status=S.CLAIMED))
            return
        if not in_window(info.window, info.tz, now):
            self.stats.deferred += 1
            await self.writer.release(delivery.id, next_window_opening(info.window, info.tz, now))
            return
        called = await self._send(delivery, info, sender)
        if called is None:
            return
        result, started, latency_ms = called
        self.stats.observe(result, latency_ms / 1000)
        self._record(delivery, info, result, started, latency_ms)

    async def _send(
        self, delivery: queue.ClaimedDelivery, info: RunInfo, current: asyncio.Task[Any]
    ) -> tuple[SendResult, datetime, float] | None:
        """Pace, mark in flight, then call the provider in one of the `concurrency` slots.

        The in-flight mark is committed before a slot is taken, so the slots hold provider calls
        only, not waits for the database. None when the provider was not called (the delivery
        has been handed back or settled).
        """
        # Waiting for a token or a slot, a send is cut short when the worker stops (see run):
        # it was not called, so it goes back to the queue.
        self._pacing.add(current)
        try:
            await self._ahead.acquire()
            try:
                await self.limiter.acquire()
            except BaseException:
                self._ahead.release()
                raise
        except asyncio.CancelledError:
            await self.writer.release(delivery.id, self.clock.now())
            raise
        finally:
            self._pacing.discard(current)
        try:
            if self._paused():  # the channel said it cannot take messages: do not call it
                self.stats.deferred += 1
                await self.writer.release(delivery.id, self._resume_at())
                return None
            now = self.clock.now()
            if not in_window(info.window, info.tz, now):  # the wait crossed the closing time
                self.stats.deferred += 1
                await self.writer.release(
                    delivery.id, next_window_opening(info.window, info.tz, now)
                )
                return None
            state = await self.writer.mark_sending(delivery.id)
            if state != "sending":
                if state == "opted_out":
                    self.stats.suppressed += 1
                return None
            if self._stopping:  # marked, not called: back to the queue (see _stop_senders)
                await self._undo_mark(delivery, info, self.clock.now())
                return None
            self._pacing.add(current)
            try:
                await self._slots.acquire()
            except asyncio.CancelledError:
                await self._undo_mark(delivery, info, self.clock.now())
                raise
            finally:
                self._pacing.discard(current)
        finally:
            self._ahead.release()
        try:
            message = OutboundMessage(
                delivery_id=delivery.id,
                address=delivery.address,
                body=delivery.body,
                campaign=info.campaign,
                stage=info.stage,
                subject=delivery.subject,
                html=delivery.html,
                encoding=delivery.encoding,
                segments=delivery.segments,
                valid_until=delivery.valid_until,
            )
            return await self._call(delivery, info, message)
        finally:
            self._slots.release()

    async def _call(
        self, delivery: queue.ClaimedDelivery, info: RunInfo, message: OutboundMessage
    ) -> tuple[SendResult, datetime, float] | None:
        """Call the provider (None when pacing crossed the window or validity: not called)."""
        paced_by_channel = self.channel.paces_requests
        if not paced_by_channel:
            await self.limiter.admit()
        started = self.clock.now()
        if (
            self._paused()
            or not in_window(info.window, info.tz, started)
            or _expired(delivery, started)
        ):
            # The channel went down meanwhile, or pacing crossed the closing time or the
            # validity: the provider was not called, so this process may undo its in-flight
            # mark (a crash here leaves it `unknown`: safe).
            await self._undo_mark(delivery, info, started)
            return None
        admitted: list[datetime] = []

        async def admit() -> None:
            await self.limiter.admit()
            admitted.append(self.clock.now())

        t0 = time.perf_counter()
        self._calling += 1
        try:
            # A timeout scope, not wait_for: the call starts now, in this task, not one loop
            # iteration later in a new one (which would blur the pacing `admit` just did).
            with pacing(admit if paced_by_channel else None):
                if self.channel.bounds_its_calls:
                    result = await self.channel.send(message)
                else:
                    async with asyncio.timeout(self.send_timeout):
                        result = await self.channel.send(message)
        except TimeoutError:
            result = SendResult.ambiguous("timeout", f"no answer within {self.send_timeout:.0f}s")
        except Exception as exc:  # an adapter bug must not lose the delivery: it may have gone out
            log.error(
                "channel %s: adapter raised %r for %s",
                self.name,
                exc,
                mask_address(delivery.address),
            )
            result = SendResult.ambiguous("adapter-error", f"{type(exc).__name__}: {exc}")
        finally:
            self._calling -= 1
        # The attempt starts when its request was let go (the adapter's last pacing check).
        return result, admitted[0] if admitted else started, (time.perf_counter() - t0) * 1000

    async def _undo_mark(
        self, delivery: queue.ClaimedDelivery, info: RunInfo, now: datetime
    ) -> None:
        """Settle or hand back a delivery marked in flight whose provider was not called."""
        if _expired(delivery, now):
            self.stats.suppressed += 1
            outcome = _expiry(delivery, now, from_status=S.SENDING, attempts_delta=-1)
        else:
            self.stats.deferred += 1
            if self._paused():
                not_before = self._resume_at()
            elif not in_window(info.window, info.tz, now):
                not_before = next_window_opening(info.window, info.tz, now)
            else:  # the worker is stopping
                not_before = now
            outcome = queue.Outcome(
                delivery.id, S.PENDING, not_before=not_before, attempts_delta=-1
            )
        await self.writer.record(outcome)

    def _record(
        self,
        delivery: queue.ClaimedDelivery,
        info: RunInfo,
        result: SendResult,
        started: datetime,
        latency_ms: float,
    ) -> None:
        now = self.clock.now()
        attempt_no = delivery.attempts + 1
        attempt = queue.AttemptRecord(
            delivery_id=delivery.id,
            number=attempt_no,
            worker=self.owner,
            started_at=started,
            latency_ms=latency_ms,
            outcome=result.outcome.value,
            provider_id=result.provider_id,
            error_code=result.error_code,
            reason=result.reason,
        )
        opt_out = None
        if result.outcome is Outcome.ACCEPTED:
            self.stats.sent += 1
            outcome = queue.Outcome(
                delivery.id,
                S.SENT,
                provider_id=result.provider_id,
                sent_at=now,
                final_at=None if result.expects_receipt else now,
            )
        elif result.outcome is Outcome.RETRY:
            policy = RetryPolicy(
                info.max_attempts, self.policy.max_age, self.policy.base, self.policy.cap
            )
            if result.channel_down:
                self._pause(result)
            when = policy.next_try(
                attempts=attempt_no,
                created_at=delivery.created_at,
                now=now,
                retry_after=result.retry_after,
                rng=self._rng,
                counted=not result.channel_down,
            )
            if result.channel_down and when is not None:
                when = max(when, self._resume_at())
            if (
                delivery.valid_until is not None
                and when is not None
                and when >= delivery.valid_until
            ):
                when = None
            if when is None:
                self.stats.failed += 1
                outcome = queue.Outcome(
                    delivery.id,
                    S.FAILED,
                    error_code=result.error_code,
                    error_reason=f"gave up after {attempt_no} attempts: {result.reason}",
                    final_at=now,
                )
            else:
                self.stats.retried += 1
                outcome = queue.Outcome(
                    delivery.id,
                    S.PENDING,
                    error_code=result.error_code,
                    error_reason=result.reason,
                    not_before=when,
                )
        elif result.outcome is Outcome.FAILED:
            self.stats.failed += 1
            outcome = queue.Outcome(
                delivery.id,
                S.FAILED,
                error_code=result.error_code,
                error_reason=result.reason,
                final_at=now,
            )
        elif result.outcome is Outcome.OPTED_OUT:
            self.stats.suppressed += 1
            outcome = queue.Outcome(
                delivery.id,
                S.SUPPRESSED,
                reason="opted_out",
                error_code=result.error_code,
                error_reason=result.reason,
                final_at=now,
            )
            opt_out = (delivery.address, f"provider:{self.name}")
        else:
            self.stats.unknown += 1
            outcome = queue.Outcome(
                delivery.id,
                S.UNKNOWN,
                error_code=result.error_code,
                error_reason=result.reason,
                final_at=now,
            )
        # Not waited for: the send's task ends and the next one goes ahead. The commit follows
        # within a tick; a crash before it leaves the delivery `sending`, later `unknown`: safe.
        self.writer.record_soon(outcome, attempt, opt_out)


async def _first_of(waits: list[Awaitable[Any]]) -> None:
    """Wait until the first of `waits` is done; cancel the others."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _expired(delivery: queue.ClaimedDelivery, now: datetime) -> bool:
    return delivery.valid_until is not None and now >= delivery.valid_until


def _expiry(
    delivery: queue.ClaimedDelivery, now: datetime, *, from_status: str, attempts_delta: int = 0
) -> queue.Outcome:
    """The outcome of a delivery whose validity ran out before the provider was called."""
    assert delivery.valid_until is not None
    return queue.Outcome(
        delivery.id,
        S.SUPPRESSED,
        from_status=from_status,
        reason="expired",
        error_code="expired",
        error_reason=f"not sent before {delivery.valid_until.isoformat()}",
        final_at=now,
        attempts_delta=attempts_delta,
    )
