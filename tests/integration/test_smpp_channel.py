"""SmppChannel against a fake SMSC on 127.0.0.1: bind, text, UDH, DLRs, errors, reconnects, MO."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from dispatcher.channels.base import (
    ChannelContext,
    OutboundMessage,
    Outcome,
    Receipt,
    ReceiptStatus,
)
from dispatcher.channels.registry import load
from dispatcher.channels.smpp import SmppChannel, SmppSettings
from dispatcher.errors import ChannelError
from dispatcher.sms import analyse
from tests.peers.smsc_server import FakeSmsc, ReceiptPlan

NUMBER = "+8613800138000"
MASKED = "+86138****8000"
SLOGANS = (
    "抓质量水平提升，促发展方式转变；夯实质量安全基础，促进经济又好又快发展；"
    "夯实质量安全基础，促进经济社会和谐发展；全员全过程全方位参与，全面提高质量安全水平；"
    "质量诚信是企业的信誉和生命；恪守质量诚信，践行社会责任；质量关系你我他，涉及个人与国家；"
    "提高可靠性，质量上台阶；创造高质量，奉献高质量，享受高质量；抓质量，讲诚信，树品牌。"
)
SLOGAN_150 = ("【质量月】" + SLOGANS)[:150]

ChannelFactory = Callable[..., Awaitable[SmppChannel]]


@pytest.fixture
async def smsc() -> AsyncIterator[FakeSmsc]:
    server = FakeSmsc()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def receipts() -> list[Receipt]:
    return []


@pytest.fixture
async def make_channel(smsc: FakeSmsc, receipts: list[Receipt]) -> AsyncIterator[ChannelFactory]:
    """Build, start (unless told not to) and finally close SmppChannels aimed at `smsc`."""
    channels: list[SmppChannel] = []

    async def sink(receipt: Receipt) -> None:
        receipts.append(receipt)

    async def make(start: bool = True, **overrides: Any) -> SmppChannel:
        settings = {
            "host": "127.0.0.1",
            "port": smsc.port,
            "system_id": "dispatcher",
            "password": "s3cret",
            "source_addr": "CNQuality",
            "response_timeout_s": 2.0,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.2,
        } | overrides
        channel = SmppChannel(
            "sms-gw",
            SmppSettings.model_validate(settings),
            ChannelContext(receipt_sink=sink, logger=logging.getLogger("test.smpp")),
        )
        channels.append(channel)
        if start:
            await channel.start()
        return channel

    yield make
    for channel in channels:
        await channel.close()


def message(body: str, address: str = NUMBER, **extra: Any) -> OutboundMessage:
    return OutboundMessage(
        delivery_id=1, address=address, body=body, campaign="qm2010", stage="blast", **extra
    )


async def test_registered_under_smpp_entry_point() -> None:
    assert load("smpp") is SmppChannel


async def test_bind_succeeds_and_close_unbinds(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    channel = await make_channel()
    assert channel.bound
    assert smsc.binds == 1
    await channel.close()
    assert smsc.unbinds == 1
    assert not channel.bound


async def test_bad_password_fails_start_with_a_clear_message(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    channel = await make_channel(start=False, password="wrong")
    with pytest.raises(ChannelError) as caught:
        await channel.start()
    text = str(caught.value)
    assert "ESME_RINVPASWD" in text
    assert "'dispatcher'" in text
    assert "channels.sms-gw" in text
    assert "wrong" not in text
    assert smsc.bind_failures == 1


async def test_transient_bind_refusal_does_not_fail_start(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    smsc.refuse_binds = 0x08  # ESME_RSYSERR: the SMSC is having a bad moment
    channel = await make_channel()
    assert not channel.bound
    result = await channel.send(message("hello"))
    assert (result.outcome, result.error_code) == (Outcome.RETRY, "NOT_BOUND")
    smsc.refuse_binds = None
    await smsc.eventually(lambda: channel.bound, what="the background bind")
    assert (await channel.send(message("hello"))).outcome is Outcome.ACCEPTED


async def test_unreachable_smsc_answers_retry_then_binds_in_background(
    make_channel: ChannelFactory,
) -> None:
    late = FakeSmsc()
    port = await late.start()
    await late.stop()  # the port is free again: connections are refused
    channel = await make_channel(port=port)
    assert not channel.bound
    result = await channel.send(message("hello"))
    assert result.outcome is Outcome.RETRY
    assert result.error_code == "NOT_BOUND"
    assert "cannot connect" in (result.reason or "")
    await late.start(port)
    try:
        await late.eventually(lambda: channel.bound, what="the background bind")
        assert (await channel.send(message("hello"))).outcome is Outcome.ACCEPTED
    finally:
        await channel.close()
        await late.stop()


async def test_chinese_slogan_goes_as_three_ucs2_parts_with_one_udh_reference(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    assert len(SLOGAN_150) == 150
    channel = await make_channel()
    result = await channel.send(message(SLOGAN_150))
    assert result.outcome is Outcome.ACCEPTED
    assert result.expects_receipt
    assert len(smsc.submits) == 3 == analyse(SLOGAN_150).segments
    udhs = [submit.udh or b"" for submit in smsc.submits]
    assert all(udh[:3] == b"\x05\x00\x03" for udh in udhs)
    assert len({udh[3] for udh in udhs}) == 1  # one reference for the whole message
    assert [udh[4:] for udh in udhs] == [b"\x03\x01", b"\x03\x02", b"\x03\x03"]
    for submit in smsc.submits:
        assert (submit.data_coding, submit.esm_class) == (8, 0x40)
        assert len(submit.short_message) <= 140
        assert (submit.destination, submit.dest_ton, submit.dest_npi) == (NUMBER[1:], 1, 1)
        assert (submit.source_addr, submit.source_ton, submit.source_npi) == ("CNQuality", 5, 0)
    assert [len(submit.text) for submit in smsc.submits] == [67, 67, 16]
    assert [m.text for m in smsc.messages] == [SLOGAN_150]
    assert result.provider_id == smsc.submits[0].message_id


async def test_consecutive_long_messages_use_different_references(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    channel = await make_channel()
    for _ in range(2):
        assert (await channel.send(message(SLOGAN_150))).outcome is Outcome.ACCEPTED
    assert [m.text for m in smsc.messages] == [SLOGAN_150, SLOGAN_150]
    assert smsc.messages[0].reference != smsc.messages[1].reference


async def test_gsm_text_goes_as_data_coding_0_in_one_part(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    channel = await make_channel()
    text = "Quality Month starts 1 Sept: {quality} costs 5€ [info] @ 12315"
    result = await channel.send(message(text))
    assert result.outcome is Outcome.ACCEPTED
    (submit,) = smsc.submits
    assert (submit.data_coding, submit.esm_class, submit.udh) == (0, 0, None)
    assert submit.text == text
    # Each extension character ({ } € [ ]) is an escape pair: 2 octets unpacked.
    assert len(submit.short_message) == len(text) + 5
    assert submit.registered_delivery == 1


async def test_long_gsm_text_splits_in_153_septet_parts(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    channel = await make_channel()
    text = "Quality is the life of an enterprise. " * 8  # 304 septets
    result = await channel.send(message(text))
    assert result.outcome is Outcome.ACCEPTED
    assert [len(s.short_message) for s in smsc.submits] == [6 + 153, 6 + 151]
    assert all(s.data_coding == 0 and s.esm_class == 0x40 for s in smsc.submits)
    assert [m.text for m in smsc.messages] == [text]


async def test_numeric_source_and_validity_period(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    channel = await make_channel(source_addr="+8610690000", registered_delivery=False)
    until = datetime(2010, 10, 1, 15, 59, 59, tzinfo=timezone(timedelta(hours=8)))
    result = await channel.send(message("hello", valid_until=until))
    assert result.outcome is Outcome.ACCEPTED
    assert not result.expects_receipt
    (submit,) = smsc.submits
    assert (submit.source_addr, submit.source_ton, submit.source_npi) == ("8610690000", 1, 1)
    assert submit.validity_period == "101001075959000+"
    assert submit.registered_delivery == 0


async def test_delivered_receipt_reaches_the_sink(
    smsc: FakeSmsc, make_channel: ChannelFactory, receipts: list[Receipt]
) -> None:
    channel = await make_channel()
    result = await channel.send(message("hello"))
    await smsc.eventually(lambda: len(receipts) == 1, what="the receipt")
    (receipt,) = receipts
    assert receipt == Receipt(
        channel="sms-gw",
        provider_id=result.provider_id or "?",
        status=ReceiptStatus.DELIVERED,
        error_code=None,
        reason="stat:DELIVRD",
    )
    await smsc.eventually(lambda: smsc.deliver_sm_statuses == [0], what="deliver_sm_resp")


@pytest.mark.parametrize("tlvs", [False, True], ids=["text-only", "with-tlvs"])
async def test_undelivered_receipt_carries_the_error(
    smsc: FakeSmsc, make_channel: ChannelFactory, receipts: list[Receipt], tlvs: bool
) -> None:
    smsc.program_receipt(NUMBER, ReceiptPlan(stat="UNDELIV", err="011", tlvs=tlvs))
    channel = await make_channel()
    result = await channel.send(message("hello"))
    await smsc.eventually(lambda: len(receipts) == 1, what="the receipt")
    assert receipts[0].provider_id == result.provider_id
    assert receipts[0].status is ReceiptStatus.UNDELIVERED
    assert receipts[0].error_code == "011"


async def test_receipts_of_every_part_map_to_the_first_parts_id(
    smsc: FakeSmsc, make_channel: ChannelFactory, receipts: list[Receipt]
) -> None:
    channel = await make_channel()
    result = await channel.send(message(SLOGAN_150))
    await smsc.eventually(lambda: len(receipts) == 3, what="three receipts")
    assert {r.provider_id for r in receipts} == {result.provider_id}
    assert sorted(r.reason or "" for r in receipts) == [
        f"stat:DELIVRD (part {n}/3)" for n in (1, 2, 3)
    ]


async def test_receipt_with_an_unknown_stat_is_acknowledged_and_dropped(
    smsc: FakeSmsc, make_channel: ChannelFactory, receipts: list[Receipt]
) -> None:
    smsc.program_receipt(NUMBER, ReceiptPlan(stat="BOGUS"))
    channel = await make_channel()
    assert (await channel.send(message("hello"))).outcome is Outcome.ACCEPTED
    await smsc.eventually(lambda: smsc.deliver_sm_statuses == [0], what="deliver_sm_resp")
    assert receipts == []


async def test_failing_receipt_sink_asks_the_smsc_to_redeliver(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    channel = await make_channel()

    async def broken(receipt: Receipt) -> None:
        raise RuntimeError("database is locked")

    channel.context.receipt_sink = broken
    assert (await channel.send(message("hello"))).outcome is Outcome.ACCEPTED
    await smsc.eventually(lambda: smsc.deliver_sm_statuses == [0x64], what="ESME_RX_T_APPN")


async def test_throttled_answers_retry(smsc: FakeSmsc, make_channel: ChannelFactory) -> None:
    smsc.program_status(NUMBER, 0x58)
    channel = await make_channel()
    result = await channel.send(message("hello"))
    assert result.outcome is Outcome.RETRY
    assert result.error_code == "ESME_RTHROTTLED"
    assert (await channel.send(message("hello"))).outcome is Outcome.ACCEPTED


@pytest.mark.parametrize(
    ("status", "outcome", "code"),
    [
        (0x14, Outcome.RETRY, "ESME_RMSGQFUL"),
        (0x08, Outcome.RETRY, "ESME_RSYSERR"),
        (0x0B, Outcome.FAILED, "ESME_RINVDSTADR"),
        (0x45, Outcome.FAILED, "ESME_RSUBMITFAIL"),
        (0x401, Outcome.FAILED, "0x00000401"),
    ],
)
async def test_command_status_classification(
    smsc: FakeSmsc, make_channel: ChannelFactory, status: int, outcome: Outcome, code: str
) -> None:
    smsc.program_status(NUMBER, status)
    channel = await make_channel()
    result = await channel.send(message("hello"))
    assert (result.outcome, result.error_code) == (outcome, code)
    assert f"0x{status:08X}" in (result.reason or "")


async def test_throttled_later_part_is_retried_in_place(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    smsc.program_status(NUMBER, 0x00, 0x58)  # part 1 accepted, part 2 throttled once
    channel = await make_channel()
    result = await channel.send(message(SLOGAN_150))
    assert result.outcome is Outcome.ACCEPTED
    assert [s.status for s in smsc.submits] == [0, 0x58, 0, 0]
    assert [m.text for m in smsc.messages] == [SLOGAN_150]


async def test_later_part_refused_for_good_is_ambiguous(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    smsc.program_status(NUMBER, 0x00, 0x45)
    channel = await make_channel()
    result = await channel.send(message(SLOGAN_150))
    assert result.outcome is Outcome.AMBIGUOUS
    assert result.error_code == "ESME_RSUBMITFAIL"
    assert "part 2/3" in (result.reason or "")
    assert len(smsc.submits) == 2


async def test_unanswered_submit_is_ambiguous(smsc: FakeSmsc, make_channel: ChannelFactory) -> None:
    channel = await make_channel(response_timeout_s=0.2)
    smsc.stall = True
    result = await channel.send(message("hello"))
    assert (result.outcome, result.error_code) == (Outcome.AMBIGUOUS, "TIMEOUT")


async def test_connection_drop_mid_flight_is_ambiguous_then_retry_then_rebinds(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    channel = await make_channel()
    smsc.stall = True
    in_flight = asyncio.create_task(channel.send(message("hello")))
    await smsc.eventually(lambda: len(smsc.submits) == 1, what="the submit_sm")
    smsc.stall = False
    smsc.refuse_binds = 0x08  # keep the channel unbound until the test lets it rebind
    await smsc.drop_connections()
    result = await in_flight
    assert (result.outcome, result.error_code) == (Outcome.AMBIGUOUS, "CONNECTION_LOST")

    await smsc.eventually(lambda: smsc.bind_failures >= 1, what="a refused rebind")
    refused = await channel.send(message("hello"))
    assert (refused.outcome, refused.error_code) == (Outcome.RETRY, "NOT_BOUND")
    assert not channel.bound

    smsc.refuse_binds = None
    await smsc.eventually(lambda: channel.bound, what="the rebind")
    assert (await channel.send(message("hello"))).outcome is Outcome.ACCEPTED
    assert smsc.binds == 2
    assert [m.text for m in smsc.messages] == ["hello"]


async def test_unbind_from_the_smsc_is_answered_and_followed_by_a_rebind(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    channel = await make_channel()
    assert await smsc.unbind() == 0
    await smsc.eventually(lambda: smsc.binds == 2 and channel.bound, what="the rebind")
    assert (await channel.send(message("hello"))).outcome is Outcome.ACCEPTED


async def test_enquire_link_is_sent_when_idle(smsc: FakeSmsc, make_channel: ChannelFactory) -> None:
    await make_channel(enquire_link_s=0.05)
    await smsc.eventually(lambda: smsc.enquire_links >= 3, what="enquire_links")
    assert smsc.binds == 1


async def test_unanswered_enquire_link_drops_and_rebinds(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    smsc.answer_enquire_link = False
    channel = await make_channel(enquire_link_s=0.05, response_timeout_s=0.2)
    await smsc.eventually(lambda: smsc.binds >= 2, what="a rebind after a dead link")
    smsc.answer_enquire_link = True
    await smsc.eventually(lambda: channel.bound, what="bound again")
    assert (await channel.send(message("hello"))).outcome is Outcome.ACCEPTED


async def test_mobile_originated_message_reaches_on_inbound(
    smsc: FakeSmsc, make_channel: ChannelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    channel = await make_channel()
    inbound: list[tuple[str, str]] = []

    async def on_inbound(sender: str, text: str) -> None:
        inbound.append((sender, text))

    channel.on_inbound = on_inbound
    caplog.set_level(logging.INFO, logger="test.smpp")
    assert await smsc.send_mo(NUMBER, "退订") == [0]
    long_reply = "请不要再发送质量月短信给我，谢谢。" * 3
    assert await smsc.send_mo(NUMBER, long_reply, part_chars=20) == [0, 0, 0]
    assert await smsc.send_mo(NUMBER, "STOP") == [0]
    assert inbound == [(NUMBER, "退订"), (NUMBER, long_reply), (NUMBER, "STOP")]
    assert MASKED in caplog.text
    assert NUMBER not in caplog.text


async def test_failing_inbound_hook_asks_for_redelivery(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    channel = await make_channel()

    async def on_inbound(sender: str, text: str) -> None:
        raise RuntimeError("opt-out store unavailable")

    channel.on_inbound = on_inbound
    assert await smsc.send_mo(NUMBER, "退订") == [0x64]


async def test_invalid_address_fails_without_a_submit(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    channel = await make_channel()
    for address in ("someone@example.cn", "13800138000"):
        result = await channel.send(message("hello", address=address))
        assert (result.outcome, result.error_code) == (Outcome.FAILED, "INVALID_ADDRESS")
    assert smsc.submits == []


async def test_window_bounds_outstanding_submits(
    smsc: FakeSmsc, make_channel: ChannelFactory
) -> None:
    channel = await make_channel(window=2)
    smsc.stall = True
    sends = [asyncio.create_task(channel.send(message(f"m{i}"))) for i in range(5)]
    await smsc.eventually(lambda: len(smsc.submits) == 2, what="two submits")
    await smsc.drop_connections()
    results = await asyncio.gather(*sends)
    # Only the two inside the window were ever written; the rest found the session gone.
    assert len(smsc.submits) == 2
    assert [r.outcome for r in results].count(Outcome.AMBIGUOUS) == 2
    assert [r.outcome for r in results].count(Outcome.RETRY) == 3
