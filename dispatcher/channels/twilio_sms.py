"""The `twilio` channel: SMS through Twilio's Messages API, with the official SDK's async client.

One `twilio.rest.Client` per channel, built in `start()` on an `AsyncTwilioHttpClient` (the
SDK's aiohttp transport) and closed in `close()`; every call goes through the SDK's `*_async`
methods, so nothing blocks the event loop.

`api_base` points the SDK at any Twilio-compatible API: the SDK builds every Messages URL as
`client.api.base_url + "/2010-04-01/..."`, and `base_url` is a plain public attribute of the
`api` domain (`twilio.base.domain.Domain`), so the channel sets it once after building the
client. The SDK would otherwise rewrite the host from the TWILIO_EDGE / TWILIO_REGION
environment variables; the channel clears both so only its settings decide where it sends.

Every answer is classified into a `SendResult` (see `classify_twilio_error` and
`classify_transport_error`, and docs/channels/twilio.md for the table). Credentials never
appear in reasons or logs, and phone numbers in Twilio's messages are masked.
"""

from __future__ import annotations

import base64
import contextvars
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Final
from urllib.parse import urlsplit

import aiohttp
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from dispatcher.addresses import mask_address
from dispatcher.channels.base import (
    AddressKind,
    Channel,
    ChannelContext,
    ChannelSettings,
    OutboundMessage,
    Receipt,
    ReceiptStatus,
    SendResult,
    pace,
)
from dispatcher.errors import ChannelError

__all__ = [
    "STATUS_CALLBACK_PATH",
    "TwilioChannel",
    "TwilioSettings",
    "classify_transport_error",
    "classify_twilio_error",
    "parse_retry_after",
    "receipt_from_callback",
    "validity_period_s",
]

#: Path under `ChannelContext.public_url` where Twilio POSTs status callbacks.
STATUS_CALLBACK_PATH: Final = "/twilio/status"
#: Twilio accepts ValidityPeriod from 1 to 36000 seconds (10 hours).
VALIDITY_MIN_S: Final = 1
VALIDITY_MAX_S: Final = 36_000
#: How long to wait before retrying after Twilio refused our credentials or sender: long
#: enough not to hammer Twilio while an operator fixes the settings.
CONFIG_RETRY_AFTER_S: Final = 60.0
#: Clock-skew allowance between this host and Twilio when matching a message by date.
RECONCILE_SKEW: Final = timedelta(minutes=5)
#: More messages than this to one number in the window: reconcile says it cannot tell.
RECONCILE_MAX_RECORDS: Final = 1000

OPTED_OUT_CODE: Final = 21610
AUTH_CODE: Final = 20003
THROTTLED_CODE: Final = 20429
# Errors about our account or sender, not the recipient: every message would get the same
# answer, so they are retried (like an auth failure) instead of failing the whole audience.
SENDER_CONFIG_CODES: Final[Mapping[int, str]] = {
    20005: "the Twilio account is not active",
    20404: "the account or URL was not found: check account_sid and api_base",
    21212: "the 'from' number is invalid",
    21603: "Twilio got no sender: check 'from' / messaging_service_sid",
    21606: "the 'from' number cannot send to this destination or is not in this account",
}

_ACCOUNT_SID: Final = re.compile(r"AC[0-9a-fA-F]{32}")
_SERVICE_SID: Final = re.compile(r"MG[0-9a-fA-F]{32}")
# Phone numbers inside Twilio's messages ("The 'To' number +8613800138000 is not ...").
_PHONE_IN_TEXT: Final = re.compile(r"(?<![\w+])\+?[0-9]{7,15}(?![\w])")
_SDK_PREFIXES: Final = ("Unable to create record: ", "Unable to fetch record: ")
_FINAL_STATUSES: Final = frozenset({"delivered", "failed", "undelivered", "canceled", "read"})
_CALLBACK_STATUSES: Final[Mapping[str, ReceiptStatus]] = {
    "sent": ReceiptStatus.SENT,
    "delivered": ReceiptStatus.DELIVERED,
    "undelivered": ReceiptStatus.UNDELIVERED,
    "failed": ReceiptStatus.FAILED,
}


