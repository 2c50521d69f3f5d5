"""The `twilio` channel, through the official SDK, against a Twilio-compatible server on 127.0.0.1.

Every error class of docs/channels/twilio.md is produced by the far side (the fake in
tests/peers/twilio_server.py) and classified end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from twilio.request_validator import RequestValidator

from dispatcher.channels.base import ChannelContext, OutboundMessage, Outcome, ReceiptStatus
from dispatcher.channels.twilio_sms import (
    RECONCILE_MAX_RECORDS,
    TwilioChannel,
    TwilioSettings,
    receipt_from_callback,
)
from tests.peers.twilio_server import FaultRates, TwilioServer

SID = "AC" + "0123456789abcdef" * 2
TOKEN = "test-auth-token-7f3a9c"
SENDER = "+15005550006"
SERVICE = "MG" + "fedcba9876543210" * 2
PUBLIC_URL = "http://127.0.0.1:9/hooks"  # only used to build StatusCallback; never contacted
REPO = Path(__file__).resolve().parents[2]


def message(
    delivery_id: int,
    address: str,
    body: str = "质量月: 抓质量水平提升 促发展方式转变",
    **extra: Any,
) -> OutboundMessage:
    return OutboundMessage(delivery_id, address, body, "quality-month", "blast", **extra)


def number(i: int) -> str:
    return f"+86138{i:08d}"


async def wait_until(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    """Poll `predicate` until it holds; fail after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def server() -> AsyncIterator[TwilioServer]:
    async with TwilioServer(accounts={SID: TOKEN}, seed=7) as srv:
        yield srv


@contextlib.asynccontextmanager
async def open_channel(
    api_base: str, *, public_url: str | None = PUBLIC_URL, **overrides: Any
) -> AsyncIterator[TwilioChannel]:
    raw: dict[str, Any] = {"account_sid": SID, "auth_token": TOKEN, "api_base": api_base}
    if "messaging_service_sid" not in overrides:
        raw["from"] = SENDER
    raw.update(overrides)
    settings = TwilioSettings.model_validate(raw)
    channel = TwilioChannel("twilio", settings, ChannelContext(public_url=public_url))
    await channel.start()
    try:
        yield channel
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def callback_receiver(
    handler: Callable[[web.Request], Any],
) -> AsyncIterator[str]:
    """Serve `handler` at /twilio/status on a free port; yield the public_url to configure."""
    app = web.Application()
    app.router.add_post("/twilio/status", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


# -- accepted --------------------------------------------------------------------------------


async def test_accepted_message_reaches_twilio_with_every_field(server: TwilioServer) -> None:
    valid_until = datetime.now(UTC) + timedelta(hours=2)
    async with open_channel(server.base_url) as channel:
        result = await channel.send(message(1, number(1), valid_until=valid_until))

    assert result.outcome is Outcome.ACCEPTED
    assert result.expects_receipt is True
    [got] = server.messages
    assert result.provider_id == got.sid
    assert got.sid.startswith("SM") and len(got.sid) == 34
    assert got.auth_user == SID  # HTTP Basic auth with the account SID and token
    assert (got.to, got.from_, got.messaging_service_sid) == (number(1), SENDER, None)
    assert got.body == "质量月: 抓质量水平提升 促发展方式转变"
    assert got.status_callback == PUBLIC_URL + "/twilio/status"
    assert got.validity_period is not None
    assert 7190 <= int(got.validity_period) <= 7200


async def test_messaging_service_without_callback_or_validity(server: TwilioServer) -> None:
    async with open_channel(
        server.base_url, messaging_service_sid=SERVICE, status_callback=False
    ) as channel:
        result = await channel.send(message(2, number(2)))

    assert result.outcome is Outcome.ACCEPTED
    assert result.expects_receipt is False
    [got] = server.messages
    assert (got.from_, got.messaging_service_sid) == (None, SERVICE)
    assert got.status_callback is None
    assert got.validity_period is None


async def test_no_public_url_means_no_callback_and_no_receipt_expected(
    server: TwilioServer,
) -> None:
    async with open_channel(server.base_url, public_url=None) as channel:
        result = await channel.send(message(3, number(3)))
    assert result.outcome is Outcome.ACCEPTED
    assert result.expects_receipt is False
    assert server.messages[0].status_callback is None


# -- errors from Twilio ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (21211, Outcome.FAILED),
        (21614, Outcome.FAILED),
        (21408, Outcome.FAILED),
        (21610, Outcome.OPTED_OUT),
    ],
)
async def test_programmed_number_errors(server: TwilioServer, code: int, outcome: Outcome) -> None:
    server.program_error(number(10), code, 400)
    async with open_channel(server.base_url) as channel:
        result = await channel.send(message(10, number(10)))
    assert result.outcome is outcome
    assert result.error_code == str(code)
    assert result.reason
    assert number(10) not in result.reason  # Twilio's text may quote the number: masked
    assert server.messages == []


