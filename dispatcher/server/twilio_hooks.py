"""Twilio's webhooks: signed status callbacks (receipts) and inbound replies (STOP / 退订).

Every request must carry a valid `X-Twilio-Signature`: an HMAC of the full URL Twilio
requested and the form fields, keyed by the auth token of the account named in `AccountSid`.
Anything else is refused with 403 before it can touch the database.

Twilio retries a callback that gets no 2xx answer, so every request that was understood is
answered 200, including a receipt for a message we do not know; receipts are idempotent
(they only move a delivery forward), so replays are harmless.
"""

from __future__ import annotations

import asyncio
import logging
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, NoReturn
from urllib.parse import parse_qsl

from sqlalchemy import select
from starlette.datastructures import ImmutableMultiDict
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from twilio.request_validator import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)

from dispatcher import optouts
from dispatcher.addresses import InvalidAddress, mask_address, normalise_phone
from dispatcher.channels.base import Receipt, ReceiptStatus
from dispatcher.channels.twilio_sms import TwilioSettings
from dispatcher.config.loader import Config
from dispatcher.engine.engine import Engine
from dispatcher.store.database import Database
from dispatcher.store.tables import Delivery

__all__ = [
    "EMPTY_TWIML",
    "OPT_IN_KEYWORDS",
    "OPT_OUT_KEYWORDS",
    "TwilioHooks",
    "normalise_keyword",
    "read_form",
]

log = logging.getLogger("dispatcher.server")
D = Delivery.__table__  # type: ignore[attr-defined]

#: Replies that unsubscribe the sender (after `normalise_keyword`): Twilio's standard
#: keywords and the Chinese carriers' 退订 / TD / T.
OPT_OUT_KEYWORDS: Final = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "退订", "TD", "T"}
)
#: Replies that subscribe the sender again.
OPT_IN_KEYWORDS: Final = frozenset({"START", "UNSTOP", "YES"})
EMPTY_TWIML: Final = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
#: A Twilio number without "+" (never seen in practice) is read as a number of this region.
INBOUND_REGION: Final = "CN"
#: How long a receipt may wait for the group-commit writer before Twilio is told to retry.
RECEIPT_TIMEOUT_S: Final = 30.0
MAX_FORM_FIELDS: Final = 200
_DIGIT: Final = re.compile(r"\d")

_RECEIPT_STATUSES: Final[Mapping[str, ReceiptStatus]] = {
    "delivered": ReceiptStatus.DELIVERED,
    "undelivered": ReceiptStatus.UNDELIVERED,
    "failed": ReceiptStatus.FAILED,
    # A scheduled message cancelled at Twilio will never go out.
    "canceled": ReceiptStatus.FAILED,
}
# Intermediate states: the delivery is already `sent` on our side, they say nothing new.
_INTERMEDIATE: Final = frozenset(
    {"accepted", "scheduled", "queued", "sending", "sent", "receiving", "received", "read"}
)


def normalise_keyword(body: str) -> str:
    """The reply as a keyword: NFKC (full-width "ＳＴＯＰ" is "STOP"), trimmed, upper-case."""
    return unicodedata.normalize("NFKC", body).strip().upper()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `limit` bytes.

    A declared Content-Length over the limit is refused before anything is read; a body
    without one (chunked) is counted while it streams, so a huge body is never held whole.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise HTTPException(400, "bad Content-Length header") from None
        if length > limit:
            raise HTTPException(413, f"request body over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request body over {limit} bytes")
    return bytes(body)


