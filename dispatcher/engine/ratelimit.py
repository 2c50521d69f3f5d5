"""Pacing: a token bucket for smoothness plus sliding-window guards for the hard cap.

The bucket alone would allow `burst + rate` sends in a 1 s window; the guard remembers the last
`floor(rate)` grant times and never grants the next one before the oldest is a full window old,
so no window of one second ever holds more than the cap of grants.

Grants are not provider calls, though: between the two lies the commit of the in-flight mark,
whose latency varies from batch to batch, so a burst granted at once reaches the provider spread
out and the next burst, granted a window later, can land inside the same provider-side second
(58 calls in one second at a rate of 50 was measured). `admit` applies the same guard to call
times; it only ever waits for that jitter. The engine calls it right before `Channel.send`, or
the adapter does as its request leaves (see `Channel.paces_requests`): a new connection's
handshake, for one, can hold a request back for tens of milliseconds after the engine's check.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from dispatcher.engine.clock import Clock

# Calls reach the provider after a delay that varies from call to call (scheduling, the
# network): a margin on the window keeps that jitter from pushing two windows' calls into one
# provider-side second. It costs its share of the cap (1000 per 1.01 s at a cap of 1000/s).
# The default; a channel's `rate_margin` sets its own.
WINDOW_MARGIN_S = 0.01
# Waits shorter than this count as none. Float rounding can leave a token at 0.9999999 or a
# window a hair short of full; on a clock that only moves when slept on (virtual time), adding
# such a wait to a large reading changes nothing, and the limiter would spin forever.
EPSILON_S = 1e-9


class RateLimiter:
    """At most `rate` grants per second, `burst` at once, never more than the cap in any window."""

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Clock,
        window_s: float = 1.0,
        margin_s: float = WINDOW_MARGIN_S,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.channel_rate = rate
        self.channel_burst = burst
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.window_s = window_s
        self.window = window_s + margin_s
        self.workers = 1
        self._tokens = float(min(burst, max(1, math.floor(rate))))
        self._updated = clock.monotonic()
        self.cap = math.floor(rate * window_s)  # per window; below 1 the bucket alone paces
        # Grant and call times of the last window. The deques live as long as the limiter and
        # only ever change in place: a send waiting in `admit` while the share changes must
        # record its call in the window the next send looks at.
        self._recent: deque[float] = deque()
        self._calls: deque[float] = deque()
        self._lock = asyncio.Lock()
        self._call_lock = asyncio.Lock()
        self._raise: tuple[int, float] | None = None  # (workers, from when): a deferred raise
        self.waited_s = 0.0

    def set_share(self, workers: int) -> None:
        """Pace at 1/`workers` of the channel's rate and burst: every live worker sends on it.

        Each process has its own limiter, so the channel's rate holds across processes only if
        they split it. The sliding windows keep their most recent entries, so a worker that
        learns of a newcomer keeps the smaller cap from its next grant on.
        """
        workers = max(1, workers)
        if workers < self.workers:
            # A worker left: its sends of the last window still count at the provider, so the
            # larger share starts only a window from now (a newcomer waits likewise on start).
            if self._raise is None or self._raise[0] != workers:
                self._raise = (workers, self.clock.monotonic() + self.window)
            return
        self._raise = None
        self._apply_share(workers)

    def _raise_due(self) -> None:
        if self._raise is not None and self.clock.monotonic() >= self._raise[1]:
            workers, self._raise = self._raise[0], None
            self._apply_share(workers)

    def _apply_share(self, workers: int) -> None:
        if workers == self.workers:
            return
        self.workers = workers
        self.rate = self.channel_rate / workers
        self.burst = max(1, self.channel_burst // workers)
        self._tokens = min(self._tokens, float(self.burst))
        self.cap = math.floor(self.rate * self.window_s)

    def _window_wait(self, times: deque[float], now: float) -> float:
        """Seconds until one more event at `now` keeps every window of `times` within the cap."""
        while times and times[0] <= now - self.window:
            times.popleft()
        if self.cap < 1 or len(times) < self.cap:
            return 0.0
        # The cap-th most recent event must have left the window first.
        return times[len(times) - self.cap] + self.window - now

    async def acquire(self) -> None:
        """Wait for permission to make one send (FIFO among waiters)."""
        async with self._lock:
            while True:
                self._raise_due()
                now = self.clock.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                wait = max((1 - self._tokens) / self.rate, self._window_wait(self._recent, now))
                if wait <= EPSILON_S:
                    self._tokens = max(0.0, self._tokens - 1)
                    self._recent.append(now)
                    return
                self.waited_s += wait
                await self.clock.sleep(wait)

    async def admit(self) -> None:
        """Wait until one more provider call keeps every window within the cap."""
        async with self._call_lock:
            while True:
                self._raise_due()
                now = self.clock.monotonic()
                wait = self._window_wait(self._calls, now)
                if wait <= EPSILON_S:
                    self._calls.append(now)
                    return
                self.waited_s += wait
                await self.clock.sleep(wait)
