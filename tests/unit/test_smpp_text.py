"""SMPP text handling, status classification and settings: pure functions, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from dispatcher.channels.base import Outcome, ReceiptStatus
from dispatcher.channels.smpp import SmppSettings, classify_status, status_name
from dispatcher.channels.smpp_text import (
    RECEIPT_STATS,
    MessageTooLong,
    decode_short_message,
    encode_parts,
    gsm7_decode,
    gsm7_encode,
    parse_receipt_text,
)
from dispatcher.sms import analyse

GSM_CHARS = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
    "\x0c^{}\\[~]|€"
)
TEXTS = st.text(alphabet=st.sampled_from(GSM_CHARS), max_size=700) | st.text(
    alphabet=st.sampled_from(GSM_CHARS + "质量月抓诚信😀🏭é"), max_size=400
)


def test_gsm7_round_trips_every_character() -> None:
    encoded = gsm7_encode(GSM_CHARS)
    assert encoded is not None
    assert gsm7_decode(b"".join(encoded)) == GSM_CHARS
    assert gsm7_encode("§") == [b"\x5f"]
    assert gsm7_encode("€") == [b"\x1b\x65"]
    assert gsm7_encode("`") is None
    assert gsm7_encode("质") is None


@given(TEXTS)
@example("€" * 153)
@example("a" * 152 + "€" + "b")
@example("😀" * 36)
def test_parts_agree_with_the_segment_count_and_carry_the_whole_text(text: str) -> None:
    parts = encode_parts(text, reference=7)
    info = analyse(text)
    assert len(parts) == info.segments
    coding = 0 if info.encoding == "GSM-7" else 8
    assert all(part.data_coding == coding for part in parts)
    if len(parts) == 1:
        assert parts[0].esm_class == 0
        payloads = [parts[0].short_message]
    else:
        total = len(parts)
        for number, part in enumerate(parts, start=1):
            assert part.esm_class == 0x40
            assert part.short_message[:6] == bytes([5, 0, 3, 7, total, number])
        payloads = [part.short_message[6:] for part in parts]
    assert all(len(part.short_message) <= 160 for part in parts)
    # Every part decodes on its own: no escape or surrogate pair is cut in two.
    if coding == 8:
        assert all(len(p) <= 134 or len(parts) == 1 for p in payloads)
        assert "".join(p.decode("utf-16-be") for p in payloads) == text
    else:
        assert not any(p.endswith(b"\x1b") for p in payloads)
        assert "".join(gsm7_decode(p) for p in payloads) == text


def test_ucs2_can_be_forced() -> None:
    (part,) = encode_parts("hello", 0, allow_gsm7=False)
    assert (part.data_coding, part.short_message) == (8, "hello".encode("utf-16-be"))


def test_more_than_255_parts_is_refused() -> None:
    with pytest.raises(MessageTooLong):
        encode_parts("质" * (67 * 255 + 1), 0)
    assert len(encode_parts("质" * (67 * 255), 0)) == 255


def test_decode_short_message_reads_8_and_16_bit_concatenation_headers() -> None:
    body = "退订".encode("utf-16-be")
    eight = decode_short_message(bytes([5, 0, 3, 9, 2, 1]) + body, 8, udhi=True)
    assert (eight.text, eight.reference, eight.total, eight.number) == ("退订", 9, 2, 1)
    sixteen = decode_short_message(bytes([6, 8, 4, 1, 2, 3, 2]) + b"STOP", 0, udhi=True)
    assert (sixteen.text, sixteen.reference, sixteen.total, sixteen.number) == ("STOP", 258, 3, 2)
    plain = decode_short_message(b"caf\xe9", 3, udhi=False)
    assert (plain.text, plain.reference) == ("café", None)


def test_receipt_text_fields() -> None:
    text = (
        "id:7A2F00C1 sub:001 dlvrd:001 submit date:1008311200 done date:1008311201 "
        "stat:DELIVRD err:000 text:Quality: month id:x"
    )
    assert parse_receipt_text(text) == {
        "id": "7A2F00C1",
        "sub": "001",
        "dlvrd": "001",
        "submit date": "1008311200",
        "done date": "1008311201",
        "stat": "DELIVRD",
        "err": "000",
        "text": "Quality: month id:x",
    }


def test_receipt_text_tolerates_case_and_missing_fields() -> None:
    assert parse_receipt_text("ID:abc Stat:UNDELIV Err:011") == {
        "id": "abc",
        "stat": "UNDELIV",
        "err": "011",
    }
    assert parse_receipt_text("no receipt here") == {}


def test_receipt_words() -> None:
    assert RECEIPT_STATS["DELIVRD"] is ReceiptStatus.DELIVERED
    assert RECEIPT_STATS["EXPIRED"] is ReceiptStatus.UNDELIVERED
    assert RECEIPT_STATS["REJECTD"] is ReceiptStatus.FAILED
    assert RECEIPT_STATS["ACCEPTD"] is ReceiptStatus.SENT


@pytest.mark.parametrize(
    ("status", "outcome", "code"),
    [
        (0x58, Outcome.RETRY, "ESME_RTHROTTLED"),
        (0x14, Outcome.RETRY, "ESME_RMSGQFUL"),
        (0x08, Outcome.RETRY, "ESME_RSYSERR"),
        (0x04, Outcome.RETRY, "ESME_RINVBNDSTS"),
        (0x64, Outcome.RETRY, "ESME_RX_T_APPN"),
        (0x0B, Outcome.FAILED, "ESME_RINVDSTADR"),
        (0x0A, Outcome.FAILED, "ESME_RINVSRCADR"),
        (0x401, Outcome.FAILED, "0x00000401"),
    ],
)
def test_classify_status(status: int, outcome: Outcome, code: str) -> None:
    result = classify_status(status)
    assert (result.outcome, result.error_code) == (outcome, code)
    assert status_name(status) == code


BASE = {"host": "smsc.example.cn", "system_id": "qm2010", "password": "pw", "source_addr": "QM"}


def test_settings_defaults_and_source_inference() -> None:
    settings = SmppSettings.model_validate(BASE)
    assert (settings.port, settings.window, settings.enquire_link_s) == (2775, 10, 30.0)
    assert settings.source_address == (5, 0, "QM")
    numeric = SmppSettings.model_validate(BASE | {"source_addr": "+8610690000"})
    assert numeric.source_address == (1, 1, "8610690000")
    short_code = SmppSettings.model_validate(
        BASE | {"source_addr": "10690000", "source_ton": 3, "source_npi": 0}
    )
    assert short_code.source_address == (3, 0, "10690000")
    assert "pw" not in repr(settings)


@pytest.mark.parametrize(
    "bad",
    [
        {"password": "too-long-pw"},
        {"source_addr": "QualityMonth2010"},
        {"system_id": "质量"},
        {"bind": "receiver"},
        {"reconnect_min_s": 10, "reconnect_max_s": 1},
        {"unknown_key": 1},
    ],
)
def test_settings_refuse_what_smpp_cannot_carry(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SmppSettings.model_validate(BASE | bad)
