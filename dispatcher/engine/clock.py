"""Clocks: the real one for the daemon, a scaled one for rehearsals on a virtual timeline."""

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


class SystemClock:
    """Real time."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


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

    def jump_to(self, moment: datetime) -> None:
        """Advance to `moment` (never backwards)."""
        ahead = (moment - self.now()).total_seconds()
        if ahead > 0:
            self._offset += ahead
