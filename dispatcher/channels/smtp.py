"""E-mail through an SMTP submission server, over a small pool of reused connections.

Each send is one SMTP transaction (MAIL, RCPT, DATA) on a connection taken from the pool, so a
campaign of thousands of e-mails opens `pool_size` connections, not thousands. The server's
reply decides the outcome: 2xx accepted, 4xx retry, 5xx failed. A timeout or a dropped
connection during DATA is ambiguous (the server may have queued the message before it went
quiet); anywhere earlier it is a retry, because no message can have been accepted yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import ClassVar, Literal

import aiosmtplib
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from dispatcher.channels.base import (
    Channel,
    ChannelContext,
    ChannelSettings,
    OutboundMessage,
    SendResult,
)
from dispatcher.errors import ChannelError

Security = Literal["starttls", "tls", "none"]


class SmtpSettings(ChannelSettings):
    """How to reach the submission server and what every message carries."""

    model_config = ConfigDict(populate_by_name=True)

    host: str
    port: int = Field(default=587, ge=1, le=65535)
    security: Security = "starttls"
    username: str | None = None
    password: SecretStr | None = None
    from_: str = Field(alias="from")
    reply_to: str | None = None
    list_unsubscribe: list[str] = Field(default_factory=list)
    helo_name: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    pool_size: int = Field(default=4, ge=1, le=100)
    validate_certs: bool = True
    ca_file: Path | None = None

    @field_validator("from_", "reply_to")
    @classmethod
    def _is_mailbox(cls, value: str | None) -> str | None:
        if value is not None:
            _mailbox(value)
        return value

    @field_validator("list_unsubscribe")
    @classmethod
    def _is_unsubscribe_uri(cls, values: list[str]) -> list[str]:
        cleaned = [v.strip().removeprefix("<").removesuffix(">") for v in values]
        for uri in cleaned:
            if not uri.startswith(("mailto:", "https://", "http://")):
                raise ValueError(f"{uri!r} is not a mailto: or http(s):// URI")
        return cleaned

    @model_validator(mode="after")
    def _credentials_paired(self) -> SmtpSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("set both username and password, or neither")
        return self

    @property
    def sender(self) -> Address:
        """The From mailbox, parsed (display name, user and domain)."""
        return _mailbox(self.from_)


def _mailbox(value: str) -> Address:
    """Parse `Name <user@domain>` or `user@domain`, or raise ValueError saying why."""
    name, addr_spec = parseaddr(value)
    user, at, domain = addr_spec.rpartition("@")
    if not (user and at and domain) or any(c.isspace() for c in addr_spec):
        raise ValueError(f"{value!r} is not an e-mail address (expected user@domain)")
    return Address(display_name=name, username=user, domain=domain)


@dataclass(slots=True)
class _Slot:
    """One pooled connection; `client` is None until first use and after a failure."""

    client: aiosmtplib.SMTP | None = None


class _StaleConnection(Exception):
    """The connection ended before the message was handed over: safe to resend elsewhere."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class SmtpChannel(Channel):
    """Sends each message as one e-mail; no receipts (bounces arrive by mail, not here)."""

    settings_model: ClassVar[type[ChannelSettings]] = SmtpSettings
    address_kind = "email"

    def __init__(self, name: str, settings: ChannelSettings, context: ChannelContext) -> None:
        if not isinstance(settings, SmtpSettings):
            raise ChannelError(f"channel {name!r}: expected SmtpSettings, got {type(settings)}")
        super().__init__(name, settings, context)
        self.smtp_settings = settings
        self._sender = settings.sender
        self._tls_context: ssl.SSLContext | None = None
        self._slots: asyncio.LifoQueue[_Slot] | None = None

    async def start(self) -> None:
        """Build the TLS context (reads CA files, so off the event loop) and the empty pool."""
        if self.smtp_settings.security != "none":
            self._tls_context = await asyncio.to_thread(self._build_tls_context)
        # Last in, first out: the connection used last is the one most likely still open, and a
        # trickle of sends keeps reusing one connection instead of opening all of the pool.
        slots: asyncio.LifoQueue[_Slot] = asyncio.LifoQueue()
        for _ in range(self.smtp_settings.pool_size):
            slots.put_nowait(_Slot())
        self._slots = slots

    async def send(self, message: OutboundMessage) -> SendResult:
        """Send `message` as one e-mail on a pooled connection and classify the reply."""
        if self._slots is None:
            raise ChannelError(f"channel {self.name!r}: send() called before start()")
        try:
            recipient = _envelope_address(message.address)
        except ValueError as exc:
            return SendResult.failed("bad-address", str(exc))
        message_id = self._message_id(message)
        payload = self._compose(message, recipient, message_id)

        slot = await self._slots.get()
        try:
            return await self._send_on(slot, recipient, payload, message_id)
        except BaseException:
            # Cancelled (shutdown) or a bug mid-transaction: the connection may be between
            # MAIL and DATA, and the next message must not inherit that half-open transaction.
            _drop(slot)
            raise
        finally:
            self._slots.put_nowait(slot)

    async def close(self) -> None:
        """Say QUIT on every open connection; a server that does not answer is just dropped."""
        if self._slots is None:
            return
        while not self._slots.empty():
            slot = self._slots.get_nowait()
            if slot.client is not None and slot.client.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                    await slot.client.quit(timeout=min(self.smtp_settings.timeout_s, 5.0))
            _drop(slot)
        self._slots = None

    # The transaction -------------------------------------------------------------------

    async def _send_on(
        self, slot: _Slot, recipient: str, payload: bytes, message_id: str
    ) -> SendResult:
        for attempt in (1, 2):
            reused = slot.client is not None and slot.client.is_connected
            if not reused:
                _drop(slot)
                failure = await self._connect(slot)
                if failure is not None:
                    return failure
            assert slot.client is not None
            try:
                return await self._transaction(slot.client, recipient, payload, message_id)
            except _StaleConnection as exc:
                _drop(slot)
                # A server closes idle connections (timeout, restart) without telling us until
                # we speak: nothing was sent on it, so one fresh connection is worth a try.
                if not reused or attempt == 2:
                    return SendResult.retry(exc.code, exc.reason)
        raise AssertionError("unreachable")

    async def _transaction(
        self, client: aiosmtplib.SMTP, recipient: str, payload: bytes, message_id: str
    ) -> SendResult:
        """MAIL, RCPT, DATA; raises _StaleConnection only when nothing reached the server."""
        try:
            await client.mail(self._sender.addr_spec)
            await client.rcpt(recipient)
        except (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPRecipientRefused) as exc:
            if exc.code == 421:  # "service closing": the connection is done, the message is not
                raise _StaleConnection("smtp-421", _reply_text(exc.code, exc.message)) from exc
            await _reset(client)
            return _classify_reply(exc.code, exc.message)
        except aiosmtplib.SMTPServerDisconnected as exc:
            reason = f"server closed the connection: {exc}"
            raise _StaleConnection("smtp-disconnected", reason) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            client.close()
            return SendResult.retry("smtp-timeout", f"no reply before DATA: {exc}")
        except aiosmtplib.SMTPException as exc:
            client.close()
            return SendResult.retry("smtp-error", f"before DATA: {exc}")

        try:
            await client.data(payload)
        except aiosmtplib.SMTPDataError as exc:
            # The server answered: it refused the DATA command or the message, definitively.
            await _reset(client)
            return _classify_reply(exc.code, exc.message)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            # aiosmtplib sends the DATA command and the payload as one step, so a silence
            # here may come after the whole message left: the server may have queued it.
            client.close()
            return SendResult.ambiguous("smtp-no-reply", f"no final reply to DATA: {exc}")
        except aiosmtplib.SMTPException as exc:
            client.close()
            return SendResult.ambiguous("smtp-error", f"during DATA: {exc}")
        return SendResult.accepted(message_id, expects_receipt=False)

    async def _connect(self, slot: _Slot) -> SendResult | None:
        """Open, secure and log in a connection into `slot`; a RETRY result if it cannot."""
        settings = self.smtp_settings
        client = aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            username=settings.username,
            password=settings.password.get_secret_value() if settings.password else None,
            local_hostname=settings.helo_name,
            timeout=settings.timeout_s,
            use_tls=settings.security == "tls",
            start_tls=settings.security == "starttls",
            tls_context=self._tls_context,
        )
        try:
            await client.connect()
        except aiosmtplib.SMTPAuthenticationError as exc:
            # Retry, not fail: the recipients are fine, the channel's credentials are not.
            reply = _reply_text(exc.code, exc.message)
            reason = (
                f"SMTP login as {settings.username!r} refused ({reply}): "
                f"fix the username/password of channel {self.name!r}"
            )
            self.context.logger.error("channel %s: %s", self.name, reason)
            return SendResult.retry(f"smtp-{exc.code}", reason)
        except aiosmtplib.SMTPConnectResponseError as exc:
            return SendResult.retry(f"smtp-{exc.code}", _reply_text(exc.code, exc.message))
        except aiosmtplib.SMTPConnectTimeoutError as exc:
            return SendResult.retry("smtp-connect-timeout", str(exc))
        except aiosmtplib.SMTPResponseException as exc:  # EHLO or STARTTLS refused
            return SendResult.retry(f"smtp-{exc.code}", _reply_text(exc.code, exc.message))
        except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected) as exc:
            return self._connect_failure(exc)
        except aiosmtplib.SMTPTimeoutError as exc:
            return SendResult.retry("smtp-connect-timeout", str(exc))
        except aiosmtplib.SMTPException as exc:  # no STARTTLS or no AUTH offered
            return SendResult.retry("smtp-config", f"{exc} (channel {self.name!r})")
        except OSError as exc:  # ssl.SSLError included
            return self._connect_failure(exc)
        slot.client = client
        return None

    def _connect_failure(self, exc: Exception) -> SendResult:
        """RETRY for a connection that could not be made, telling TLS trouble apart."""
        cause = exc.__cause__ or exc
        if isinstance(cause, ssl.SSLCertVerificationError):
            return SendResult.retry(
                "smtp-tls",
                f"TLS certificate of {self.smtp_settings.host} not trusted "
                f"({cause.verify_message}): set ca_file, or validate_certs = false for a test "
                "server",
            )
        if isinstance(cause, ssl.SSLError):
            return SendResult.retry("smtp-tls", f"TLS failed: {cause}")
        return SendResult.retry("smtp-connect", str(exc))

    # The message -----------------------------------------------------------------------

    def _message_id(self, message: OutboundMessage) -> str:
        return f"<{message.delivery_id}.{secrets.token_hex(8)}@{self._sender.domain}>"

    def _compose(self, message: OutboundMessage, recipient: str, message_id: str) -> bytes:
        """Build the MIME message: text part, optional HTML alternative, RFC 2047 headers."""
        settings = self.smtp_settings
        email = EmailMessage(policy=SMTP_POLICY)
        email["From"] = self._sender
        email["To"] = recipient
        if settings.reply_to:
            email["Reply-To"] = settings.reply_to
        email["Subject"] = message.subject if message.subject is not None else message.campaign
        email["Date"] = format_datetime(datetime.now(UTC))
        email["Message-ID"] = message_id
        if settings.list_unsubscribe:
            email["List-Unsubscribe"] = ", ".join(f"<{u}>" for u in settings.list_unsubscribe)
        email.set_content(message.body)
        if message.html is not None:
            email.add_alternative(message.html, subtype="html")
        return email.as_bytes()

    def _build_tls_context(self) -> ssl.SSLContext:
        settings = self.smtp_settings
        cafile: Path | None = None
        if settings.ca_file is not None:
            cafile = settings.ca_file
            if not cafile.is_absolute():
                cafile = self.context.base_dir / cafile
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ChannelError(f"channel {self.name!r}: ca_file {cafile}: {exc}") from exc
        if not settings.validate_certs:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _envelope_address(address: str) -> str:
    """The RCPT TO form of `address`: ASCII local part, IDNA-encoded domain."""
    user, at, domain = address.strip().rpartition("@")
    if not (user and at and domain):
        raise ValueError(f"not an e-mail address: {address!r}")
    if not user.isascii():
        raise ValueError("non-ASCII local part needs SMTPUTF8, which this channel does not use")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"domain {domain!r} cannot be IDNA-encoded: {exc}") from exc
    return f"{user}@{ascii_domain}"


def _classify_reply(code: int, text: str) -> SendResult:
    """Map an SMTP reply that refused the message to retry (4xx) or failed (5xx)."""
    reason = _reply_text(code, text)
    if 500 <= code < 600:
        return SendResult.failed(f"smtp-{code}", reason)
    return SendResult.retry(f"smtp-{code}", reason)


def _reply_text(code: int, text: str) -> str:
    return f"{code} {' '.join(text.split())}"


async def _reset(client: aiosmtplib.SMTP) -> None:
    """End a refused transaction so the connection can carry the next one, or drop it."""
    if not client.is_connected:
        return
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError):
        client.close()


def _drop(slot: _Slot) -> None:
    if slot.client is not None:
        slot.client.close()
    slot.client = None
