"""The SMPP 3.4 adapter: a transceiver session to an SMSC, submit_sm out, receipts and MO in.

Built on our own asyncio transport (`smpp_session`) and smpplib's PDU classes; texts are
encoded and split by `smpp_text`. The session is kept bound in the background: sends while
unbound answer RETRY, sends caught by a connection loss answer AMBIGUOUS. A message split
into parts is known by the message_id of its first part; receipts for the other parts are
reported under that id too (see docs/channels/smpp.md).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from smpplib import consts

from dispatcher.addresses import mask_address
from dispatcher.channels.base import (
    Channel,
    ChannelContext,
    ChannelSettings,
    OutboundMessage,
    Outcome,
    Receipt,
    ReceiptStatus,
    SendResult,
)
from dispatcher.channels.smpp_session import (
    ESME_ROK,
    BindRejected,
    ConnectionLost,
    NotSent,
    Pdu,
    ProtocolError,
    SessionError,
    SmppSession,
)
from dispatcher.channels.smpp_text import (
    ESM_CLASS_UDHI,
    MESSAGE_STATES,
    RECEIPT_STATS,
    EncodedPart,
    MessageTooLong,
    decode_short_message,
    encode_parts,
    parse_receipt_text,
)
from dispatcher.errors import ChannelError

InboundHandler = Callable[[str, str], Awaitable[None]]

_STATUS_NAMES: Final = {
    value: name.removeprefix("SMPP_")
    for name, value in vars(consts).items()
    if name.startswith("SMPP_ESME_")
}
# Statuses that say "not now" rather than "never": the message itself is fine.
_RETRY_STATUSES: Final = frozenset(
    {
        consts.SMPP_ESME_RTHROTTLED,
        consts.SMPP_ESME_RMSGQFUL,
        consts.SMPP_ESME_RSYSERR,
        consts.SMPP_ESME_RINVBNDSTS,
        consts.SMPP_ESME_RX_T_APPN,
    }
)
# Bind answers that mean the configuration is wrong, not that the SMSC is busy.
_CREDENTIAL_STATUSES: Final = frozenset(
    {consts.SMPP_ESME_RINVPASWD, consts.SMPP_ESME_RINVSYSID, consts.SMPP_ESME_RINVSYSTYP}
)
# esm_class message types (bits 2-5) that carry a receipt: SMSC delivery receipt, SME
# delivery acknowledgement, intermediate delivery notification.
_RECEIPT_TYPES: Final = frozenset({0x04, 0x08, 0x20})
_TON_INTERNATIONAL: Final = 1
_NPI_ISDN: Final = 1
_TON_ALPHANUMERIC: Final = 5
# Throttled later parts of a long message are retried in place: resending the whole
# message later would put the parts already accepted on the handset twice.
_PART_RETRY_DELAYS: Final = (0.5, 1.0, 2.0)
# Bounds on what is remembered between a submit and its receipts, so memory stays flat.
_MAX_TRACKED_PARTS: Final = 100_000
_MAX_PENDING_MO: Final = 1_000


class SmppSettings(ChannelSettings):
    """Settings of an `smpp` channel (keys under `[channels.NAME]`)."""

    host: str = Field(min_length=1)
    port: int = Field(default=2775, ge=1, le=65535)
    system_id: str = Field(min_length=1, max_length=15)
    password: SecretStr
    system_type: str = Field(default="", max_length=12)
    source_addr: str = Field(min_length=1, max_length=20)
    source_ton: int | None = Field(default=None, ge=0, le=6)
    source_npi: int | None = Field(default=None, ge=0, le=18)
    bind: Literal["transceiver"] = "transceiver"
    enquire_link_s: float = Field(default=30.0, gt=0)
    response_timeout_s: float = Field(default=10.0, gt=0)
    window: int = Field(default=10, ge=1, le=1000)
    registered_delivery: bool = True
    gsm7: bool = True
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)

    @field_validator("system_id", "system_type", "source_addr")
    @classmethod
    def _ascii(cls, value: str) -> str:
        if not value.isascii():
            raise ValueError("must be ASCII (SMPP C-Octet String)")
        return value

    @field_validator("password")
    @classmethod
    def _password(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if not secret.isascii() or len(secret) > 8:
            raise ValueError("must be at most 8 ASCII characters (SMPP 3.4 limit)")
        return value

    @model_validator(mode="after")
    def _source(self) -> SmppSettings:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must not be less than reconnect_min_s")
        if self.alphanumeric_source and len(self.source_addr) > 11:
            raise ValueError("an alphanumeric source_addr has at most 11 characters")
        return self

    @property
    def alphanumeric_source(self) -> bool:
        """True when source_addr is a name (like `CNQuality`) rather than a number."""
        return not self.source_addr.removeprefix("+").isdigit()

    @property
    def source_address(self) -> tuple[int, int, str]:
        """The (TON, NPI, address) sent as source: 5/0 for names, 1/1 for numbers by default."""
        if self.alphanumeric_source:
            ton, npi, addr = _TON_ALPHANUMERIC, 0, self.source_addr
        else:
            ton, npi, addr = _TON_INTERNATIONAL, _NPI_ISDN, self.source_addr.removeprefix("+")
        return (
            self.source_ton if self.source_ton is not None else ton,
            self.source_npi if self.source_npi is not None else npi,
            addr,
        )


def status_name(status: int) -> str:
    """Return the SMPP name of a command_status (`ESME_RTHROTTLED`), or its hex for unknown ones."""
    return str(_STATUS_NAMES.get(status, f"0x{status:08X}"))


def classify_status(status: int) -> SendResult:
    """Return what a submit_sm_resp's command_status means for the message (see the docs table)."""
    if status == ESME_ROK:
        raise ValueError("ESME_ROK is not an error status")
    description = consts.DESCRIPTIONS.get(status, "vendor-specific error")
    reason = f"{status_name(status)} (0x{status:08X}): {description}"
    if status in _RETRY_STATUSES:
        return SendResult.retry(status_name(status), reason, retry_after=1.0)
    return SendResult.failed(status_name(status), reason)


