"""The simulator channel: seeded outcomes, rates, receipts, send log, reconcile, settings."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dispatcher.channels import registry
from dispatcher.channels.base import (
    ChannelContext,
    OutboundMessage,
    Outcome,
    Receipt,
    ReceiptStatus,
    SendResult,
)
from dispatcher.channels.simulator import UNDELIVERED_CODE, SimulatorChannel, SimulatorSettings
from dispatcher.errors import ChannelError

WAIT_S = 5.0
SINCE = datetime(2010, 8, 31, tzinfo=UTC)


def message(delivery_id: int, address: str = "+8613800138000") -> OutboundMessage:
    return OutboundMessage(
        delivery_id=delivery_id,
        address=address,
        body="抓质量水平提升 促发展方式转变",
        campaign="quality-month-2010",
        stage="opening-blast",
        encoding="UCS-2",
        segments=1,
    )


def simulator(
    tmp_path: Path | None = None,
    sink: Callable[[Receipt], Awaitable[None]] | None = None,
    logger: logging.Logger | None = None,
    **settings: Any,
) -> SimulatorChannel:
    context = ChannelContext(base_dir=tmp_path or Path.cwd())
    if sink is not None:
        context.receipt_sink = sink
    if logger is not None:
        context.logger = logger
    return SimulatorChannel("sim", SimulatorSettings.model_validate(settings), context)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def summary(result: SendResult) -> tuple[Outcome, str | None, str | None]:
    return result.outcome, result.provider_id, result.error_code


def test_registry_finds_the_simulator() -> None:
    assert registry.load("simulator") is SimulatorChannel


MIXED: dict[str, Any] = {
    "failure_rates": {"21211": 0.1},
    "retry_rates": {"429": 0.2},
    "ambiguous_rate": 0.1,
    "latency_ms": 1,
    "latency_jitter_ms": 1,
    "receipts": False,
    "seed": 42,
}


async def two_attempts_each(
    channel: SimulatorChannel, ids: list[int], concurrent: bool
) -> dict[int, list[tuple[Outcome, str | None, str | None]]]:
    """Send every delivery twice (attempts 0 and 1) and collect what each attempt got."""
    outcomes: dict[int, list[tuple[Outcome, str | None, str | None]]] = {i: [] for i in ids}

    async def one(delivery_id: int) -> None:
        for _ in range(2):
            outcomes[delivery_id].append(summary(await channel.send(message(delivery_id))))

    if concurrent:
        await asyncio.gather(*(one(i) for i in ids))
    else:
        for i in ids:
            await one(i)
    return outcomes


async def test_outcomes_depend_on_seed_and_delivery_not_on_order_or_concurrency() -> None:
    ids = list(range(1, 201))
    shuffled = ids.copy()
    random.Random(7).shuffle(shuffled)

    in_order = await two_attempts_each(simulator(**MIXED), ids, concurrent=False)
    concurrently = await two_attempts_each(simulator(**MIXED), shuffled, concurrent=True)
    other_seed = await two_attempts_each(simulator(**{**MIXED, "seed": 43}), ids, concurrent=False)

    assert concurrently == in_order
    assert other_seed != in_order
    kinds = Counter(attempts[0][0] for attempts in in_order.values())
    assert set(kinds) == {Outcome.ACCEPTED, Outcome.FAILED, Outcome.RETRY, Outcome.AMBIGUOUS}
    # A retry is a new attempt with its own dice, not a replay of the first answer.
    assert any(first != second for first, second in in_order.values())


async def test_rates_over_ten_thousand_sends() -> None:
    statuses: Counter[ReceiptStatus] = Counter()

    async def sink(receipt: Receipt) -> None:
        statuses[receipt.status] += 1

    channel = simulator(
        sink=sink,
        failure_rates={"21211": 0.05, "21610": 0.01},
        retry_rates={"429": 0.1},
        ambiguous_rate=0.02,
        undelivered_rate=0.1,
        seed=2010,
    )
    codes: Counter[tuple[Outcome, str | None]] = Counter()
    for delivery_id in range(1, 10_001):
        result = await channel.send(message(delivery_id))
        codes[result.outcome, result.error_code] += 1
    sent = channel.accepted + channel.ambiguous
    await wait_until(lambda: channel.receipts_delivered == sent, "every receipt")
    await channel.close()

    # Bounds are about five standard deviations wide; the seed makes the counts fixed.
    assert 390 <= codes[Outcome.FAILED, "21211"] <= 610
    assert 50 <= codes[Outcome.FAILED, "21610"] <= 150
    assert 850 <= codes[Outcome.RETRY, "429"] <= 1150
    assert 130 <= codes[Outcome.AMBIGUOUS, "TIMEOUT"] <= 270
    assert 8000 <= codes[Outcome.ACCEPTED, None] <= 8400
    assert channel.failed == codes[Outcome.FAILED, "21211"] + codes[Outcome.FAILED, "21610"]
    assert channel.retried == codes[Outcome.RETRY, "429"]
    assert channel.accepted == codes[Outcome.ACCEPTED, None]
    assert channel.accepted + channel.failed + channel.retried + channel.ambiguous == 10_000
    assert channel.sent_count == sent
    assert statuses[ReceiptStatus.DELIVERED] + statuses[ReceiptStatus.UNDELIVERED] == sent
    assert 0.085 <= statuses[ReceiptStatus.UNDELIVERED] / sent <= 0.115


async def test_zero_latency_never_suspends() -> None:
    channel = simulator(receipts=False)
    coroutine = channel.send(message(1))
    # Driving the coroutine by hand: StopIteration on the first step means it never awaited.
    with pytest.raises(StopIteration) as finished:
        coroutine.send(None)
    result = finished.value.value
    assert isinstance(result, SendResult)
    assert result.outcome is Outcome.ACCEPTED


async def test_latency_is_waited() -> None:
    channel = simulator(latency_ms=50, receipts=False)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await channel.send(message(1))
    assert loop.time() - started >= 0.049


async def test_each_outcome_carries_its_code_and_counter() -> None:
    failing = simulator(failure_rates={"21211": 1.0})
    result = await failing.send(message(1))
    assert (result.outcome, result.error_code) == (Outcome.FAILED, "21211")
    assert result.reason is not None and "21211" in result.reason
    assert failing.failed == 1 and failing.sent_count == 0

    throttled = simulator(retry_rates={"429": 1.0}, retry_after_s=7)
    result = await throttled.send(message(1))
    assert (result.outcome, result.error_code, result.retry_after) == (Outcome.RETRY, "429", 7)
    assert throttled.retried == 1 and throttled.sent_count == 0

    accepting = simulator(receipts=False)
    result = await accepting.send(message(1))
    assert result.outcome is Outcome.ACCEPTED
    assert result.provider_id is not None
    assert result.provider_id.startswith("SM") and len(result.provider_id) == 34
    int(result.provider_id[2:], 16)
    assert result.expects_receipt is False
    assert accepting.accepted == 1


async def test_retries_get_fresh_dice_until_accepted() -> None:
    channel = simulator(retry_rates={"503": 0.5}, receipts=False, seed=3)
    outcomes = []
    for _ in range(50):
        result = await channel.send(message(9))
        outcomes.append(result.outcome)
        if result.outcome is Outcome.ACCEPTED:
            break
    assert outcomes[-1] is Outcome.ACCEPTED
    assert channel.retried == len(outcomes) - 1


async def test_lost_answer_is_sent_and_reconciles() -> None:
    channel = simulator(ambiguous_rate=1.0, receipts=False)
    result = await channel.send(message(5))
    assert result.outcome is Outcome.AMBIGUOUS
    assert channel.ambiguous == 1 and channel.sent_count == 1

    reconciled = await channel.reconcile(message(5), since=SINCE)
    assert reconciled is not None
    assert reconciled.outcome is Outcome.ACCEPTED
    assert reconciled.provider_id is not None and reconciled.provider_id.startswith("SM")

    # No record is no proof (a simulator in a dead process may have sent it): cannot tell.
    assert await channel.reconcile(message(6), since=SINCE) is None


async def test_sending_a_delivery_again_is_counted_as_duplicate() -> None:
    channel = simulator(receipts=False)
    first = await channel.send(message(5))
    again = await channel.send(message(5))
    assert first.outcome is again.outcome is Outcome.ACCEPTED
    assert channel.duplicates == 1
    assert channel.sent_count == 1
    reconciled = await channel.reconcile(message(5), since=SINCE)
    assert reconciled is not None and reconciled.provider_id == first.provider_id


async def test_receipts_arrive_through_the_sink_after_the_delay() -> None:
    received: asyncio.Queue[tuple[float, Receipt]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def sink(receipt: Receipt) -> None:
        await received.put((loop.time(), receipt))

    channel = simulator(sink=sink, receipt_delay_ms=20)
    sent_at = loop.time()
    result = await channel.send(message(1))
    assert result.expects_receipt is True
    arrived_at, receipt = await asyncio.wait_for(received.get(), WAIT_S)
    await channel.close()

    assert arrived_at - sent_at >= 0.019
    assert receipt.channel == "sim"
    assert receipt.provider_id == result.provider_id
    assert receipt.status is ReceiptStatus.DELIVERED
    assert receipt.error_code is None
    assert receipt.at is not None


async def test_undelivered_receipts_carry_the_carrier_code() -> None:
    received: asyncio.Queue[Receipt] = asyncio.Queue()
    channel = simulator(sink=received.put, undelivered_rate=1.0)
    result = await channel.send(message(1))
    receipt = await asyncio.wait_for(received.get(), WAIT_S)
    await channel.close()
    assert receipt.provider_id == result.provider_id
    assert receipt.status is ReceiptStatus.UNDELIVERED
    assert receipt.error_code == UNDELIVERED_CODE == "30003"


async def test_lost_answers_still_get_their_receipt() -> None:
    received: asyncio.Queue[Receipt] = asyncio.Queue()
    channel = simulator(sink=received.put, ambiguous_rate=1.0)
    await channel.send(message(1))
    receipt = await asyncio.wait_for(received.get(), WAIT_S)
    reconciled = await channel.reconcile(message(1), since=SINCE)
    await channel.close()
    assert reconciled is not None and receipt.provider_id == reconciled.provider_id


async def test_no_receipts_when_disabled() -> None:
    received: list[Receipt] = []

    async def sink(receipt: Receipt) -> None:
        received.append(receipt)

    channel = simulator(sink=sink, receipts=False)
    await channel.send(message(1))
    assert channel.pending_receipts == 0
    await channel.close()
    assert received == []


async def test_close_drops_receipts_not_yet_due() -> None:
    received: list[Receipt] = []

    async def sink(receipt: Receipt) -> None:
        received.append(receipt)

    channel = simulator(sink=sink, receipt_delay_ms=60_000)
    for delivery_id in range(1, 6):
        await channel.send(message(delivery_id))
    assert channel.pending_receipts == 5
    await channel.close()
    assert channel.pending_receipts == 0
    assert received == []
    await channel.send(message(6))  # a late send after close schedules nothing
    assert channel.pending_receipts == 0


async def test_close_lets_a_receipt_in_the_sink_finish() -> None:
    entered = asyncio.Event()
    release = asyncio.Event()
    finished: list[str] = []

    async def slow_sink(receipt: Receipt) -> None:
        entered.set()
        await release.wait()
        finished.append(receipt.provider_id)

    channel = simulator(sink=slow_sink)
    result = await channel.send(message(1))
    await asyncio.wait_for(entered.wait(), WAIT_S)
    closing = asyncio.create_task(channel.close())
    release.set()
    await asyncio.wait_for(closing, WAIT_S)
    assert finished == [result.provider_id]
    assert channel.receipts_delivered == 1


async def test_a_failing_sink_does_not_stop_later_receipts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    received: list[str] = []

    async def sink(receipt: Receipt) -> None:
        if not received:
            received.append("boom")
            raise RuntimeError("database is locked")
        received.append(receipt.provider_id)

    logger = logging.getLogger("test.simulator.sink")
    channel = simulator(sink=sink, logger=logger)
    await channel.send(message(1))
    second = await channel.send(message(2))
    with caplog.at_level(logging.ERROR, logger=logger.name):
        await wait_until(lambda: len(received) == 2, "the second receipt")
    await channel.close()
    assert received == ["boom", second.provider_id]
    assert channel.receipts_delivered == 1
    assert any("receipt sink failed" in r.getMessage() for r in caplog.records)


async def test_send_log_has_one_line_per_sent_message(tmp_path: Path) -> None:
    channel = simulator(
        tmp_path,
        log="logs/sim.jsonl",
        failure_rates={"21211": 0.3},
        ambiguous_rate=0.2,
        receipts=False,
        seed=5,
    )
    await channel.start()
    results = {i: await channel.send(message(i, f"+86138{i:08d}")) for i in range(1, 51)}
    log_path = tmp_path / "logs" / "sim.jsonl"
    sent = channel.accepted + channel.ambiguous

    def lines() -> list[str]:
        return log_path.read_text("utf-8").splitlines() if log_path.exists() else []

    # Flushed by the periodic writer, before close.
    await wait_until(lambda: len(lines()) == sent, "the send log flush")
    await channel.close()

    records = [json.loads(line) for line in lines()]
    assert len(records) == sent
    assert channel.failed > 0 and channel.ambiguous > 0
    by_delivery = {r["delivery_id"]: r for r in records}
    assert set(by_delivery) == {
        i for i, r in results.items() if r.outcome in (Outcome.ACCEPTED, Outcome.AMBIGUOUS)
    }
    reconciled = await channel.reconcile(message(records[0]["delivery_id"]), since=SINCE)
    assert reconciled is not None and reconciled.provider_id == records[0]["id"]
    for record in records:
        assert set(record) == {"t", "id", "address", "delivery_id", "segments"}
        assert isinstance(record["t"], float)
        assert record["address"] == f"+86138{record['delivery_id']:08d}"
        assert record["segments"] == 1
        outcome = results[record["delivery_id"]]
        if outcome.outcome is Outcome.ACCEPTED:
            assert record["id"] == outcome.provider_id


async def test_send_log_is_flushed_on_close(tmp_path: Path) -> None:
    channel = simulator(tmp_path, log="sim.jsonl", receipts=False)
    await channel.start()
    await channel.send(message(1))
    await channel.close()
    assert len((tmp_path / "sim.jsonl").read_text("utf-8").splitlines()) == 1


async def test_send_log_that_cannot_be_opened_is_a_channel_error(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a directory should be")
    channel = simulator(tmp_path, log="blocker/sim.jsonl")
    with pytest.raises(ChannelError, match="blocker"):
        await channel.start()


async def test_send_before_start_with_a_log_is_refused(tmp_path: Path) -> None:
    channel = simulator(tmp_path, log="sim.jsonl")
    with pytest.raises(RuntimeError, match="start"):
        await channel.send(message(1))


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"failure_rates": {"21211": 1.5}}, "between 0 and 1"),
        ({"retry_rates": {"429": -0.1}}, "between 0 and 1"),
        ({"ambiguous_rate": 2}, "between 0 and 1"),
        ({"undelivered_rate": float("nan")}, "between 0 and 1"),
        (
            {"failure_rates": {"21211": 0.6}, "retry_rates": {"429": 0.3}, "ambiguous_rate": 0.2},
            "add up to 1.1",
        ),
        (
            {"failure_rates": {"429": 0.1}, "retry_rates": {"429": 0.1}},
            "both failure_rates and retry_rates",
        ),
        ({"failure_rates": {" ": 0.1}}, "must not be empty"),
        ({"latency_ms": -1}, "greater than or equal to 0"),
        ({"log": ""}, "file path"),
        ({"latency": 5}, "Extra inputs are not permitted"),
    ],
)
def test_settings_are_validated(settings: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        SimulatorSettings.model_validate(settings)


def test_rates_summing_to_one_are_fine() -> None:
    settings = SimulatorSettings.model_validate(
        {"failure_rates": {"21211": 0.7}, "retry_rates": {"429": 0.2}, "ambiguous_rate": 0.1}
    )
    assert settings.ambiguous_rate == 0.1
