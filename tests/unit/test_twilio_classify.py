"""The Twilio channel's pure parts: error classification (every row of the table), Retry-After,
validity periods, status-callback receipts and the settings model."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import pytest
from pydantic import ValidationError

from dispatcher.channels.base import Outcome, ReceiptStatus, SendResult
from dispatcher.channels.twilio_sms import (
    CONFIG_RETRY_AFTER_S,
    VALIDITY_MAX_S,
    TwilioSettings,
    classify_transport_error,
    classify_twilio_error,
    parse_retry_after,
    receipt_from_callback,
    validity_period_s,
)

NOW = datetime(2010, 8, 31, 9, 0, tzinfo=UTC)
SID = "AC" + "a1" * 16
SERVICE = "MG" + "b2" * 16


def classify(
    status: int, code: int | None, message: str = "msg", headers: dict[str, str] | None = None
) -> SendResult:
    return classify_twilio_error(status, code, message, headers or {}, now=NOW)


# -- classify_twilio_error: one test per row of docs/channels/twilio.md -------------------------


@pytest.mark.parametrize("code", [21211, 21614, 21408, 21602, 21604, 21617, 30007])
def test_recipient_errors_fail_for_good_with_code_and_message(code: int) -> None:
    result = classify(400, code, "The 'To' number is bad.")
    assert result.outcome is Outcome.FAILED
    assert result.error_code == str(code)
    assert "The 'To' number is bad." in (result.reason or "")
    assert f"Twilio {code}" in (result.reason or "")


def test_4xx_without_twilio_code_fails_with_http_status() -> None:
    # The SDK puts the HTTP status in `code` when the body has none.
    result = classify(422, 422, "Unprocessable")
    assert result.outcome is Outcome.FAILED
    assert result.error_code == "http-422"


def test_unsubscribed_recipient_is_opted_out() -> None:
    result = classify(400, 21610, "Attempt to send to unsubscribed recipient")
    assert result.outcome is Outcome.OPTED_OUT
    assert result.error_code == "21610"


@pytest.mark.parametrize(("status", "code"), [(401, 20003), (401, None), (403, 20003)])
def test_auth_failure_retries_after_a_pause_and_asks_to_fix_credentials(
    status: int, code: int | None
) -> None:
    result = classify(status, code, "Authenticate")
    assert result.outcome is Outcome.RETRY
    assert result.retry_after == CONFIG_RETRY_AFTER_S
    assert "auth_token" in (result.reason or "")


@pytest.mark.parametrize("code", [20005, 20404, 21212, 21603, 21606])
def test_sender_configuration_errors_retry_instead_of_burning_recipients(code: int) -> None:
    result = classify(400 if code != 20404 else 404, code, "sender problem")
    assert result.outcome is Outcome.RETRY
    assert result.error_code == str(code)
    assert result.retry_after == CONFIG_RETRY_AFTER_S
    assert "fix the channel settings" in (result.reason or "")


def test_404_without_code_is_a_configuration_problem() -> None:
    result = classify(404, 404, "Not Found")
    assert result.outcome is Outcome.RETRY
    assert "api_base" in (result.reason or "")


def test_429_retries_after_retry_after_seconds() -> None:
    result = classify(429, 20429, "Too Many Requests", {"Retry-After": "7"})
    assert result.outcome is Outcome.RETRY
    assert result.error_code == "20429"
    assert result.retry_after == 7.0


def test_429_retry_after_as_http_date_and_any_header_case() -> None:
    when = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    result = classify(429, None, "Too Many Requests", {"retry-after": when})
    assert result.outcome is Outcome.RETRY
    assert result.error_code == "http-429"
    assert result.retry_after == 90.0


def test_code_20429_retries_even_without_status_429_or_header() -> None:
    result = classify(400, 20429, "Too Many Requests")
    assert result.outcome is Outcome.RETRY
    assert result.retry_after is None


@pytest.mark.parametrize(("status", "code"), [(500, 20500), (502, None), (503, 503)])
def test_server_errors_retry(status: int, code: int | None) -> None:
    result = classify(status, code, "oops", {"Retry-After": "2"})
    assert result.outcome is Outcome.RETRY
    assert result.error_code == (str(code) if code == 20500 else f"http-{status}")
    assert result.retry_after == 2.0


def test_unexpected_status_retries_and_points_at_api_base() -> None:
    result = classify(301, None, "Moved")
    assert result.outcome is Outcome.RETRY
    assert "api_base" in (result.reason or "")


def test_phone_numbers_in_twilio_messages_are_masked() -> None:
    result = classify(400, 21211, "The 'To' number +8613800138000 is not a valid phone number.")
    assert "+8613800138000" not in (result.reason or "")
    assert "+86138****8000" in (result.reason or "")


# -- parse_retry_after ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("0", 0.0),
        (" 12 ", 12.0),
        ("1.5", 1.5),
        ("-3", None),
        ("inf", None),
        ("soon", None),
        (format_datetime(NOW + timedelta(minutes=2), usegmt=True), 120.0),
        (format_datetime(NOW - timedelta(minutes=2), usegmt=True), 0.0),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


# -- classify_transport_error -----------------------------------------------------------------


def test_connection_refused_before_sending_retries() -> None:
    exc = ConnectionRefusedError(111, "Connection refused")
    result = classify_transport_error(exc, request_sent=False, timeout_s=10)
    assert result.outcome is Outcome.RETRY
    assert result.error_code == "connect-error"


def test_connect_timeout_retries() -> None:
    result = classify_transport_error(TimeoutError(), request_sent=False, timeout_s=10)
    assert result.outcome is Outcome.RETRY
    assert result.error_code == "connect-timeout"


def test_timeout_after_sending_is_ambiguous() -> None:
    result = classify_transport_error(TimeoutError(), request_sent=True, timeout_s=2.5)
    assert result.outcome is Outcome.AMBIGUOUS
    assert result.error_code == "timeout"
    assert "2.5s" in (result.reason or "")


@pytest.mark.parametrize(
    "exc",
    [aiohttp.ServerDisconnectedError(), aiohttp.ClientOSError(104, "Connection reset by peer")],
)
def test_connection_lost_after_sending_is_ambiguous(exc: BaseException) -> None:
    result = classify_transport_error(exc, request_sent=True, timeout_s=10)
    assert result.outcome is Outcome.AMBIGUOUS
    assert result.error_code == "connection-lost"


# -- validity_period_s ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("valid_until", "expected"),
    [
        (None, None),
        (NOW + timedelta(seconds=90.2), 91),
        (NOW + timedelta(hours=1), 3600),
        (NOW - timedelta(minutes=1), 1),
        (NOW, 1),
        (NOW + timedelta(days=2), VALIDITY_MAX_S),
        ((NOW + timedelta(minutes=10)).replace(tzinfo=None), 600),  # naive is UTC
    ],
)
def test_validity_period(valid_until: datetime | None, expected: int | None) -> None:
    assert validity_period_s(valid_until, NOW) == expected


# -- receipt_from_callback --------------------------------------------------------------------


def test_delivered_callback_is_a_delivered_receipt() -> None:
    receipt = receipt_from_callback("tw", {"MessageSid": "SM1", "MessageStatus": "delivered"})
    assert receipt is not None
    assert (receipt.channel, receipt.provider_id, receipt.status) == (
        "tw",
        "SM1",
        ReceiptStatus.DELIVERED,
    )
    assert receipt.error_code is None


def test_undelivered_callback_carries_the_error_code() -> None:
    params = {"MessageSid": "SM2", "MessageStatus": "undelivered", "ErrorCode": "30003"}
    receipt = receipt_from_callback("tw", params)
    assert receipt is not None
    assert receipt.status is ReceiptStatus.UNDELIVERED
    assert receipt.error_code == "30003"


@pytest.mark.parametrize(
    "params",
    [{"MessageSid": "SM3", "MessageStatus": "queued"}, {"MessageStatus": "delivered"}, {}],
)
def test_uninformative_callbacks_make_no_receipt(params: dict[str, str]) -> None:
    assert receipt_from_callback("tw", params) is None


# -- TwilioSettings ---------------------------------------------------------------------------


def test_settings_read_from_alias_and_hide_the_token() -> None:
    settings = TwilioSettings.model_validate(
        {"account_sid": SID, "auth_token": "s3cret-token", "from": "+15005550006"}
    )
    assert settings.from_ == "+15005550006"
    assert settings.api_base == "https://api.twilio.com"
    assert (settings.status_callback, settings.timeout_s, settings.max_connections) == (
        True,
        10.0,
        100,
    )
    assert "s3cret-token" not in repr(settings)
    assert "s3cret-token" not in str(settings.model_dump())


def test_settings_messaging_service_and_trailing_slash() -> None:
    settings = TwilioSettings.model_validate(
        {
            "account_sid": SID,
            "auth_token": "t",
            "messaging_service_sid": SERVICE,
            "api_base": "http://127.0.0.1:8080/",
        }
    )
    assert settings.messaging_service_sid == SERVICE
    assert settings.api_base == "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({}, "exactly one of 'from' and 'messaging_service_sid'"),
        ({"from": "+1500", "messaging_service_sid": SERVICE}, "exactly one"),
        ({"from": "+1500", "account_sid": "ACnope"}, "32 hex digits"),
        ({"messaging_service_sid": "MGnope"}, "32 hex digits"),
        ({"from": "+1500", "api_base": "api.twilio.com"}, "http(s) URL"),
        ({"from": "+1500", "auth_token": "  "}, "must not be empty"),
        ({"from": "+1500", "timeout_s": 0}, "greater than 0"),
        ({"from": "+1500", "fromm": "+1"}, "Extra inputs are not permitted"),
    ],
)
def test_settings_errors_name_the_problem(extra: dict[str, object], fragment: str) -> None:
    raw: dict[str, object] = {"account_sid": SID, "auth_token": "t", **extra}
    with pytest.raises(ValidationError) as info:
        TwilioSettings.model_validate(raw)
    assert fragment in str(info.value)