async def read_form(request: Request, limit: int) -> ImmutableMultiDict[str, str]:
    """The URL-encoded form of a POST (what Twilio sends), or 400 / 413 / 415 with why."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise HTTPException(415, "expected an application/x-www-form-urlencoded body")
    body = await read_body(request, limit)
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=bool(text),
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "malformed form body") from None
    return ImmutableMultiDict(pairs)


@dataclass(frozen=True, slots=True)
class _Account:
    """A configured twilio channel, as far as webhooks care."""

    channel: str
    settings: TwilioSettings


class TwilioHooks:
    """The two Twilio endpoints, bound to one engine, database and configuration."""

    def __init__(self, engine: Engine, db: Database, config: Config) -> None:
        self.engine = engine
        self.db = db
        self.config = config
        self.limit = config.root.server.max_body_bytes
        self.public_url = config.root.server.public_url
        self.accounts = [
            _Account(name, settings)
            for name, settings in config.channel_settings.items()
            if isinstance(settings, TwilioSettings)
        ]

    # -- endpoints -------------------------------------------------------------------------

    async def status(self, request: Request) -> Response:
        """POST /twilio/status: a delivery receipt; 200 once applied (or nothing to apply)."""
        params, account = await self._verified(request, sender_field="From")
        sid = params.get("MessageSid") or params.get("SmsSid")
        status = (params.get("MessageStatus") or params.get("SmsStatus") or "").strip().lower()
        if not sid or not status:
            raise HTTPException(400, "MessageSid and MessageStatus are required")
        name = account.channel
        receipt_status = _RECEIPT_STATUSES.get(status)
        if receipt_status is None:
            if status not in _INTERMEDIATE:
                log.info("channel %s: status %r for message %s ignored", name, status[:32], sid)
            return Response(status_code=200)
        code = params.get("ErrorCode") or None
        if receipt_status is ReceiptStatus.DELIVERED:
            code = None
        receipt = Receipt(
            channel=name,
            provider_id=sid,
            status=receipt_status,
            error_code=code,
            reason=f"Twilio {status}" + (f" (error {code})" if code else ""),
            at=self.engine.clock.now(),
        )
        if not await self._known(name, sid):
            # Twilio may call back before our own record of the send is committed: the
            # writer keeps such a receipt a while and applies it when the send shows up.
            log.info(
                "channel %s: receipt %s for message %s, not (yet) known here", name, status, sid
            )
        try:
            async with asyncio.timeout(RECEIPT_TIMEOUT_S):
                await self.engine.receipt(receipt)
        except TimeoutError:
            raise HTTPException(503, "busy: try again later") from None
        return Response(status_code=200)

    async def inbound(self, request: Request) -> Response:
        """POST /twilio/inbound: a reply; STOP / 退订 lists the sender, START unlists it."""
        params, account = await self._verified(request, sender_field="To")
        keyword = normalise_keyword(params.get("Body", ""))
        opt_out = keyword in OPT_OUT_KEYWORDS
        opt_in = keyword in OPT_IN_KEYWORDS
        sender = params.get("From", "")
        if not (opt_out or opt_in):
            # Digits are hidden: a reply may well quote a phone or ID number.
            log.info(
                "channel %s: reply from %s is not a keyword: %r",
                account.channel,
                _masked(sender),
                _DIGIT.sub("*", keyword[:20]),
            )
            return _twiml()
        try:
            address = normalise_phone(sender, INBOUND_REGION, mobile_only=False)
        except InvalidAddress as exc:
            log.info(
                "channel %s: %s from %s ignored: %s",
                account.channel,
                keyword,
                _masked(sender),
                exc.reason,
            )
            return _twiml()
        source = f"reply:{account.channel}"
        details = {"keyword": keyword}
        sid = params.get("MessageSid") or params.get("SmsSid")
        if sid:
            details["message_sid"] = sid
        now = self.engine.clock.now()
        actor = self.engine.worker_id
        async with self.db.engine.begin() as conn:
            if opt_out:
                changed = await optouts.add(
                    conn, [address], source=source, actor=actor, now=now, details=details
                )
            else:
                changed = await optouts.remove(
                    conn, [address], source=source, actor=actor, now=now, details=details
                )
        what = "opted out" if opt_out else "opted in again"
        log.info(
            "channel %s: %s %s (%s)%s",
            account.channel,
            mask_address(address),
            what,
            keyword,
            "" if changed else ", no change",
        )
        return _twiml()

    # -- pieces ----------------------------------------------------------------------------

    async def _verified(
        self, request: Request, *, sender_field: str
    ) -> tuple[ImmutableMultiDict[str, str], _Account]:
        """The form, once its signature proves it came from a configured Twilio account."""
        params = await read_form(request, self.limit)
        signature = request.headers.get(SIGNATURE_HEADER)
        account_sid = params.get("AccountSid", "")
        accounts = [a for a in self.accounts if a.settings.account_sid == account_sid]
        if not signature or not accounts:
            why = "no signature" if not signature else "an unknown AccountSid"
            self._forbidden(request, why)
        url = self._signed_url(request)
        algorithm = get_signature_algorithm(request.headers.get(SIGNATURE_SETTINGS_HEADER))
        token = accounts[0].settings.auth_token.get_secret_value()
        if not RequestValidator(token).validate(url, params, signature, algorithm):
            self._forbidden(request, "a signature that does not match")
        return params, _pick(accounts, params, sender_field)

    def _forbidden(self, request: Request, why: str) -> NoReturn:
        client = request.client.host if request.client else "?"
        log.warning("refused %s from %s: %s", request.url.path, client, why)
        raise HTTPException(403, "invalid or missing X-Twilio-Signature")

    def _signed_url(self, request: Request) -> str:
        # Twilio signs the URL it was given: public_url + path, as the channel built it.
        if not self.public_url:
            return str(request.url)
        url = self.public_url.rstrip("/") + request.url.path
        return f"{url}?{request.url.query}" if request.url.query else url

    async def _known(self, channel: str, sid: str) -> bool:
        async with self.db.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(D.c.id).where(D.c.channel == channel, D.c.provider_id == sid).limit(1)
                )
            ).first()
        return row is not None


def _pick(accounts: list[_Account], params: Mapping[str, str], sender_field: str) -> _Account:
    """The channel a request is about, when several share one Twilio account.

    Told apart by the messaging service or our own number (`From` of a status callback,
    `To` of a reply); the first configured one when nothing tells them apart.
    """
    if len(accounts) > 1:
        service = params.get("MessagingServiceSid")
        ours = params.get(sender_field)
        for account in accounts:
            if service and account.settings.messaging_service_sid == service:
                return account
            if ours and account.settings.from_ == ours:
                return account
    return accounts[0]


def _masked(address: str) -> str:
    return mask_address(address) if address else "(no sender)"


def _twiml() -> Response:
    return Response(EMPTY_TWIML, status_code=200, media_type="text/xml")