class TwilioSettings(ChannelSettings):
    """Settings of a `twilio` channel; exactly one of `from` and `messaging_service_sid`."""

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)

    account_sid: str
    auth_token: SecretStr
    from_: str | None = Field(default=None, alias="from")
    messaging_service_sid: str | None = None
    api_base: str = "https://api.twilio.com"
    status_callback: bool = True
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    max_connections: int = Field(default=100, ge=1, le=10_000)

    @field_validator("account_sid")
    @classmethod
    def _check_account_sid(cls, value: str) -> str:
        if not _ACCOUNT_SID.fullmatch(value):
            raise ValueError(
                "must be 'AC' followed by 32 hex digits (the Account SID in Twilio's console)"
            )
        return value

    @field_validator("auth_token")
    @classmethod
    def _check_auth_token(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty (use ${TWILIO_AUTH_TOKEN} to read it from env)")
        return value

    @field_validator("messaging_service_sid")
    @classmethod
    def _check_service_sid(cls, value: str | None) -> str | None:
        if value is not None and not _SERVICE_SID.fullmatch(value):
            raise ValueError("must be 'MG' followed by 32 hex digits")
        return value

    @field_validator("from_")
    @classmethod
    def _check_from(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("api_base")
    @classmethod
    def _check_api_base(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s) URL such as https://api.twilio.com")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query string or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_sender(self) -> TwilioSettings:
        if (self.from_ is None) == (self.messaging_service_sid is None):
            raise ValueError("set exactly one of 'from' and 'messaging_service_sid'")
        return self


# -- classification (pure) ---------------------------------------------------------------------


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Return the wait a Retry-After header asks for, in seconds, or None if absent or invalid.

    Accepts both forms of RFC 9110: delay-seconds and an HTTP-date (a date in the past means
    "now": 0).
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def classify_twilio_error(
    status: int,
    code: int | None,
    message: str,
    headers: Mapping[str, str],
    *,
    now: datetime | None = None,
) -> SendResult:
    """Classify an HTTP error answer from Twilio's Messages API into a `SendResult`.

    `code` is Twilio's error code from the JSON body (None, or the HTTP status itself, when the
    body had none); `message` is Twilio's text, whose phone numbers are masked in the reason.
    Rules, first match wins: 21610 opted out; 401/20003, 404 and sender configuration codes
    retry (the operator must fix the settings, the recipients are fine); 429/20429 retry after
    Retry-After; 5xx retry; any other 4xx fails for good; anything else retries.
    """
    if code is not None and code < 10_000:
        code = None  # the SDK fills a missing code with the HTTP status; Twilio's are 5 digits
    text = _mask_numbers(message.strip()) or "no message"
    retry_after = parse_retry_after(_header(headers, "Retry-After"), now)
    tag = str(code) if code is not None else f"http-{status}"

    if code == OPTED_OUT_CODE:
        return SendResult.opted_out(tag, f"Twilio {code}: recipient unsubscribed ({text})")
    if status == 401 or code == AUTH_CODE:
        return SendResult.retry(
            tag,
            f"Twilio refused the credentials (HTTP {status}, {code or 'no code'}): check "
            "account_sid and auth_token of this channel; sends resume once they are fixed",
            retry_after=retry_after if retry_after is not None else CONFIG_RETRY_AFTER_S,
        )
    if (code is not None and code in SENDER_CONFIG_CODES) or status == 404:
        # A Messages POST can only be "not found" when the account or api_base is wrong.
        what = SENDER_CONFIG_CODES.get(code or 20404, SENDER_CONFIG_CODES[20404])
        return SendResult.retry(
            tag,
            f"Twilio {code or status}: {what} ({text}); fix the channel settings",
            retry_after=retry_after if retry_after is not None else CONFIG_RETRY_AFTER_S,
        )
    if status == 429 or code == THROTTLED_CODE:
        return SendResult.retry(
            tag, f"Twilio throttled the send (HTTP {status}: {text})", retry_after=retry_after
        )
    if status >= 500:
        return SendResult.retry(
            tag, f"Twilio server error (HTTP {status}: {text})", retry_after=retry_after
        )
    if 400 <= status < 500:
        return SendResult.failed(tag, f"Twilio {code or 'error'} (HTTP {status}): {text}")
    return SendResult.retry(
        tag,
        f"unexpected HTTP {status} from Twilio ({text}): check api_base",
        retry_after=retry_after,
    )


def classify_transport_error(
    exc: BaseException, *, request_sent: bool, timeout_s: float
) -> SendResult:
    """Classify a send that got no HTTP answer: RETRY if nothing left, else AMBIGUOUS.

    Before the request was written (connection refused, DNS failure, connect timeout) Twilio
    cannot have the message, so it is safe to send again. After it was written, a timeout or a
    reset connection says nothing about whether Twilio took it: ambiguous, to be reconciled.
    """
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if not request_sent:
        tag = "connect-timeout" if isinstance(exc, TimeoutError) else "connect-error"
        return SendResult.retry(tag, f"could not reach Twilio ({what})")
    if isinstance(exc, TimeoutError):
        return SendResult.ambiguous(
            "timeout",
            f"no answer from Twilio within {timeout_s:g}s of sending; it may have the message",
        )
    return SendResult.ambiguous(
        "connection-lost", f"connection lost after sending ({what}); Twilio may have the message"
    )


def validity_period_s(valid_until: datetime | None, now: datetime) -> int | None:
    """Return Twilio's ValidityPeriod for a message valid until `valid_until`, or None.

    Whole seconds from `now`, rounded up and clamped to Twilio's 1..36000. A naive
    `valid_until` is taken as UTC.
    """
    if valid_until is None:
        return None
    if valid_until.tzinfo is None:
        valid_until = valid_until.replace(tzinfo=UTC)
    seconds = math.ceil((valid_until - now).total_seconds())
    return min(max(seconds, VALIDITY_MIN_S), VALIDITY_MAX_S)


def receipt_from_callback(channel: str, params: Mapping[str, str]) -> Receipt | None:
    """Turn the form fields of a Twilio status callback into a `Receipt`, or None to ignore.

    Only sent / delivered / undelivered / failed make receipts; queued, sending and the like
    say nothing new. Call it only after the signature was checked (`verify_callback`).
    """
    sid = params.get("MessageSid") or params.get("SmsSid")
    status = _CALLBACK_STATUSES.get(params.get("MessageStatus") or params.get("SmsStatus") or "")
    if not sid or status is None:
        return None
    code = params.get("ErrorCode") or None
    reason = f"Twilio {code}" if code else None
    return Receipt(channel, sid, status, error_code=code, reason=reason, at=datetime.now(UTC))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _mask_numbers(text: str) -> str:
    return _PHONE_IN_TEXT.sub(lambda m: mask_address(m.group(0)), text)


def _strip_sdk_prefix(message: str) -> str:
    for prefix in _SDK_PREFIXES:
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


# -- the SDK's transport, with our pool, our timeout and a trace of each exchange ---------------


@dataclass(slots=True)
class _Exchange:
    """What happened on the wire during one SDK call (set by the HTTP client, read by send)."""

    request_sent: bool = False
    status: int | None = None
    headers: Mapping[str, str] | None = None


# The SDK's exceptions carry no response headers (Retry-After) and aiohttp's do not say whether
# the request left: the HTTP client notes both here for the send running in this task.
_EXCHANGE: contextvars.ContextVar[_Exchange | None] = contextvars.ContextVar(
    "twilio_exchange", default=None
)


class _PacedConnector(aiohttp.TCPConnector):
    """aiohttp's connector, with the rate limit's last check once a request's connection is ready.

    A connection is ready (reused from the pool or just opened) and the request is written next,
    with no wait in between: the check belongs here (see Channel.paces_requests), and from here
    on a failure may come after the provider read the request.
    """

    async def connect(
        self,
        req: Any,
        traces: Any,
        timeout: Any,  # noqa: ASYNC109 - aiohttp's signature
    ) -> aiohttp.connector.Connection:
        connection = await super().connect(req, traces, timeout)
        try:
            await pace()
        except BaseException:
            connection.release()  # nothing was written on it
            raise
        exchange = _EXCHANGE.get()
        if exchange is not None:
            exchange.request_sent = True
        return connection


def _basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _quiet_logger() -> logging.Logger:
    # The SDK logs every request URL and query at INFO, and a Messages list query holds the
    # recipient's number unmasked: give it a logger of its own that never emits.
    logger = logging.Logger("dispatcher.channels.twilio.sdk")
    logger.disabled = True
    return logger


class _SdkHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]  # untyped SDK
    """The SDK's aiohttp client with a bounded pool, a real timeout and a note of each exchange.

    The stock client's session has aiohttp's default pool (100) and, on its async path, the
    SDK passes no timeout to aiohttp at all (its constructor's `timeout` is not used), so both
    are set here. It never retries: a retried POST could send an SMS twice.
    """

    def __init__(self, *, timeout_s: float, max_connections: int) -> None:
        super().__init__(pool_connections=False, timeout=timeout_s, logger=_quiet_logger())
        # Pacing is done by the connector rather than by aiohttp's request trace hooks, which
        # cost a tenth of the client's CPU (a dozen signals built and sent per request).
        self.session = aiohttp.ClientSession(connector=_PacedConnector(limit=max_connections))

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the SDK's signature
        allow_redirects: bool = False,
    ) -> Any:
        if auth is not None:
            # The SDK would hand aiohttp a BasicAuth, deprecated in aiohttp 3.14 (one warning
            # per request); the header it stands for is sent instead.
            headers = {**(headers or {}), "Authorization": _basic_auth(*auth)}
            auth = None
        response = await super().request(
            method,
            url,
            params=params,
            data=data,
            headers=headers,
            auth=auth,
            timeout=timeout if timeout is not None else self.timeout,
            allow_redirects=allow_redirects,
        )
        exchange = _EXCHANGE.get()
        if exchange is not None:
            exchange.status = response.status_code
            exchange.headers = response.headers
        return response