async def test_server_error_retries(server: TwilioServer) -> None:
    server.rates = FaultRates(server_error=1.0)
    async with open_channel(server.base_url) as channel:
        result = await channel.send(message(11, number(11)))
    assert result.outcome is Outcome.RETRY
    assert result.error_code == "20500"
    assert server.messages == []


@pytest.mark.parametrize("header", ["seconds", "http-date"])
async def test_throttled_retries_after_retry_after(server: TwilioServer, header: str) -> None:
    server.program_fault(number(12), "throttle")
    if header == "seconds":
        server.retry_after = "17"
    else:
        server.retry_after = format_datetime(datetime.now(UTC) + timedelta(seconds=120), True)
    async with open_channel(server.base_url) as channel:
        result = await channel.send(message(12, number(12)))
    assert result.outcome is Outcome.RETRY
    assert result.error_code == "20429"
    assert result.retry_after is not None
    if header == "seconds":
        assert result.retry_after == 17.0
    else:
        assert 100 <= result.retry_after <= 121


async def test_wrong_token_retries_without_leaking_it(
    server: TwilioServer, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-token-do-not-log-9d2e"
    caplog.set_level(logging.DEBUG)
    async with open_channel(server.base_url, auth_token=wrong) as channel:
        first = await channel.send(message(13, number(13)))
        second = await channel.send(message(14, number(14)))
    for result in (first, second):
        assert result.outcome is Outcome.RETRY
        assert result.error_code == "20003"
        assert result.retry_after == 60.0
        assert "auth_token" in (result.reason or "")
        assert wrong not in repr(result)
    assert wrong not in caplog.text
    assert number(13) not in caplog.text
    refusals = [r for r in caplog.records if "refuses the credentials" in r.getMessage()]
    assert len(refusals) == 1  # one warning, not one per message
    assert server.stats["unauthorized"] == 2
    assert server.messages == []


# -- transport faults ------------------------------------------------------------------------


async def test_reset_before_taking_the_message_is_ambiguous(server: TwilioServer) -> None:
    server.program_fault(number(20), "reset")
    async with open_channel(server.base_url) as channel:
        result = await channel.send(message(20, number(20)))
        # The provider did not take it: reconcile says sending again is safe.
        settled = await channel.reconcile(message(20, number(20)), datetime.now(UTC))
    assert result.outcome is Outcome.AMBIGUOUS
    assert result.error_code == "connection-lost"
    assert server.messages == []
    assert settled is not None
    assert settled.outcome is Outcome.RETRY
    assert settled.reason == "not found at provider"


async def test_reset_after_taking_the_message_is_ambiguous_then_reconciled(
    server: TwilioServer,
) -> None:
    server.program_fault(number(21), "reset_after_accept")
    since = datetime.now(UTC)
    async with open_channel(server.base_url) as channel:
        result = await channel.send(message(21, number(21)))
        settled = await channel.reconcile(message(21, number(21)), since)
    assert result.outcome is Outcome.AMBIGUOUS
    [got] = server.messages
    assert settled is not None
    assert settled.outcome is Outcome.ACCEPTED
    assert settled.provider_id == got.sid
    assert settled.expects_receipt is True  # still queued at the provider


async def test_answer_later_than_timeout_is_ambiguous(server: TwilioServer) -> None:
    server.program_fault(number(22), "hang")
    async with open_channel(server.base_url, timeout_s=0.3) as channel:
        started = time.monotonic()
        result = await channel.send(message(22, number(22)))
        elapsed = time.monotonic() - started
    assert result.outcome is Outcome.AMBIGUOUS
    assert result.error_code == "timeout"
    assert elapsed < 5  # the channel's timeout, not the server's 30 s hold
    assert len(server.messages) == 1


async def test_server_down_retries() -> None:
    # A bound socket that does not listen: every connection attempt is refused.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        async with open_channel(f"http://127.0.0.1:{port}") as channel:
            result = await channel.send(message(23, number(23)))
            settled = await channel.reconcile(message(23, number(23)), datetime.now(UTC))
    assert result.outcome is Outcome.RETRY
    assert result.error_code == "connect-error"
    assert settled is None  # the lookup failed: cannot tell


# -- reconcile -------------------------------------------------------------------------------


async def test_reconcile_finds_what_was_sent_and_not_what_was_not(server: TwilioServer) -> None:
    since = datetime.now(UTC)
    async with open_channel(server.base_url) as channel:
        sent = await channel.send(message(30, number(30), body="第一条"))
        found = await channel.reconcile(message(30, number(30), body="第一条"), since)
        other_body = await channel.reconcile(message(31, number(30), body="第二条"), since)
        never = await channel.reconcile(message(32, number(32), body="第一条"), since)
        too_late = await channel.reconcile(
            message(30, number(30), body="第一条"), since + timedelta(hours=1)
        )
    assert found is not None and found.outcome is Outcome.ACCEPTED
    assert found.provider_id == sent.provider_id
    for result in (other_body, never, too_late):
        assert result is not None
        assert result.outcome is Outcome.RETRY
        assert result.reason == "not found at provider"


async def test_reconcile_reads_every_page(server: TwilioServer) -> None:
    since = datetime.now(UTC)
    async with open_channel(server.base_url) as channel:
        first = await channel.send(message(40, number(40), body="body 0"))
        await asyncio.gather(
            *(channel.send(message(41, number(40), body=f"body {i}")) for i in range(1, 250))
        )
        found = await channel.reconcile(message(40, number(40), body="body 0"), since)
    assert found is not None
    assert found.provider_id == first.provider_id  # the oldest: on the last page


async def test_reconcile_cannot_tell_when_the_list_is_too_long(server: TwilioServer) -> None:
    since = datetime.now(UTC)
    async with open_channel(server.base_url, max_connections=50) as channel:
        results = await asyncio.gather(
            *(
                channel.send(message(50, number(50), body=f"slogan {i}"))
                for i in range(RECONCILE_MAX_RECORDS + 1)
            )
        )
        assert all(r.outcome is Outcome.ACCEPTED for r in results)
        verdict = await channel.reconcile(message(51, number(50), body="absent"), since)
    assert verdict is None


async def test_reconcile_with_wrong_credentials_cannot_tell(server: TwilioServer) -> None:
    async with open_channel(server.base_url, auth_token="nope") as channel:
        verdict = await channel.reconcile(message(52, number(52)), datetime.now(UTC))
    assert verdict is None


async def test_reconcile_counts_a_message_failed_at_twilio_as_taken(server: TwilioServer) -> None:
    server.callbacks = True
    server.program_delivery(number(53), "failed", 30008)
    receiver_hits: list[str] = []

    async def receive(request: web.Request) -> web.Response:
        receiver_hits.append(str((await request.post())["MessageStatus"]))
        return web.Response(status=204)

    since = datetime.now(UTC)
    async with (
        callback_receiver(receive) as public_url,
        open_channel(server.base_url, public_url=public_url) as channel,
    ):
        await channel.send(message(53, number(53)))
        await wait_until(lambda: receiver_hits == ["sent", "failed"])
        verdict = await channel.reconcile(message(53, number(53)), since)
    # Twilio took it (then failed it): it must never be sent again, and no receipt will come.
    assert verdict is not None
    assert verdict.outcome is Outcome.ACCEPTED
    assert verdict.provider_id == server.messages[0].sid
    assert verdict.expects_receipt is False


# -- status callbacks ------------------------------------------------------------------------


async def test_status_callbacks_arrive_signed_like_twilio(server: TwilioServer) -> None:
    server.callbacks = True
    server.callback_delay_ms = 20
    server.program_delivery(number(61), "undelivered", 30003)
    received: list[tuple[str, dict[str, str], str]] = []

    async def receive(request: web.Request) -> web.Response:
        form = await request.post()
        params = {k: str(v) for k, v in form.items()}
        received.append((str(request.url), params, request.headers["X-Twilio-Signature"]))
        return web.Response(status=204)

    async with (
        callback_receiver(receive) as public_url,
        open_channel(server.base_url, public_url=public_url) as channel,
    ):
        ok = await channel.send(message(60, number(60)))
        bad = await channel.send(message(61, number(61)))
        await wait_until(lambda: len(received) == 4)
        assert ok.expects_receipt and bad.expects_receipt
        validator = RequestValidator(TOKEN)
        for url, params, signature in received:
            assert url == channel.status_callback_url
            assert validator.validate(url, params, signature) is True
            assert channel.verify_callback(url, params, signature) is True
            assert (params["AccountSid"], params["ApiVersion"]) == (SID, "2010-04-01")
            assert params["From"] == SENDER
            forged = "failed" if params["MessageStatus"] == "delivered" else "delivered"
            tampered = dict(params, MessageStatus=forged)
            assert channel.verify_callback(url, tampered, signature) is False

    finals = {
        p["MessageSid"]: receipt_from_callback("twilio", p)
        for _, p, _ in received
        if p["MessageStatus"] != "sent"
    }
    delivered, undelivered = finals[ok.provider_id or ""], finals[bad.provider_id or ""]
    assert delivered is not None and delivered.status is ReceiptStatus.DELIVERED
    assert undelivered is not None and undelivered.status is ReceiptStatus.UNDELIVERED
    assert undelivered.error_code == "30003"
    assert all(c.response_status == 204 for c in server.callbacks_sent)


# -- the fake as a subprocess ----------------------------------------------------------------


async def test_server_runs_as_a_subprocess_and_records_jsonl(tmp_path: Path) -> None:
    record = tmp_path / "sent.jsonl"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.peers.twilio_server",
        "--port",
        "0",
        "--account",
        f"{SID}:{TOKEN}",
        "--latency-ms",
        "5",
        "--print-port",
        "--record",
        str(record),
        "--error",
        f"{number(71)}=21614",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        port = int(line)
        async with open_channel(f"http://127.0.0.1:{port}") as channel:
            ok = await channel.send(message(70, number(70)))
            bad = await channel.send(message(71, number(71)))
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=20)
    assert ok.outcome is Outcome.ACCEPTED
    assert bad.outcome is Outcome.FAILED and bad.error_code == "21614"
    lines = [json.loads(x) for x in record.read_text(encoding="utf-8").splitlines()]
    assert [(x["sid"], x["to"], x["status"]) for x in lines] == [
        (ok.provider_id, number(70), "queued")
    ]


# -- throughput (measured, not asserted) -----------------------------------------------------


async def test_throughput_against_the_fake(server: TwilioServer) -> None:
    total, concurrency = 5_000, 100
    async with open_channel(server.base_url, max_connections=concurrency) as channel:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(total):
            queue.put_nowait(i)
        outcomes: list[Outcome] = []

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                outcomes.append((await channel.send(message(i, number(100_000 + i)))).outcome)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started

    assert outcomes.count(Outcome.ACCEPTED) == total
    assert len(server.messages) == total
    assert server.duplicates() == {}
    rate = total / elapsed
    print(
        f"\ntwilio channel: {total} sends in {elapsed:.2f}s = {rate:,.0f} sends/s "
        f"(concurrency {concurrency}, zero latency, in-process fake)"
    )
