"""Clocks: the real one for the daemon, scaled and virtual ones for rehearsals."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """What the engine asks of time: wall time (UTC-aware), a monotonic reading, and sleeping."""

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def real_seconds(self, seconds: float) -> float:
        """How long to wait, in real seconds, between polls `seconds` apart on this clock."""
        ...


class SystemClock:
    """Real time."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def real_seconds(self, seconds: float) -> float:
        return seconds


class ScaledClock:
    """Virtual time starting at `start`, running `speed` times faster than real time.

    `jump_to` moves it forward at once, so a rehearsal skips the idle hours between firings;
    rate limits and send windows see the same virtual time, so they behave as they would live.
    """

    def __init__(self, start: datetime, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self._origin = start.astimezone(UTC)
        self._real0 = time.monotonic()
        self._offset = 0.0
        self.speed = speed

    def monotonic(self) -> float:
        return (time.monotonic() - self._real0) * self.speed + self._offset

    def now(self) -> datetime:
        return self._origin + timedelta(seconds=self.monotonic())

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.speed)

    def real_seconds(self, seconds: float) -> float:
        return seconds / self.speed

    def jump_to(self, moment: datetime) -> None:
        """Advance to `moment` (never backwards)."""
        ahead = (moment - self.now()).total_seconds()
        if ahead > 0:
            self._offset += ahead


class VirtualClock:
    """Simulated time that moves only when something would take time live: pacing, or a jump.

    For instant rehearsals. Under a scaled clock, the real time the engine spends rendering,
    committing and sending passes on the virtual timeline too, multiplied by the speed: at
    100,000x, a 5,000-recipient blast that takes 100 s live took days of virtual time, and most
    of it "expired" in the rehearsal. Here real work takes no virtual time; `sleep` (a rate
    limiter's wait) moves time on by its duration, concurrent sleepers overlapping as they
    would live, and `jump_to` skips idle hours. Polls (`real_seconds`) wait briefly in real
    time, because nothing on this timeline happens by itself.
    """

    def __init__(self, start: datetime, poll_s: float = 0.02) -> None:
        self._origin = start.astimezone(UTC)
        self._offset = 0.0
        self._poll_s = poll_s

    def monotonic(self) -> float:
        return self._offset

    def now(self) -> datetime:
        return self._origin + timedelta(seconds=self._offset)

    async def sleep(self, seconds: float) -> None:
        target = self._offset + max(0.0, seconds)
        await asyncio.sleep(0)  # what runs meanwhile still sees the time the wait began
        self._offset = max(self._offset, target)

    def real_seconds(self, seconds: float) -> float:
        return min(seconds, self._poll_s)

    def jump_to(self, moment: datetime) -> None:
        """Advance to `moment` (never backwards)."""
        ahead = (moment - self.now()).total_seconds()
        if ahead > 0:
            self._offset += ahead
