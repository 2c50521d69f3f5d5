"""RateLimiter on a fake clock: the cap holds in every one-second window, and the pace is the rate.

The clock is a test double for time (sleeping advances it), so these tests are exact and instant.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.engine.ratelimit import WINDOW_MARGIN_S, RateLimiter
from tests.conftest import sliding_max


class FakeClock:
    """Time that passes only when someone sleeps."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return datetime(2010, 8, 31, tzinfo=UTC) + timedelta(seconds=self.t)

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += max(0.0, seconds)
        await asyncio.sleep(0)

    def real_seconds(self, seconds: float) -> float:
        return 0.0


async def grants(limiter: RateLimiter, clock: FakeClock, n: int) -> list[float]:
    out = []
    for _ in range(n):
        await limiter.acquire()
        out.append(clock.t)
    return out


async def test_a_full_bucket_goes_at_once_then_the_rate_paces() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=10, burst=5, clock=clock)
    times = await grants(limiter, clock, 25)
    assert times[:5] == [0.0] * 5
    gaps = [b - a for a, b in itertools.pairwise(times[5:])]
    assert all(gap == pytest.approx(0.1) for gap in gaps[:4])  # then one every 1/rate s
    assert sliding_max(times) <= 10


@pytest.mark.parametrize(("rate", "burst"), [(50, 50), (50, 200), (7.5, 3), (1, 1), (1000, 1000)])
async def test_no_one_second_window_holds_more_than_the_rate(rate: float, burst: int) -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=rate, burst=burst, clock=clock)
    n = int(rate * 6) + 3
    times = await grants(limiter, clock, n)
    assert sliding_max(times) <= int(rate)
    # And it is not slower than it must be: n grants within (n / rate) plus a window or so.
    assert times[-1] <= n / rate + 1 + WINDOW_MARGIN_S


async def test_concurrent_waiters_share_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=20, burst=20, clock=clock)
    times: list[float] = []

    async def worker() -> None:
        for _ in range(15):
            await limiter.acquire()
            times.append(clock.t)

    await asyncio.gather(*(worker() for _ in range(8)))
    assert len(times) == 120
    assert sliding_max(times) <= 20
    assert max(times) >= (120 - 2 * 20) / 20  # paced, not merely capped


async def test_a_rate_below_one_per_second_spaces_grants() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=0.5, burst=1, clock=clock)
    times = await grants(limiter, clock, 4)
    assert times == [0.0, pytest.approx(2.0), pytest.approx(4.0), pytest.approx(6.0)]


async def test_admit_holds_the_cap_on_call_times_when_calls_lag_their_grants() -> None:
    # Grants come in bursts of the full rate; the calls of one burst are spread out by commit
    # latency, so without `admit` the next burst's calls would land within the same second.
    clock = FakeClock()
    limiter = RateLimiter(rate=10, burst=10, clock=clock)
    calls: list[float] = []
    for burst in range(5):
        granted = await grants(limiter, clock, 10)
        assert set(granted) == {granted[0]}, f"burst {burst} was granted at once"
        for i in range(10):
            # The first call of a burst is quick, the last ones wait for a slow commit.
            lag = 0.0 if i == 0 else 0.3
            if clock.t < granted[0] + lag:
                clock.t = granted[0] + lag
            await limiter.admit()
            calls.append(clock.t)
    assert sliding_max(calls) <= 10


async def test_admit_never_waits_when_calls_keep_the_pace() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=5, burst=1, clock=clock)
    for _ in range(20):
        await limiter.acquire()
        before = clock.t
        await limiter.admit()
        assert clock.t == before


def test_rate_and_burst_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1, clock=FakeClock())
    with pytest.raises(ValueError):
        RateLimiter(rate=10, burst=0, clock=FakeClock())


@settings(max_examples=60, deadline=None)
@given(
    rate=st.floats(min_value=1, max_value=200),
    burst=st.integers(min_value=1, max_value=400),
    pauses=st.lists(st.floats(min_value=0, max_value=1.5), min_size=1, max_size=80),
)
def test_the_cap_holds_whatever_the_pauses_between_requests(
    rate: float, burst: int, pauses: list[float]
) -> None:
    async def scenario() -> list[float]:
        clock = FakeClock()
        limiter = RateLimiter(rate=rate, burst=burst, clock=clock)
        times = []
        for pause in pauses * 3:
            clock.t += pause
            await limiter.acquire()
            await limiter.admit()
            times.append(clock.t)
        return times

    times = asyncio.run(scenario())
    assert sliding_max(times) <= int(rate)


async def test_calls_waiting_in_admit_when_the_share_changes_still_count() -> None:
    # Three workers share 30/s; one leaves and the survivors' share rises to 15/s a window
    # later. Calls that were waiting in `admit` across the change must be counted in the window
    # the next calls look at (they were once appended to a window the change had replaced,
    # and the worker then made more than its share in one second).
    clock = FakeClock()
    limiter = RateLimiter(rate=30, burst=30, clock=clock)
    limiter.set_share(3)
    calls: list[float] = []

    async def call() -> None:
        await limiter.admit()
        calls.append(clock.t)

    for _ in range(10):  # a full window at the share of three: 10 calls at once
        await call()
    limiter.set_share(2)  # a worker left: the raise to 15/s is due a window from now
    # Ten calls wait for the window to pass; meanwhile another send asks for a token, which
    # applies the raise while they are still waiting.
    waiting = [asyncio.create_task(call()) for _ in range(10)]
    await asyncio.gather(limiter.acquire(), *waiting)
    while clock.t < 4:
        await call()
    assert sliding_max(calls) <= 15


def test_the_window_follows_the_share_down_and_up() -> None:
    async def scenario() -> list[tuple[float, int]]:
        clock = FakeClock()
        limiter = RateLimiter(rate=60, burst=60, clock=clock)
        out = []
        for workers in (1, 3, 2, 1, 4):
            limiter.set_share(workers)
            end = clock.t + 3
            while clock.t < end:
                await limiter.acquire()
                await limiter.admit()
                out.append((clock.t, limiter.workers))
        return out

    calls = asyncio.run(scenario())
    # Whatever the changes, no window holds more than the largest share that applied in it.
    for i, (t, _) in enumerate(calls):
        in_window = [w for s, w in calls[i:] if s < t + 1.0]
        assert len(in_window) <= 60 // min(in_window)