class SmppChannel(Channel):
    """Send SMS through an SMSC over SMPP 3.4 (one transceiver bind per channel)."""

    settings_model: ClassVar[type[ChannelSettings]] = SmppSettings
    address_kind = "phone"

    def __init__(self, name: str, settings: ChannelSettings, context: ChannelContext) -> None:
        if not isinstance(settings, SmppSettings):
            raise TypeError(f"SmppChannel needs SmppSettings, got {type(settings).__name__}")
        super().__init__(name, settings, context)
        self.smpp: SmppSettings = settings
        #: Called with (sender, text) for each mobile-originated message, once reassembled.
        self.on_inbound: InboundHandler | None = None
        self._logger = context.logger
        self._label = f"channel {name!r} (SMSC {settings.host}:{settings.port})"
        self._session: SmppSession | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._window = asyncio.Semaphore(settings.window)
        self._unbound_reason = "not started"
        self._reference = random.randrange(256)
        # message_id of each part of a long message -> (first part's id, part number, total)
        self._parts: OrderedDict[str, tuple[str, int, int]] = OrderedDict()
        # (sender, reference, total) -> {part number: text} for long MO messages
        self._mo_parts: OrderedDict[tuple[str, int, int], dict[int, str]] = OrderedDict()

    @property
    def bound(self) -> bool:
        """True while a bound session is up."""
        return self._session is not None and not self._session.closed

    async def start(self) -> None:
        """Bind; raise ChannelError when the SMSC refuses the credentials, else keep retrying."""
        if self._supervisor is not None:
            return
        try:
            self._session = await self._open_session()
            self._logger.info("%s: bound as transceiver", self._label)
        except BindRejected as exc:
            if exc.status in _CREDENTIAL_STATUSES:
                raise ChannelError(
                    f"{self._label} refused bind_transceiver for system_id "
                    f"{self.smpp.system_id!r}: {classify_status(exc.status).reason}; check "
                    f"channels.{self.name}.system_id, .password and .system_type"
                ) from None
            self._unbound(f"bind refused: {status_name(exc.status)}")
        except (OSError, TimeoutError, SessionError) as exc:
            self._unbound(f"cannot connect: {_describe(exc)}")
        self._supervisor = asyncio.create_task(self._keep_bound(), name=f"{self._label} bind")

    async def send(self, message: OutboundMessage) -> SendResult:
        """Submit `message` (split into parts when long) and classify the SMSC's answers."""
        # Sent as TON 1 (international): anything but +digits would be misrouted.
        destination = message.address.removeprefix("+")
        if not (
            message.address.startswith("+") and destination.isdigit() and len(destination) <= 20
        ):
            return SendResult.failed(
                "INVALID_ADDRESS", f"{mask_address(message.address)} is not an E.164 number"
            )
        try:
            parts = encode_parts(message.body, self._next_reference(), allow_gsm7=self.smpp.gsm7)
        except MessageTooLong as exc:
            return SendResult.failed("TOO_LONG", str(exc))
        session = self._session
        if session is None or session.closed:
            return self._not_bound()
        fields = self._submit_fields(destination, message)
        accepted: list[str] = []
        for number, part in enumerate(parts, start=1):
            answer = await self._submit_part(session, fields, part, number, len(parts), accepted)
            if isinstance(answer, SendResult):
                return answer
            accepted.append(answer)
            if len(parts) > 1 and answer:
                # Before any other await: this part's receipt may be the very next PDU.
                self._remember_part(answer, accepted[0], number, len(parts))
        first = accepted[0]
        return SendResult.accepted(
            first or None, expects_receipt=self.smpp.registered_delivery and bool(first)
        )

    async def close(self) -> None:
        """Stop reconnecting, unbind and close the connection."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        if self._session is not None:
            await self._session.close(min(self.smpp.response_timeout_s, 5.0))
            self._session = None
        self._unbound_reason = "closed"

    async def _open_session(self) -> SmppSession:
        s = self.smpp
        return await SmppSession.open(
            s.host,
            s.port,
            system_id=s.system_id,
            password=s.password.get_secret_value(),
            system_type=s.system_type,
            timeout_s=s.response_timeout_s,
            on_deliver=self._on_deliver,
            enquire_link_s=s.enquire_link_s,
            logger=self._logger,
            label=self._label,
        )

    async def _keep_bound(self) -> None:
        """Rebind after every connection loss, backing off exponentially while binds fail."""
        delay = self.smpp.reconnect_min_s
        while True:
            if self._session is not None:
                await self._session.wait_closed()
                self._unbound(f"connection lost: {self._session.close_reason}")
                self._session = None
                delay = self.smpp.reconnect_min_s
            await asyncio.sleep(delay)
            try:
                self._session = await self._open_session()
            except BindRejected as exc:
                # Credentials refused now may be fixed at the SMSC later: keep trying, loudly.
                self._unbound(
                    f"bind refused: {classify_status(exc.status).reason}",
                    error=exc.status in _CREDENTIAL_STATUSES,
                )
            except (OSError, TimeoutError, SessionError) as exc:
                self._unbound(f"cannot connect: {_describe(exc)}")
            except Exception:  # the reconnect loop must outlive any single failure
                self._logger.exception("%s: unexpected error while binding", self._label)
            else:
                self._logger.info("%s: bound as transceiver", self._label)
                continue
            delay = min(delay * 2, self.smpp.reconnect_max_s)

    def _unbound(self, reason: str, *, error: bool = False) -> None:
        self._unbound_reason = reason
        level = logging.ERROR if error else logging.WARNING
        self._logger.log(level, "%s: %s; sends answer RETRY until rebound", self._label, reason)

    def _not_bound(self) -> SendResult:
        return SendResult.retry(
            "NOT_BOUND",
            f"not bound to the SMSC ({self._unbound_reason})",
            retry_after=self.smpp.reconnect_min_s,
        )

    def _next_reference(self) -> int:
        self._reference = (self._reference + 1) % 256
        return self._reference

    def _submit_fields(self, destination: str, message: OutboundMessage) -> dict[str, Any]:
        ton, npi, source = self.smpp.source_address
        fields: dict[str, Any] = {
            "source_addr_ton": ton,
            "source_addr_npi": npi,
            "source_addr": source,
            "dest_addr_ton": _TON_INTERNATIONAL,
            "dest_addr_npi": _NPI_ISDN,
            "destination_addr": destination,
            "registered_delivery": 1 if self.smpp.registered_delivery else 0,
        }
        if message.valid_until is not None:
            fields["validity_period"] = _smpp_time(message.valid_until)
        return fields

    async def _submit_part(
        self,
        session: SmppSession,
        fields: dict[str, Any],
        part: EncodedPart,
        number: int,
        total: int,
        accepted: list[str],
    ) -> str | SendResult:
        """Submit one part; return its message_id, or the SendResult that ends the send."""
        progress = ""
        if accepted:
            progress = f" (part {number}/{total}; earlier parts accepted, first id {accepted[0]})"
        delays = iter(_PART_RETRY_DELAYS if accepted else ())
        while True:
            try:
                async with self._window:
                    response = await session.request(
                        "submit_sm",
                        self.smpp.response_timeout_s,
                        esm_class=part.esm_class,
                        data_coding=part.data_coding,
                        short_message=part.short_message,
                        **fields,
                    )
            except NotSent as exc:
                if not accepted:
                    return self._not_bound()
                return SendResult.ambiguous("CONNECTION_LOST", f"{exc}{progress}")
            except TimeoutError:
                timeout = self.smpp.response_timeout_s
                return SendResult.ambiguous(
                    "TIMEOUT", f"no submit_sm_resp within {timeout:g}s{progress}"
                )
            except (ConnectionLost, ProtocolError) as exc:
                return SendResult.ambiguous("CONNECTION_LOST", f"{exc}{progress}")
            status = int(response.status)
            if status == ESME_ROK:
                return _text(getattr(response, "message_id", None))
            verdict = classify_status(status)
            if not accepted:
                return verdict
            delay = next(delays, None) if verdict.outcome is Outcome.RETRY else None
            if delay is None:
                return SendResult.ambiguous(verdict.error_code, f"{verdict.reason}{progress}")
            await asyncio.sleep(delay)

    def _remember_part(self, part_id: str, first: str, number: int, total: int) -> None:
        self._parts[part_id] = (first, number, total)
        while len(self._parts) > _MAX_TRACKED_PARTS:
            self._parts.popitem(last=False)

    async def _on_deliver(self, pdu: Pdu) -> int:
        """Handle one deliver_sm: a receipt goes to the receipt sink, anything else is MO."""
        if int(pdu.esm_class or 0) & 0x3C in _RECEIPT_TYPES:
            return await self._on_receipt(pdu)
        return await self._on_mobile_originated(pdu)

    async def _on_receipt(self, pdu: Pdu) -> int:
        body: bytes = pdu.short_message or pdu.message_payload or b""
        fields = parse_receipt_text(body.decode("latin-1"))
        provider_id = _text(pdu.receipted_message_id) or fields.get("id", "")
        status: ReceiptStatus | None
        if pdu.message_state in MESSAGE_STATES:
            stat, status = MESSAGE_STATES[pdu.message_state]
        else:
            stat = fields.get("stat", "").upper()
            status = RECEIPT_STATS.get(stat)
        if not provider_id or status is None:
            # Nothing to match or nothing to say; redelivery would not change that.
            self._logger.warning("%s: unusable receipt %r", self._label, body[:120])
            return ESME_ROK
        reason = f"stat:{stat}"
        part = self._parts.get(provider_id)
        if part is not None:
            reason += f" (part {part[1]}/{part[2]})"
        err = fields.get("err", "")
        receipt = Receipt(
            channel=self.name,
            provider_id=part[0] if part is not None else provider_id,
            status=status,
            error_code=err if err.strip("0") else None,
            reason=reason,
        )
        await self.context.receipt_sink(receipt)
        if part is not None and status is not ReceiptStatus.SENT:
            self._parts.pop(provider_id, None)
        return ESME_ROK

    async def _on_mobile_originated(self, pdu: Pdu) -> int:
        sender = _text(pdu.source_addr)
        if pdu.source_addr_ton == _TON_INTERNATIONAL and sender.isdigit():
            sender = "+" + sender
        body: bytes = pdu.short_message or pdu.message_payload or b""
        decoded = decode_short_message(
            body, int(pdu.data_coding or 0), udhi=bool(int(pdu.esm_class or 0) & ESM_CLASS_UDHI)
        )
        text = decoded.text
        key: tuple[str, int, int] | None = None
        if decoded.reference is not None and decoded.total > 1:
            key = (sender, decoded.reference, decoded.total)
            pieces = self._mo_parts.setdefault(key, {})
            pieces[decoded.number] = decoded.text
            self._mo_parts.move_to_end(key)
            while len(self._mo_parts) > _MAX_PENDING_MO:
                self._mo_parts.popitem(last=False)
            if len(pieces) < decoded.total:
                return ESME_ROK
            text = "".join(pieces[number] for number in sorted(pieces))
        self._logger.info(
            "%s: inbound message from %s (%d chars)", self._label, mask_address(sender), len(text)
        )
        if self.on_inbound is not None:
            await self.on_inbound(sender, text)
        if key is not None:
            self._mo_parts.pop(key, None)
        return ESME_ROK


def _text(value: object) -> str:
    """Return an smpplib C-Octet String field (bytes, str or None) as text."""
    if isinstance(value, bytes):
        return value.rstrip(b"\0").decode("latin-1")
    return "" if value is None else str(value)


def _smpp_time(moment: datetime) -> str:
    """Return `moment` in SMPP absolute time format (UTC); a naive datetime is taken as UTC."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return f"{moment:%y%m%d%H%M%S}000+"


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