# -- the channel ---------------------------------------------------------------------------------


class TwilioChannel(Channel):
    """Sends SMS through Twilio (or any Twilio-compatible API at `api_base`)."""

    settings_model: ClassVar[type[ChannelSettings]] = TwilioSettings
    address_kind: ClassVar[AddressKind] = "phone"
    can_reconcile: ClassVar[bool] = True
    paces_requests: ClassVar[bool] = True
    bounds_its_calls: ClassVar[bool] = True  # aiohttp's total timeout (timeout_s), pacing included

    def __init__(self, name: str, settings: ChannelSettings, context: ChannelContext) -> None:
        if not isinstance(settings, TwilioSettings):
            raise ChannelError(
                f"channel {name!r}: expected twilio settings, got {type(settings).__name__}"
            )
        super().__init__(name, settings, context)
        self._settings = settings
        self._client: Any = None
        self._http: _SdkHttpClient | None = None
        self._auth_failing = False
        self.status_callback_url: str | None = None
        if settings.status_callback and context.public_url:
            self.status_callback_url = context.public_url.rstrip("/") + STATUS_CALLBACK_PATH

    async def start(self) -> None:
        """Build the SDK client and its connection pool."""
        if self._client is not None:
            return
        settings = self._settings
        if settings.status_callback and self.status_callback_url is None:
            self.context.logger.warning(
                "channel %s: status_callback is on but no public_url is configured; "
                "Twilio cannot report delivery, messages will end as 'sent'",
                self.name,
            )
        self._http = _SdkHttpClient(
            timeout_s=settings.timeout_s, max_connections=settings.max_connections
        )
        client = Client(
            username=settings.account_sid,
            password=settings.auth_token.get_secret_value(),
            account_sid=settings.account_sid,
            http_client=self._http,
        )
        client.edge = None
        client.region = None
        client.api.base_url = settings.api_base
        self._client = client

    async def close(self) -> None:
        """Close the connection pool."""
        if self._http is not None:
            await self._http.close()
        self._http = None
        self._client = None

    async def send(self, message: OutboundMessage) -> SendResult:
        """Create the message at Twilio and classify the answer (never raises for an answer)."""
        client = self._started_client()
        exchange = _Exchange()
        token = _EXCHANGE.set(exchange)
        try:
            created = await client.messages.create_async(**self._create_params(message))
        except TwilioRestException as exc:
            result = self._classify_answer(exc.status, exc.code, str(exc.msg), exchange)
        except TwilioServiceException as exc:
            text = f"{exc.title}: {exc.detail}" if exc.detail else str(exc.title)
            result = self._classify_answer(exc.status, exc.code, text, exchange)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            result = classify_transport_error(
                exc, request_sent=exchange.request_sent, timeout_s=self._settings.timeout_s
            )
        except (TwilioException, ValueError) as exc:
            # A 2xx the SDK could not read (not JSON): Twilio may well have the message.
            result = SendResult.ambiguous(
                "bad-response", f"unreadable answer from Twilio ({type(exc).__name__})"
            )
        else:
            sid = getattr(created, "sid", None)
            if not sid:
                return SendResult.ambiguous("bad-response", "Twilio answered without a sid")
            self._note_auth(ok=True)
            return SendResult.accepted(
                str(sid), expects_receipt=self.status_callback_url is not None
            )
        finally:
            _EXCHANGE.reset(token)
        return self._redact(result)

    async def reconcile(self, message: OutboundMessage, since: datetime) -> SendResult | None:
        """Ask Twilio whether it took `message` at or after `since`; None when it cannot tell.

        Twilio's Messages list is its own record of every message it took, including one whose
        201 answer never reached us. The channel reads the list of messages to the address
        (all pages, at most `RECONCILE_MAX_RECORDS`) and looks for one with the same body
        (a trial account's prefix allowed) created no earlier than `since` minus
        `RECONCILE_SKEW` (clock skew between this host and Twilio):

        - found: ACCEPTED with Twilio's sid, whatever its status there (anything else would
          let the engine send it again); a receipt is expected only while it is not final;
        - the whole list was read and holds no such message: Twilio certainly does not have
          it, so `SendResult.retry(None, "not found at provider")`: sending again is safe;
        - the lookup failed (network, credentials, paging) or the list is too long: None,
          the delivery stays unknown until a later reconcile or an operator decides.

        The list is filtered by `To` only, not by `DateSent`: Twilio sets `date_sent` when a
        message leaves its queue, so a date filter could hide a message still queued there and
        a resend would then be a duplicate. The date is checked here on `date_created`.
        """
        client = self._started_client()
        earliest = _aware(since) - RECONCILE_SKEW
        try:
            stream = await client.messages.stream_async(to=message.address, page_size=100)
            seen = 0
            best: Any = None
            async for record in stream:
                seen += 1
                if seen > RECONCILE_MAX_RECORDS:
                    return None
                if _same_message(record, message, earliest) and (
                    best is None or _created(record) > _created(best)
                ):
                    best = record
        except (TwilioException, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self.context.logger.info(
                "channel %s: reconcile of delivery %s failed: %s",
                self.name,
                message.delivery_id,
                type(exc).__name__,
            )
            return None
        if best is None:
            return SendResult.retry(None, "not found at provider")
        return self._found(best)

    def verify_callback(self, url: str, params: Mapping[str, str], signature: str) -> bool:
        """Return True if `signature` (X-Twilio-Signature) proves Twilio sent this callback.

        `url` must be the full URL Twilio requested (as configured: `status_callback_url`).
        """
        validator = RequestValidator(self._settings.auth_token.get_secret_value())
        return bool(validator.validate(url, dict(params), signature))

    # -- pieces ----------------------------------------------------------------------------

    def _started_client(self) -> Any:
        if self._client is None:
            raise ChannelError(f"channel {self.name!r}: send before start()")
        return self._client

    def _create_params(self, message: OutboundMessage) -> dict[str, Any]:
        settings = self._settings
        params: dict[str, Any] = {"to": message.address, "body": message.body}
        if settings.from_ is not None:
            params["from_"] = settings.from_
        else:
            params["messaging_service_sid"] = settings.messaging_service_sid
        if self.status_callback_url is not None:
            params["status_callback"] = self.status_callback_url
        validity = validity_period_s(message.valid_until, datetime.now(UTC))
        if validity is not None:
            params["validity_period"] = validity
        return params

    def _classify_answer(
        self, status: int, code: int | None, text: str, exchange: _Exchange
    ) -> SendResult:
        result = classify_twilio_error(
            status, code, _strip_sdk_prefix(text), exchange.headers or {}
        )
        self._note_auth(ok=not (status == 401 or code == AUTH_CODE))
        return result

    def _note_auth(self, *, ok: bool) -> None:
        # One warning when Twilio starts refusing the credentials, not one per message.
        if not ok and not self._auth_failing:
            self.context.logger.warning(
                "channel %s: Twilio refuses the credentials (account %s); sends are retried "
                "until account_sid / auth_token are fixed",
                self.name,
                self._settings.account_sid,
            )
        elif ok and self._auth_failing:
            self.context.logger.warning(
                "channel %s: Twilio accepts the credentials again", self.name
            )
        self._auth_failing = not ok

    def _redact(self, result: SendResult) -> SendResult:
        # Belt and braces: no path above puts the token in a reason, and none ever may.
        secret = self._settings.auth_token.get_secret_value()
        if result.reason and secret in result.reason:
            return SendResult(
                result.outcome,
                provider_id=result.provider_id,
                error_code=result.error_code,
                reason=result.reason.replace(secret, "***"),
                retry_after=result.retry_after,
                expects_receipt=result.expects_receipt,
            )
        return result

    def _found(self, record: Any) -> SendResult:
        # Found means "do not send again", whatever became of it at Twilio: anything but
        # ACCEPTED would let the engine resend. A receipt can only still come while the
        # message is not final there.
        status = str(record.status or "")
        final = status in _FINAL_STATUSES
        return SendResult.accepted(
            str(record.sid), expects_receipt=not final and self.status_callback_url is not None
        )


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _created(record: Any) -> datetime:
    created = record.date_created or record.date_sent
    return _aware(created) if isinstance(created, datetime) else datetime.max.replace(tzinfo=UTC)


def _same_message(record: Any, message: OutboundMessage, earliest: datetime) -> bool:
    body = record.body or ""
    if record.to != message.address or not body.endswith(message.body):
        return False
    # A record without a date cannot be excluded: counting it as ours avoids a duplicate.
    return _created(record) >= earliest
