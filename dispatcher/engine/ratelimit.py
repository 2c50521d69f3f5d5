"""Pacing: a token bucket for smoothness plus a sliding-window guard for the hard cap.

The bucket alone would allow `burst + rate` sends in a 1 s window; the guard remembers the last
`floor(rate)` grant times and never grants the next one before the oldest is a full window old,
so no window of one second (plus a small margin for commit jitter) ever holds more than the cap.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from dispatcher.engine.clock import Clock

# Grants turn into provider calls a few milliseconds later (after the in-flight mark commits);
# a margin keeps that jitter from pushing two grants into one provider-side window.
WINDOW_MARGIN_S = 0.01


class RateLimiter:
    """At most `rate` grants per second on average, `burst` at once, never more than the cap per window."""

    def __init__(self, rate: float, burst: int, clock: Clock, window_s: float = 1.0) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.window = window_s + WINDOW_MARGIN_S
        self._tokens = float(min(burst, max(1, math.floor(rate))))
        self._updated = clock.monotonic()
        cap = math.floor(rate * window_s)
        self._recent: deque[float] | None = deque(maxlen=cap) if cap >= 1 else None
        self._lock = asyncio.Lock()
        self.waited_s = 0.0

    async def acquire(self) -> None:
        """Wait for permission to make one send (FIFO among waiters)."""
        async with self._lock:
            while True:
                now = self.clock.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                wait = 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate
                recent = self._recent
                if recent is not None and len(recent) == recent.maxlen:
                    wait = max(wait, recent[0] + self.window - now)
                if wait <= 0:
                    self._tokens -= 1
                    if recent is not None:
                        recent.append(now)
                    return
                self.waited_s += wait
                await self.clock.sleep(wait)
