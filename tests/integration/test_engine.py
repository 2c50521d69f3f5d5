"""The dispatch engine end to end on SQLite: fire, materialise, pace, send, record, account.

Every test drives the real Engine against the simulator channel (the far side of the network)
and checks the promises on what the database and the simulator's send log hold afterwards.
Time is either real (waiting on conditions, never on luck) or a ScaledClock for quiet hours,
validity and backoff.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from dispatcher import audit
from dispatcher.addresses import normalise_phone
from dispatcher.channels.base import ChannelContext, Receipt, ReceiptStatus
from dispatcher.channels.simulator import SimulatorChannel, SimulatorSettings
from dispatcher.config.loader import Config
from dispatcher.engine.clock import ScaledClock, SystemClock
from dispatcher.engine.engine import Engine
from dispatcher.plan import Firing, iter_firings
from dispatcher.rehearsal import rehearse
from dispatcher.reports.status import summaries
from dispatcher.store import queue
from dispatcher.store.database import Database
from dispatcher.store.tables import (
    Attempt,
    AuditEntry,
    Delivery,
    DeliveryStatus,
    Rejection,
    StageRun,
)
from tests.conftest import (
    STAGE_ID,
    TIMEZONE,
    load,
    phone_numbers,
    read_send_log,
    run_cli,
    sliding_max,
    wait_until,
    write_config,
)

D = Delivery.__table__  # type: ignore[attr-defined]
A = Attempt.__table__  # type: ignore[attr-defined]
R = StageRun.__table__  # type: ignore[attr-defined]
L = AuditEntry.__table__  # type: ignore[attr-defined]
J = Rejection.__table__  # type: ignore[attr-defined]
S = DeliveryStatus
SHANGHAI = ZoneInfo(TIMEZONE)
WAIT_S = 60.0


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
async def databases() -> AsyncIterator[list[Database]]:
    """Databases opened by a test, closed after it whatever happens."""
    opened: list[Database] = []
    yield opened
    for db in opened:
        await db.close()


async def open_db(cfg: Config, opened: list[Database]) -> Database:
    db = Database.open(cfg.database_url)
    opened.append(db)
    await db.upgrade()
    return db


def simulator(cfg: Config, **update: Any) -> SimulatorChannel:
    """The configured `sms` simulator, with some settings changed (e.g. its own send log)."""
    settings = cfg.channel_settings["sms"]
    assert isinstance(settings, SimulatorSettings)
    return SimulatorChannel(
        "sms", settings.model_copy(update=update), ChannelContext(base_dir=cfg.base_dir)
    )


def the_firing(cfg: Config, stage_id: str = STAGE_ID) -> tuple[Any, Any, Firing]:
    campaign, stage = cfg.find_stage(stage_id)
    return campaign, stage, next(iter_firings(campaign, stage))


async def rows(db: Database, stmt: Any) -> list[Any]:
    async with db.engine.connect() as conn:
        return list((await conn.execute(stmt)).all())


async def status_counts(db: Database) -> Counter[str]:
    return Counter(
        {
            status: n
            for status, n in await rows(db, select(D.c.status, func.count()).group_by(D.c.status))
        }
    )


async def settled(db: Database, *statuses: str, total: int) -> bool:
    counts = await status_counts(db)
    return sum(counts[s] for s in statuses) == total


async def audit_changes(db: Database) -> dict[int, list[str]]:
    """Per delivery id, the statuses the audit chain recorded for it, in order."""
    out: dict[int, list[str]] = {}
    for (data,) in await rows(
        db, select(L.c.data).where(L.c.kind == "deliveries").order_by(L.c.seq)
    ):
        for delivery_id, status, _code in json.loads(data)["changes"]:
            out.setdefault(delivery_id, []).append(status)
    return out


async def check_accounts(db: Database) -> None:
    """Every stage run adds up: rows = deliveries + invalid + duplicates, statuses sum to deliveries."""
    async with db.engine.connect() as conn:
        items = await summaries(conn, now=datetime.now(UTC))
        assert (await audit.verify(conn)).ok
    for s in items:
        assert s.adds_up, s
        assert s.counted == s.deliveries
        if s.status == "ready":
            assert s.rows_read == s.deliveries + s.invalid + s.duplicates


# -- one firing, end to end ----------------------------------------------------------------------


async def test_a_firing_reaches_every_recipient_exactly_once(
    tmp_path: Path, databases: list[Database]
) -> None:
    cfg = load(
        write_config(
            tmp_path,
            recipients=200,
            invalid=3,
            duplicates=5,
            channel={"receipts": True, "log": "sends.jsonl", "concurrency": 20},
        )
    )
    db = await open_db(cfg, databases)
    engine = Engine(cfg, db, SystemClock())
    await engine.start()
    try:
        campaign, stage, firing = the_firing(cfg)
        result = await engine.fire(campaign, stage, firing)
        assert result.created and result.materialised is not None
        m = result.materialised
        assert (m.rows_read, m.deliveries, m.invalid, m.duplicates) == (208, 200, 3, 5)
        await wait_until(lambda: settled(db, S.DELIVERED, total=200), WAIT_S, "200 receipts")
    finally:
        await engine.stop()

    await check_accounts(db)
    deliveries = await rows(
        db,
        select(
            D.c.id,
            D.c.address,
            D.c.status,
            D.c.attempts,
            D.c.provider_id,
            D.c.sent_at,
            D.c.final_at,
        ),
    )
    assert len(deliveries) == 200
    assert len({d.address for d in deliveries}) == 200
    assert all(d.attempts == 1 and d.provider_id and d.sent_at and d.final_at for d in deliveries)
    attempts = await rows(db, select(A.c.delivery_id, A.c.number, A.c.outcome, A.c.provider_id))
    assert sorted(a.delivery_id for a in attempts) == sorted(d.id for d in deliveries)
    assert {(a.number, a.outcome) for a in attempts} == {(1, "accepted")}
    assert {a.delivery_id: a.provider_id for a in attempts} == {
        d.id: d.provider_id for d in deliveries
    }

    sent, torn = read_send_log(tmp_path / "sends.jsonl")
    assert torn == 0
    assert Counter(r["delivery_id"] for r in sent) == Counter({d.id: 1 for d in deliveries})
    assert {r["address"] for r in sent} == {d.address for d in deliveries}

    # The audit chain holds the firing, its materialisation and every delivery's path.
    kinds = Counter(k for (k,) in await rows(db, select(L.c.kind)))
    assert kinds["firing"] == 1 and kinds["firing.materialised"] == 1
    changes = await audit_changes(db)
    assert set(changes) == {d.id for d in deliveries}
    assert all(path == ["sending", "sent", "delivered"] for path in changes.values())
    rejections = await rows(db, select(J.c.line, J.c.reason))
    assert len(rejections) == 3 and all("not a valid number" in r.reason for r in rejections)


# -- never twice: idempotent firings -------------------------------------------------------------


async def test_two_workers_firing_the_same_firing_make_one_run(
    tmp_path: Path, databases: list[Database]
) -> None:
    cfg = load(write_config(tmp_path, recipients=300, channel={"concurrency": 10}))
    db_a, db_b = await open_db(cfg, databases), await open_db(cfg, databases)
    sim_a, sim_b = simulator(cfg, log="a.jsonl"), simulator(cfg, log="b.jsonl")
    a = Engine(cfg, db_a, SystemClock(), worker_id="worker-a", channels={"sms": sim_a})
    b = Engine(cfg, db_b, SystemClock(), worker_id="worker-b", channels={"sms": sim_b})
    await a.start()
    await b.start()
    try:
        campaign, stage, firing = the_firing(cfg)
        first, second = await asyncio.gather(
            a.fire(campaign, stage, firing), b.fire(campaign, stage, firing)
        )
        assert sorted([first.created, second.created]) == [False, True]
        assert first.run_id == second.run_id is not None
        await wait_until(lambda: settled(db_a, S.SENT, total=300), WAIT_S, "300 sends")
    finally:
        await a.stop()
        await b.stop()

    assert (await rows(db_a, select(func.count()).select_from(R)))[0][0] == 1
    assert (await rows(db_a, select(func.count()).select_from(D)))[0][0] == 300
    log_a, _ = read_send_log(tmp_path / "a.jsonl")
    log_b, _ = read_send_log(tmp_path / "b.jsonl")
    sent_ids = Counter(r["delivery_id"] for r in log_a + log_b)
    assert len(sent_ids) == 300 and set(sent_ids.values()) == {1}
    assert sim_a.duplicates == sim_b.duplicates == 0
    attempts = await rows(db_a, select(A.c.delivery_id, A.c.worker))
    assert len(attempts) == 300
    by_worker = Counter(a.worker for a in attempts)
    assert set(by_worker) <= {"worker-a", "worker-b"}
    await check_accounts(db_a)


async def test_a_restarted_engine_does_not_fire_again(
    tmp_path: Path, databases: list[Database]
) -> None:
    cfg = load(write_config(tmp_path, recipients=50))
    db = await open_db(cfg, databases)
    first = Engine(cfg, db, SystemClock())
    await first.start()
    try:
        fired = await first.catch_up(datetime.now(UTC))
        assert len(fired) == 1 and fired[0].created
        await wait_until(lambda: settled(db, S.SENT, total=50), WAIT_S, "50 sends")
    finally:
        await first.stop()

    sim = simulator(cfg)
    again = Engine(cfg, db, SystemClock(), channels={"sms": sim})
    await again.start()
    try:
        assert await again.catch_up(datetime.now(UTC)) == []
        campaign, stage, firing = the_firing(cfg)
        repeat = await again.fire(campaign, stage, firing)
        assert not repeat.created and repeat.run_id == fired[0].run_id
        await again.housekeep()
    finally:
        await again.stop()
    assert sim.sent_count == 0
    assert (await rows(db, select(func.count()).select_from(R)))[0][0] == 1
    assert await status_counts(db) == Counter({S.SENT: 50})


async def test_catch_up_fires_within_grace_and_records_older_firings_as_missed(
    tmp_path: Path, databases: list[Database]
) -> None:
    now = datetime.now(SHANGHAI).replace(tzinfo=None, microsecond=0)
    base = {"channel": "sms", "audience": "public", "template": "{{ name }}：质量月", "grace": "1h"}
    config_path = write_config(
        tmp_path,
        recipients=10,
        at=now,
        stages=[
            {**base, "id": "late", "at": now - timedelta(hours=2)},
            {**base, "id": "recent", "at": now - timedelta(minutes=10)},
            {**base, "id": "future", "at": now + timedelta(hours=3)},
        ],
    )
    cfg = load(config_path)
    db = await open_db(cfg, databases)
    engine = Engine(cfg, db, SystemClock())
    await engine.start()
    try:
        fired = await engine.catch_up(datetime.now(UTC))
        assert [f.created for f in fired] == [True]
        await wait_until(lambda: settled(db, S.SENT, total=10), WAIT_S, "the recent stage's sends")
        assert await engine.catch_up(datetime.now(UTC)) == []  # both are recorded now
    finally:
        await engine.stop()

    runs = {
        r.stage: r
        for r in await rows(db, select(R.c.stage, R.c.status, R.c.trigger, R.c.deliveries))
    }
    assert set(runs) == {"late", "recent"}
    assert (runs["late"].status, runs["late"].trigger, runs["late"].deliveries) == (
        "missed",
        "missed",
        0,
    )
    assert (runs["recent"].status, runs["recent"].trigger, runs["recent"].deliveries) == (
        "ready",
        "catch-up",
        10,
    )
    kinds = Counter(k for (k,) in await rows(db, select(L.c.kind)))
    assert kinds["firing.missed"] == 1

    status = run_cli("status", "--json", str(config_path))
    assert status.returncode == 0, status.stderr
    lines = {item["stage"]: item for item in map(json.loads, status.stdout.splitlines())}
    assert lines["late"]["status"] == "missed" and lines["late"]["adds_up"]
    assert lines["recent"]["by_status"]["sent"] == 10 and lines["recent"]["adds_up"]


# -- bounded: the rate limit ---------------------------------------------------------------------


async def test_the_rate_limit_holds_in_every_one_second_window(
    tmp_path: Path, databases: list[Database]
) -> None:
    rate = 50
    cfg = load(
        write_config(
            tmp_path,
            recipients=300,
            channel={"rate": rate, "concurrency": 20, "log": "sends.jsonl"},
        )
    )
    db = await open_db(cfg, databases)
    engine = Engine(cfg, db, SystemClock())
    await engine.start()
    try:
        campaign, stage, firing = the_firing(cfg)
        await engine.fire(campaign, stage, firing)
        await wait_until(lambda: settled(db, S.SENT, total=300), WAIT_S, "300 sends at 50/s")
    finally:
        await engine.stop()
    sent, _ = read_send_log(tmp_path / "sends.jsonl")
    assert len(sent) == 300
    times = [r["t"] for r in sent]
    assert sliding_max(times) <= rate
    # Not merely bounded: paced at (close to) the rate, so 300 take about 5 s or more.
    assert max(times) - min(times) >= (300 - 2 * rate) / rate
    started = [a.started_at.timestamp() for a in await rows(db, select(A.c.started_at))]
    assert sliding_max(started) <= rate


async def test_the_rate_limit_holds_across_two_workers(
    tmp_path: Path, databases: list[Database]
) -> None:
    # A daemon is sending when an operator runs `dispatcher send --wait` (or a second daemon
    # starts): together they must stay within the channel's rate, not each of them.
    rate = 40
    cfg = load(write_config(tmp_path, recipients=240, channel={"rate": rate, "concurrency": 10}))
    first = Engine(
        cfg,
        await open_db(cfg, databases),
        SystemClock(),
        worker_id="worker-a",
        channels={"sms": simulator(cfg, log="a.jsonl")},
    )
    second = Engine(
        cfg,
        await open_db(cfg, databases),
        SystemClock(),
        worker_id="worker-b",
        channels={"sms": simulator(cfg, log="b.jsonl")},
    )
    await first.start()
    try:
        campaign, stage, firing = the_firing(cfg)
        await first.fire(campaign, stage, firing)
        await wait_until(lambda: settled(first.db, S.SENT, total=rate), WAIT_S, "the first sends")
        await second.start()
        try:
            await wait_until(lambda: settled(first.db, S.SENT, total=240), WAIT_S, "240 sends")
        finally:
            await second.stop()
    finally:
        await first.stop()
    log_a, _ = read_send_log(tmp_path / "a.jsonl")
    log_b, _ = read_send_log(tmp_path / "b.jsonl")
    assert len(log_a) + len(log_b) == 240 and log_b, "both workers sent"
    assert sliding_max([r["t"] for r in log_a + log_b]) <= rate


# -- respectful: send window, validity, opt-outs -------------------------------------------------


def quiet_hours_config(tmp_path: Path, at: datetime, **kwargs: Any) -> Config:
    return load(
        write_config(
            tmp_path,
            at=at,
            campaign={
                "start": at.date() - timedelta(days=1),
                "end": at.date() + timedelta(days=3),
                "send_window": {"start": "08:00", "end": "21:00"},
            },
            **kwargs,
        )
    )


async def test_a_firing_before_the_send_window_waits_for_it_to_open(
    tmp_path: Path, databases: list[Database]
) -> None:
    at = datetime(2010, 9, 1, 6, 0)
    cfg = quiet_hours_config(tmp_path, at, recipients=20)
    opening = datetime(2010, 9, 1, 8, 0, tzinfo=SHANGHAI)
    db = await open_db(cfg, databases)
    campaign, stage, firing = the_firing(cfg)
    clock = ScaledClock(firing.at, speed=1.0)
    engine = Engine(cfg, db, clock)
    await engine.start()
    try:
        await engine.fire(campaign, stage, firing)

        async def deferred() -> bool:
            due = await rows(db, select(D.c.not_before).where(D.c.status == S.PENDING))
            return len(due) == 20 and all(t == opening for (t,) in due)

        await wait_until(deferred, WAIT_S, "every delivery to wait for 08:00")
        assert (await rows(db, select(func.count()).select_from(A)))[0][0] == 0
        clock.jump_to(opening)
        await wait_until(lambda: settled(db, S.SENT, total=20), WAIT_S, "the sends at 08:00")
    finally:
        await engine.stop()
    sent_at = [t for (t,) in await rows(db, select(D.c.sent_at))]
    assert len(sent_at) == 20 and all(t >= opening for t in sent_at)
    assert all(t >= opening for (t,) in await rows(db, select(A.c.started_at)))


async def test_deliveries_past_their_validity_are_suppressed_not_sent(
    tmp_path: Path, databases: list[Database]
) -> None:
    # Ten seconds before the window closes, 2 messages a second: most must wait for the next
    # morning, by which time their 1-hour validity has run out.
    at = datetime(2010, 9, 1, 20, 59, 50)
    cfg = quiet_hours_config(
        tmp_path, at, recipients=50, stage={"validity": "1h"}, channel={"rate": 2, "concurrency": 4}
    )
    closing = datetime(2010, 9, 1, 21, 0, tzinfo=SHANGHAI)
    next_opening = datetime(2010, 9, 2, 8, 0, tzinfo=SHANGHAI)
    db = await open_db(cfg, databases)
    campaign, stage, firing = the_firing(cfg)
    clock = ScaledClock(firing.at, speed=5.0)
    engine = Engine(cfg, db, clock)
    await engine.start()
    try:
        await engine.fire(campaign, stage, firing)

        async def all_waiting_for_morning() -> bool:
            counts = await status_counts(db)
            due = await rows(db, select(D.c.not_before).where(D.c.status == S.PENDING))
            return (
                counts[S.CLAIMED] + counts[S.SENDING] == 0
                and clock.now() >= closing
                and all(t == next_opening for (t,) in due)
            )

        await wait_until(all_waiting_for_morning, WAIT_S, "the window to close")
        clock.jump_to(next_opening)
        await wait_until(lambda: settled(db, S.SENT, S.SUPPRESSED, total=50), WAIT_S, "expiry")
    finally:
        await engine.stop()
    deliveries = await rows(
        db, select(D.c.status, D.c.sent_at, D.c.reason, D.c.error_code, D.c.attempts)
    )
    sent = [d for d in deliveries if d.status == S.SENT]
    expired = [d for d in deliveries if d.status == S.SUPPRESSED]
    assert len(sent) + len(expired) == 50
    assert all(firing.at <= d.sent_at for d in sent)
    # Every provider call started inside the window (the check right before the call).
    calls = await rows(db, select(A.c.started_at))
    assert calls and all(firing.at <= started < closing for (started,) in calls)
    assert len(sent) <= 2 * 11 + 2  # the rate over the ten seconds left, plus the burst
    assert expired and all(
        (d.reason, d.error_code, d.attempts) == ("expired", "expired", 0) for d in expired
    )
    await check_accounts(db)


async def test_opt_outs_are_honoured_at_materialisation_and_again_before_sending(
    tmp_path: Path, databases: list[Database]
) -> None:
    cfg = load(write_config(tmp_path, recipients=30, channel={"log": "sends.jsonl"}))
    db = await open_db(cfg, databases)
    campaign, stage, firing = the_firing(cfg)
    numbers = [normalise_phone(n, "CN") for n in phone_numbers(30)]
    before, after = numbers[:3], numbers[10:14]
    async with db.engine.begin() as conn:
        await queue.add_opt_outs(conn, before, source="import", now=datetime.now(UTC))
    planner = Engine(cfg, db, SystemClock(), actor="operator")
    await planner.start(send=False)
    try:
        await planner.fire(campaign, stage, firing)
    finally:
        await planner.stop()
    async with db.engine.begin() as conn:  # a STOP reply arrives between materialising and sending
        await queue.add_opt_outs(conn, after, source="reply", now=datetime.now(UTC))

    sender = Engine(cfg, db, SystemClock())
    await sender.start()
    try:
        await wait_until(lambda: settled(db, S.SENT, S.SUPPRESSED, total=30), WAIT_S, "the sends")
    finally:
        await sender.stop()
    by_address = {
        r.address: r
        for r in await rows(db, select(D.c.address, D.c.status, D.c.reason, D.c.attempts))
    }
    for address in before + after:
        assert (by_address[address].status, by_address[address].reason) == (
            S.SUPPRESSED,
            "opted_out",
        )
    assert by_address[before[0]].attempts == 0 and by_address[after[0]].attempts == 0
    sent, _ = read_send_log(tmp_path / "sends.jsonl")
    assert {r["address"] for r in sent} == set(numbers) - set(before) - set(after)
    await check_accounts(db)


# -- retries, permanent failures, lost answers ---------------------------------------------------


async def test_retries_end_sent_or_given_up_and_permanent_failures_keep_their_code(
    tmp_path: Path, databases: list[Database]
) -> None:
    cfg = load(
        write_config(
            tmp_path,
            recipients=300,
            channel={"retry_rates": {"20429": 0.3}, "failure_rates": {"21211": 0.1}},
            engine={"max_attempts": 3, "backoff_base": "1s", "backoff_max": "4s"},
        )
    )
    db = await open_db(cfg, databases)
    campaign, stage, firing = the_firing(cfg)
    engine = Engine(cfg, db, ScaledClock(firing.at, speed=50.0))
    await engine.start()
    try:
        await engine.fire(campaign, stage, firing)
        await wait_until(
            lambda: settled(db, S.SENT, S.FAILED, total=300), WAIT_S, "every delivery to settle"
        )
    finally:
        await engine.stop()

    attempts: dict[int, list[Any]] = {}
    for a in await rows(db, select(A).order_by(A.c.delivery_id, A.c.number)):
        attempts.setdefault(a.delivery_id, []).append(a)
    deliveries = await rows(
        db, select(D.c.id, D.c.status, D.c.attempts, D.c.error_code, D.c.error_reason)
    )
    kinds: Counter[str] = Counter()
    for d in deliveries:
        tried = attempts[d.id]
        assert [a.number for a in tried] == list(range(1, d.attempts + 1))
        assert all(a.outcome == "retry" and a.error_code == "20429" for a in tried[:-1])
        last = tried[-1]
        if d.status == S.SENT:
            assert last.outcome == "accepted"
            kinds["sent after retries" if d.attempts > 1 else "sent"] += 1
        elif d.error_code == "20429":
            assert d.attempts == 3 and last.outcome == "retry"
            assert d.error_reason.startswith("gave up after 3 attempts")
            kinds["gave up"] += 1
        else:
            assert (d.error_code, last.outcome) == ("21211", "failed")
            assert "21211" in d.error_reason
            kinds["permanent"] += 1
    # The simulator is seeded per delivery, so every kind of path shows up.
    assert set(kinds) == {"sent", "sent after retries", "gave up", "permanent"}, kinds
    await check_accounts(db)


async def test_retry_after_is_a_floor_for_the_next_attempt(
    tmp_path: Path, databases: list[Database]
) -> None:
    cfg = load(
        write_config(
            tmp_path,
            recipients=40,
            channel={"retry_rates": {"20429": 0.5}, "retry_after_s": 30},
            engine={"max_attempts": 4, "backoff_base": "1s", "backoff_max": "2s"},
        )
    )
    db = await open_db(cfg, databases)
    campaign, stage, firing = the_firing(cfg)
    engine = Engine(cfg, db, ScaledClock(firing.at, speed=300.0))
    await engine.start()
    try:
        await engine.fire(campaign, stage, firing)
        await wait_until(
            lambda: settled(db, S.SENT, S.FAILED, total=40), WAIT_S, "every delivery to settle"
        )
    finally:
        await engine.stop()
    tried: dict[int, list[datetime]] = {}
    for delivery_id, started_at in await rows(
        db, select(A.c.delivery_id, A.c.started_at).order_by(A.c.id)
    ):
        tried.setdefault(delivery_id, []).append(started_at)
    gaps = [
        later - earlier for times in tried.values() for earlier, later in itertools.pairwise(times)
    ]
    assert gaps, "some deliveries were retried"
    assert min(gaps) >= timedelta(seconds=30)


async def test_lost_answers_end_unknown_then_are_reconciled_not_resent(
    tmp_path: Path, databases: list[Database]
) -> None:
    cfg = load(
        write_config(
            tmp_path, recipients=100, channel={"ambiguous_rate": 0.2, "log": "sends.jsonl"}
        )
    )
    db = await open_db(cfg, databases)
    engine = Engine(cfg, db, SystemClock())
    await engine.start()
    try:
        campaign, stage, firing = the_firing(cfg)
        await engine.fire(campaign, stage, firing)
        await wait_until(
            lambda: settled(db, S.SENT, total=100), WAIT_S, "lost answers to be reconciled"
        )
    finally:
        await engine.stop()
    deliveries = await rows(db, select(D.c.id, D.c.attempts, D.c.reason, D.c.provider_id))
    reconciled = [d for d in deliveries if d.reason == "reconciled"]
    assert reconciled and all(d.attempts == 1 and d.provider_id for d in reconciled)
    changes = await audit_changes(db)
    assert all(changes[d.id] == ["sending", "unknown", "sent"] for d in reconciled)
    sent, _ = read_send_log(tmp_path / "sends.jsonl")
    assert Counter(r["delivery_id"] for r in sent) == Counter({d.id: 1 for d in deliveries})


async def test_receipts_settle_sent_deliveries_once_and_replays_change_nothing(
    tmp_path: Path, databases: list[Database]
) -> None:
    cfg = load(write_config(tmp_path, recipients=60))
    db = await open_db(cfg, databases)
    engine = Engine(cfg, db, SystemClock())
    await engine.start()
    try:
        campaign, stage, firing = the_firing(cfg)
        await engine.fire(campaign, stage, firing)
        await wait_until(lambda: settled(db, S.SENT, total=60), WAIT_S, "60 sends")
        sent = await rows(db, select(D.c.id, D.c.provider_id).order_by(D.c.id))
        now = datetime.now(UTC)

        def receipt(provider_id: str, status: ReceiptStatus, code: str | None = None) -> Receipt:
            return Receipt(
                channel="sms",
                provider_id=provider_id,
                status=status,
                error_code=code,
                reason="test",
                at=now,
            )

        # Status callbacks arrive concurrently, as HTTP requests do: finals, replays of them,
        # contradicting late ones, intermediate ones and ids nobody sent.
        burst = [
            receipt(d.provider_id, ReceiptStatus.DELIVERED)
            if i % 2 == 0
            else receipt(d.provider_id, ReceiptStatus.UNDELIVERED, "30003")
            for i, d in enumerate(sent)
        ]
        burst += [receipt(d.provider_id, ReceiptStatus.DELIVERED) for d in sent[:10]]
        burst += [receipt(d.provider_id, ReceiptStatus.FAILED, "30008") for d in sent[:10:2]]
        burst += [receipt(d.provider_id, ReceiptStatus.SENT) for d in sent[10:20]]
        burst += [receipt(f"SM-nobody-{i}", ReceiptStatus.DELIVERED) for i in range(5)]
        await asyncio.gather(*(engine.receipt(r) for r in burst))
        await wait_until(
            lambda: settled(db, S.DELIVERED, S.FAILED, total=60), WAIT_S, "the receipts"
        )
    finally:
        await engine.stop()
    final = {
        r.id: r for r in await rows(db, select(D.c.id, D.c.status, D.c.error_code, D.c.final_at))
    }
    for i, d in enumerate(sent):
        expected = (S.DELIVERED, None) if i % 2 == 0 else (S.FAILED, "30003")
        assert (final[d.id].status, final[d.id].error_code) == expected
    changes = await audit_changes(db)
    assert all(changes[d.id] == ["sending", "sent", final[d.id].status] for d in sent)
    await check_accounts(db)


# -- rehearsal: the same engine on simulated time --------------------------------------------------


async def test_an_instant_rehearsal_paces_a_large_blast_as_live_and_nothing_expires(
    tmp_path: Path,
) -> None:
    # 3,000 recipients at 50/s take a minute live, well inside the window and the validity. An
    # instant rehearsal must report the same, however long this machine takes to do the work.
    at = datetime(2010, 9, 1, 9, 0)
    cfg = quiet_hours_config(
        tmp_path,
        at,
        recipients=3000,
        stage={"validity": "2h"},
        channel={"rate": 50, "concurrency": 20},
    )
    result = await rehearse(cfg, database=tmp_path / "rehearsal.db")
    [summary] = result.summaries
    assert summary.by_status == {S.SENT: 3000}
    db = Database.open(f"sqlite:///{tmp_path / 'rehearsal.db'}")
    try:
        sent_at = [t for (t,) in await rows(db, select(D.c.sent_at))]
    finally:
        await db.close()
    fired = at.replace(tzinfo=SHANGHAI)
    span = (max(sent_at) - min(sent_at)).total_seconds()
    assert min(sent_at) >= fired
    assert (3000 - 2 * 50) / 50 <= span <= 3000 / 50 * 1.1  # the rate, in virtual time
    assert sliding_max([t.timestamp() for t in sent_at]) <= 50
    assert result.database == tmp_path / "rehearsal.db"  # kept where asked


async def test_a_rehearsal_leaves_no_throwaway_database_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    cfg = load(
        write_config(
            tmp_path,
            recipients=20,
            at=datetime(2010, 9, 1, 9, 0),
            campaign={"start": date(2010, 8, 31), "end": date(2010, 9, 30)},
        )
    )
    result = await rehearse(cfg)
    assert result.database is None and result.summaries[0].by_status == {S.SENT: 20}
    assert list((tmp_path / "tmp").iterdir()) == []
