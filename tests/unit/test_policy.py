"""RetryPolicy: exponential backoff with full jitter, Retry-After as a floor, bounded by attempts and age."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from dispatcher.engine.policy import RetryPolicy

CREATED = datetime(2010, 8, 31, 1, 0, tzinfo=UTC)
POLICY = RetryPolicy(
    max_attempts=5, max_age=timedelta(hours=6), base=timedelta(seconds=2), cap=timedelta(minutes=10)
)


def delay(
    policy: RetryPolicy,
    attempts: int,
    *,
    retry_after: float | None = None,
    seed: int = 0,
    now: datetime = CREATED,
) -> float | None:
    when = policy.next_try(
        attempts=attempts,
        created_at=CREATED,
        now=now,
        retry_after=retry_after,
        rng=random.Random(seed),
    )
    return None if when is None else (when - now).total_seconds()


def test_backoff_doubles_from_the_base_with_jitter_in_the_upper_half() -> None:
    for attempts, ceiling in [(1, 2), (2, 4), (3, 8), (4, 16)]:
        delays = [delay(POLICY, attempts, seed=s) for s in range(200)]
        assert all(d is not None and ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered, so retries of a batch do not come back together


def test_backoff_is_capped() -> None:
    policy = RetryPolicy(
        max_attempts=30,
        max_age=timedelta(days=7),
        base=timedelta(seconds=2),
        cap=timedelta(minutes=10),
    )
    assert all(300 <= delay(policy, 20, seed=s) <= 600 for s in range(50))  # type: ignore[operator]


def test_no_retry_after_the_last_attempt() -> None:
    assert delay(POLICY, 4) is not None
    assert delay(POLICY, 5) is None
    assert delay(POLICY, 9) is None


def test_retry_after_is_a_floor() -> None:
    assert delay(POLICY, 1, retry_after=30) == 30
    assert 4 <= delay(POLICY, 3, retry_after=1) <= 8  # type: ignore[operator]


def test_no_retry_beyond_the_maximum_age() -> None:
    late = CREATED + timedelta(hours=5, minutes=59, seconds=59)
    assert delay(POLICY, 2, now=late) is None
    assert delay(POLICY, 2, now=CREATED + timedelta(hours=5)) is not None
    assert delay(POLICY, 1, retry_after=7 * 3600) is None  # a Retry-After past the age: give up now


@given(
    attempts=st.integers(min_value=1, max_value=12),
    retry_after=st.none() | st.floats(0, 3600),
    seed=st.integers(0, 2**32),
    age_s=st.floats(0, 8 * 3600),
)
def test_next_try_is_in_the_future_within_bounds(
    attempts: int, retry_after: float | None, seed: int, age_s: float
) -> None:
    now = CREATED + timedelta(seconds=age_s)
    when = POLICY.next_try(
        attempts=attempts,
        created_at=CREATED,
        now=now,
        retry_after=retry_after,
        rng=random.Random(seed),
    )
    if attempts >= POLICY.max_attempts:
        assert when is None
        return
    if when is None:  # only the age bound may refuse a retry below the attempt limit
        assert now + timedelta(seconds=max(retry_after or 0, 1)) - CREATED > POLICY.max_age
        return
    assert when > now
    assert when - CREATED <= POLICY.max_age
    if retry_after is not None:
        assert (when - now).total_seconds() >= retry_after
    assert (when - now).total_seconds() <= max(POLICY.cap.total_seconds(), retry_after or 0) + 1e-6


def test_attempts_made_while_the_channel_was_down_spend_no_budget_but_age_still_counts() -> None:
    rng = random.Random(1)
    for attempts in (5, 6, 50, 10_000):  # at and far past max_attempts
        when = POLICY.next_try(
            attempts=attempts,
            created_at=CREATED,
            now=CREATED,
            retry_after=None,
            rng=rng,
            counted=False,
        )
        assert when is not None and when - CREATED <= POLICY.cap
    late = CREATED + POLICY.max_age
    assert (
        POLICY.next_try(
            attempts=1, created_at=CREATED, now=late, retry_after=None, rng=rng, counted=False
        )
        is None
    )
