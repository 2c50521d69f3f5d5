"""The channel contract: given one rendered message for one address, send it and say what happened.

An adapter never touches the database and never raises for a provider's answer: it classifies
every outcome into a `SendResult`. Exceptions escaping `send` are treated by the engine as
ambiguous (the provider may or may not have the message), so adapters should catch what they can
classify.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

AddressKind = Literal["phone", "email", "any"]


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One rendered message for one address, as the engine hands it to an adapter."""

    delivery_id: int
    address: str
    body: str
    campaign: str
    stage: str
    subject: str | None = None
    html: str | None = None
    encoding: str = "GSM-7"
    segments: int = 1
    valid_until: datetime | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


class Outcome(enum.Enum):
    """How a provider answered one send."""

    ACCEPTED = "accepted"  # the provider took it; a receipt may follow
    RETRY = "retry"  # not taken, try again later (throttled, 5xx, connection refused)
    FAILED = "failed"  # not taken, and never will be (invalid number, rejected content)
    OPTED_OUT = "opted_out"  # the provider says the recipient unsubscribed
    AMBIGUOUS = "ambiguous"  # the request left but no answer came back: may have been sent


@dataclass(frozen=True, slots=True)
class SendResult:
    """What happened to one send; build it with the class methods."""

    outcome: Outcome
    provider_id: str | None = None
    error_code: str | None = None
    reason: str | None = None
    retry_after: float | None = None
    expects_receipt: bool = False
    # The channel as a whole cannot take messages now (see `unavailable`).
    channel_down: bool = False

    @classmethod
    def accepted(cls, provider_id: str | None, *, expects_receipt: bool = False) -> SendResult:
        return cls(Outcome.ACCEPTED, provider_id=provider_id, expects_receipt=expects_receipt)

    @classmethod
    def retry(
        cls, code: str | None, reason: str, *, retry_after: float | None = None
    ) -> SendResult:
        return cls(Outcome.RETRY, error_code=code, reason=reason, retry_after=retry_after)

    @classmethod
    def unavailable(
        cls, code: str | None, reason: str, *, retry_after: float | None = None
    ) -> SendResult:
        """The channel cannot take any message now (a full disk, say): not this message's fault.

        The engine pauses the channel's sends for `retry_after` seconds (a few by default) and
        puts the message back in the queue; such attempts do not count against `max_attempts`
        (the message's validity and the retry policy's `max_age` still apply).
        """
        return cls(
            Outcome.RETRY,
            error_code=code,
            reason=reason,
            retry_after=retry_after,
            channel_down=True,
        )

    @classmethod
    def failed(cls, code: str | None, reason: str) -> SendResult:
        return cls(Outcome.FAILED, error_code=code, reason=reason)

    @classmethod
    def opted_out(cls, code: str | None, reason: str) -> SendResult:
        return cls(Outcome.OPTED_OUT, error_code=code, reason=reason)

    @classmethod
    def ambiguous(cls, code: str | None, reason: str) -> SendResult:
        return cls(Outcome.AMBIGUOUS, error_code=code, reason=reason)


class ReceiptStatus(enum.Enum):
    """Final word from the provider about a message it accepted."""

    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    FAILED = "failed"
    SENT = "sent"  # intermediate: handed to the carrier, not yet final


@dataclass(frozen=True, slots=True)
class Receipt:
    """A delivery receipt (status callback, DLR), keyed by the provider's message id."""

    channel: str
    provider_id: str
    status: ReceiptStatus
    error_code: str | None = None
    reason: str | None = None
    at: datetime | None = None


ReceiptSink = Callable[[Receipt], Awaitable[None]]


async def _drop_receipt(receipt: Receipt) -> None:
    return None


@dataclass(slots=True)
class ChannelContext:
    """What the daemon gives an adapter: where receipts go, where files and callbacks live."""

    receipt_sink: ReceiptSink = _drop_receipt
    public_url: str | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("dispatcher.channels"))


class ChannelSettings(BaseModel):
    """Base of every adapter's settings model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: The rate limit's last check for the send under way, set by the engine around `Channel.send`
#: for adapters that pace their own requests (see `Channel.paces_requests`).
_PACER: contextvars.ContextVar[Callable[[], Awaitable[None]] | None] = contextvars.ContextVar(
    "dispatcher_pacer", default=None
)


@contextlib.contextmanager
def pacing(admit: Callable[[], Awaitable[None]] | None) -> Iterator[None]:
    """Within the block (one `send`), `pace()` awaits `admit`; the engine sets it."""
    token = _PACER.set(admit)
    try:
        yield
    finally:
        _PACER.reset(token)


async def pace() -> None:
    """Wait until the request about to leave keeps the channel within its rate cap.

    For adapters with `paces_requests = True`: call it once per provider request, as late as
    possible before the request is written (after a connection is ready). Outside a send (a
    reconcile lookup) it returns at once.
    """
    pacer = _PACER.get()
    if pacer is not None:
        await pacer()


class Channel(ABC):
    """One configured channel. Subclasses set `settings_model` and `address_kind`."""

    settings_model: ClassVar[type[ChannelSettings]] = ChannelSettings
    address_kind: ClassVar[AddressKind] = "phone"
    #: True when the adapter can look a message up at the provider to settle an `unknown`.
    can_reconcile: ClassVar[bool] = False
    #: True when `send` calls `pace()` right before its request leaves. The rate cap is counted
    #: at the provider, and what happens between the engine's check and the request reaching
    #: the wire (a new connection's handshake, building the request) varies from call to call;
    #: an adapter that checks once its connection is ready keeps that variation out. Otherwise
    #: the engine checks right before calling `send`.
    paces_requests: ClassVar[bool] = False
    #: True when every `send` ends within the adapter's own timeout setting (its client
    #: enforces it on the whole call): the engine then sets no timer of its own around it.
    bounds_its_calls: ClassVar[bool] = False

    def __init__(self, name: str, settings: ChannelSettings, context: ChannelContext) -> None:
        self.name = name
        self.settings = settings
        self.context = context

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections; called once before the first send."""

    @abstractmethod
    async def send(self, message: OutboundMessage) -> SendResult:
        """Send one message and classify the provider's answer."""

    async def reconcile(self, message: OutboundMessage, since: datetime) -> SendResult | None:
        """Ask the provider whether `message` went out after `since`; None when it cannot tell."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; in-flight sends have finished when this is called."""
