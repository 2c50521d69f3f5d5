"""Retry policy: exponential backoff with full jitter, bounded by attempts and age."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try again after a retryable error, and when to give up."""

    max_attempts: int = 5
    max_age: timedelta = timedelta(hours=6)
    base: timedelta = timedelta(seconds=2)
    cap: timedelta = timedelta(minutes=10)

    def next_try(
        self,
        *,
        attempts: int,
        created_at: datetime,
        now: datetime,
        retry_after: float | None,
        rng: random.Random,
        counted: bool = True,
    ) -> datetime | None:
        """The time of the next attempt, or None when the delivery should fail for good.

        An attempt that is not `counted` (the channel was down) spends none of `max_attempts`;
        the backoff and `max_age` still apply.
        """
        if counted and attempts >= self.max_attempts:
            return None
        exponent = min(attempts - 1, 32)  # uncounted attempts may go on: keep 2**n small
        ceiling = min(self.cap.total_seconds(), self.base.total_seconds() * 2**exponent)
        delay = rng.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            # The provider's Retry-After is a floor: sending earlier would be refused again.
            delay = max(delay, retry_after)
        # Rounded up to the microsecond, so that a Retry-After floor is never undercut by rounding.
        when = now + timedelta(microseconds=math.ceil(delay * 1_000_000))
        if when - created_at > self.max_age:
            return None
        return when
