"""SmtpChannel against a real aiosmtpd server on 127.0.0.1: headers, pooling, TLS, AUTH, errors."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as SmtpServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from pydantic import ValidationError

from dispatcher.channels.base import ChannelContext, OutboundMessage, Outcome
from dispatcher.channels.smtp import SmtpChannel, SmtpSettings

SUBJECT = "抓质量水平提升 促发展方式转变"
BODY = "2010年全国“质量月”活动于9月1日开始。\n质量是企业的生命。"
HTML = "<p>2010年全国<b>“质量月”</b>活动</p>"
FROM = "质量月组委会 <noreply@example.cn>"
PASSWORD = "s3cret-Pa55"


@dataclass
class Received:
    """One message as the server took it: envelope plus what the transport looked like."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes
    over_tls: bool


@dataclass
class RecordingHandler:
    """The far side's behaviour: records messages, answers programmed replies per recipient."""

    received: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_replies: dict[str, str] = field(default_factory=dict)
    hang_on_rcpt: set[str] = field(default_factory=set)
    hang_after_data: set[str] = field(default_factory=set)
    drop_after_data: set[str] = field(default_factory=set)
    logins: list[tuple[str, str]] = field(default_factory=list)
    rcpt_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_RCPT(
        self,
        server: SmtpServer,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        self.rcpt_arrived.set()
        if address in self.hang_on_rcpt:
            await self.release.wait()
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SmtpServer, session: Session, envelope: Envelope) -> str:
        recipient = envelope.rcpt_tos[0]
        if recipient in self.data_replies:
            return self.data_replies[recipient]
        assert isinstance(envelope.content, bytes)
        assert envelope.mail_from is not None
        assert server.transport is not None
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        over_tls = server.transport.get_extra_info("ssl_object") is not None
        rcpt_tos = list(envelope.rcpt_tos)
        self.received.append(
            Received(envelope.mail_from, rcpt_tos, message, envelope.content, over_tls)
        )
        if recipient in self.drop_after_data:
            server.transport.close()
            await self.release.wait()
        if recipient in self.hang_after_data:
            await self.release.wait()
        return "250 Message accepted for delivery"

    def authenticate(
        self, server: SmtpServer, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.logins.append((mechanism, data.login.decode()))
        good = data.login == b"campaign" and data.password == PASSWORD.encode()
        # handled=False makes aiosmtpd answer the refusal itself (535).
        return AuthResult(success=good, handled=False)


@dataclass
class SmtpPeer:
    port: int
    handler: RecordingHandler
    connections: list[SmtpServer]


@asynccontextmanager
async def smtp_peer(
    handler: RecordingHandler | None = None,
    *,
    implicit_tls: ssl.SSLContext | None = None,
    **server_options: Any,
) -> AsyncIterator[SmtpPeer]:
    """Run an aiosmtpd server on a free 127.0.0.1 port, counting the connections it accepts."""
    loop = asyncio.get_running_loop()
    handler = handler or RecordingHandler()
    connections: list[SmtpServer] = []

    def accept() -> SmtpServer:
        protocol = SmtpServer(handler, hostname="peer.test", loop=loop, **server_options)
        connections.append(protocol)
        return protocol

    server = await loop.create_server(accept, "127.0.0.1", 0, ssl=implicit_tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield SmtpPeer(port, handler, connections)
    finally:
        handler.release.set()
        server.close()
        for protocol in connections:
            if protocol.transport is not None:
                protocol.transport.close()
        await server.wait_closed()


@asynccontextmanager
async def started(settings: SmtpSettings) -> AsyncIterator[SmtpChannel]:
    channel = SmtpChannel("mail", settings, ChannelContext())
    await channel.start()
    try:
        yield channel
    finally:
        await channel.close()


def settings_for(port: int, **overrides: Any) -> SmtpSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "security": "none",
        "from": FROM,
        "helo_name": "dispatcher.test",
        "timeout_s": 5,
    }
    values.update(overrides)
    return SmtpSettings.model_validate(values)


def outbound(address: str, delivery_id: int = 1, **fields: Any) -> OutboundMessage:
    values: dict[str, Any] = {"subject": SUBJECT, "html": HTML}
    values.update(fields)
    return OutboundMessage(
        delivery_id=delivery_id,
        address=address,
        body=BODY,
        campaign="质量月2010",
        stage="blast",
        **values,
    )


@contextmanager
def refused_port() -> Iterator[int]:
    """A port bound by us but not listening: connecting to it is refused, every time."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@dataclass(frozen=True)
class SelfSigned:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> SelfSigned:
    """A throwaway certificate for 127.0.0.1 and localhost, made with the openssl tool."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-nodes", "-days", "2", "-subj", "/CN=localhost"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert)),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return SelfSigned(cert, key)


# Message format ------------------------------------------------------------------------


async def test_headers_and_mime_structure() -> None:
    async with smtp_peer() as peer:
        settings = settings_for(
            peer.port,
            reply_to="help@example.cn",
            list_unsubscribe=["mailto:unsubscribe@example.cn", "<https://example.cn/u>"],
        )
        async with started(settings) as channel:
            result = await channel.send(outbound("citizen@example.org", delivery_id=42))

    assert result.outcome is Outcome.ACCEPTED, result
    assert result.expects_receipt is False
    [got] = peer.handler.received
    assert got.mail_from == "noreply@example.cn"
    assert got.rcpt_tos == ["citizen@example.org"]

    message = got.message
    assert message["Subject"] == SUBJECT
    assert message["From"].addresses[0].display_name == "质量月组委会"
    assert message["From"].addresses[0].addr_spec == "noreply@example.cn"
    assert message["To"] == "citizen@example.org"
    assert message["Reply-To"] == "help@example.cn"
    assert message["List-Unsubscribe"] == "<mailto:unsubscribe@example.cn>, <https://example.cn/u>"
    assert parsedate_to_datetime(message["Date"]).tzinfo is not None
    assert re.fullmatch(r"<42\.[0-9a-f]{16}@example\.cn>", message["Message-ID"])
    assert result.provider_id == message["Message-ID"]

    # Headers travel as ASCII: the Chinese subject is an RFC 2047 encoded word.
    raw_headers = got.raw.split(b"\r\n\r\n", 1)[0]
    raw_headers.decode("ascii")
    assert b"Subject: =?utf-8?" in raw_headers

    assert message.get_content_type() == "multipart/alternative"
    plain = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert plain is not None and html is not None
    assert plain.get_content_charset() == "utf-8"
    # Text parts travel in canonical form, with CRLF line breaks.
    assert plain.get_content().splitlines() == BODY.splitlines()
    assert html.get_content().splitlines() == HTML.splitlines()


async def test_subject_falls_back_to_campaign_and_text_only_is_single_part() -> None:
    async with smtp_peer() as peer, started(settings_for(peer.port)) as channel:
        result = await channel.send(outbound("a@example.org", subject=None, html=None))
    assert result.outcome is Outcome.ACCEPTED
    [got] = peer.handler.received
    assert got.message["Subject"] == "质量月2010"
    assert got.message.get_content_type() == "text/plain"
    assert got.message.get_content().splitlines() == BODY.splitlines()


async def test_non_ascii_local_part_fails_without_contacting_the_server() -> None:
    async with smtp_peer() as peer, started(settings_for(peer.port)) as channel:
        result = await channel.send(outbound("张三@example.org"))
    assert result.outcome is Outcome.FAILED
    assert result.error_code == "bad-address"
    assert peer.connections == []


async def test_idn_domain_is_idna_encoded_in_the_envelope() -> None:
    async with smtp_peer() as peer, started(settings_for(peer.port)) as channel:
        result = await channel.send(outbound("info@质量.中国"))
    assert result.outcome is Outcome.ACCEPTED
    assert peer.handler.received[0].rcpt_tos == ["info@xn--2n3aq5g.xn--fiqs8s"]


# Connection reuse ----------------------------------------------------------------------


async def test_twenty_messages_share_the_pool_connections() -> None:
    async with smtp_peer() as peer, started(settings_for(peer.port, pool_size=2)) as channel:
        results = await asyncio.gather(
            *(channel.send(outbound(f"r{i}@example.org", delivery_id=i)) for i in range(20))
        )
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 20
    assert sorted(r.rcpt_tos[0] for r in peer.handler.received) == sorted(
        f"r{i}@example.org" for i in range(20)
    )
    assert 1 <= len(peer.connections) <= 2


async def test_reconnects_when_the_server_closed_the_connection() -> None:
    async with smtp_peer() as peer, started(settings_for(peer.port, pool_size=1)) as channel:
        first = await channel.send(outbound("a@example.org", delivery_id=1))
        assert len(peer.connections) == 1
        # The server drops its side, as after an idle timeout.
        transport = peer.connections[0].transport
        assert transport is not None
        transport.close()
        second = await channel.send(outbound("b@example.org", delivery_id=2))
    assert (first.outcome, second.outcome) == (Outcome.ACCEPTED, Outcome.ACCEPTED)
    assert [r.rcpt_tos for r in peer.handler.received] == [["a@example.org"], ["b@example.org"]]
    assert len(peer.connections) == 2


# Classification -------------------------------------------------------------------------


async def test_reply_codes_per_recipient_and_the_connection_survives_them() -> None:
    handler = RecordingHandler(
        rcpt_replies={
            "gone@example.org": "550 5.1.1 Mailbox unavailable",
            "busy@example.org": "451 4.3.0 Try again later",
            "full@example.org": "452 4.2.2 Mailbox full",
            "bad@example.org": "553 5.1.3 Bad destination mailbox address",
        },
        data_replies={"spam@example.org": "554 5.7.1 Message rejected as spam"},
    )
    async with smtp_peer(handler) as peer, started(settings_for(peer.port, pool_size=1)) as ch:
        gone = await ch.send(outbound("gone@example.org"))
        busy = await ch.send(outbound("busy@example.org"))
        full = await ch.send(outbound("full@example.org"))
        bad = await ch.send(outbound("bad@example.org"))
        spam = await ch.send(outbound("spam@example.org"))
        fine = await ch.send(outbound("fine@example.org"))

    assert (gone.outcome, gone.error_code) == (Outcome.FAILED, "smtp-550")
    assert gone.reason == "550 5.1.1 Mailbox unavailable"
    assert (busy.outcome, busy.error_code) == (Outcome.RETRY, "smtp-451")
    assert busy.reason == "451 4.3.0 Try again later"
    assert (full.outcome, full.error_code) == (Outcome.RETRY, "smtp-452")
    assert (bad.outcome, bad.error_code) == (Outcome.FAILED, "smtp-553")
    assert (spam.outcome, spam.error_code) == (Outcome.FAILED, "smtp-554")
    assert spam.reason == "554 5.7.1 Message rejected as spam"
    assert fine.outcome is Outcome.ACCEPTED
    assert [r.rcpt_tos for r in peer.handler.received] == [["fine@example.org"]]
    # Every refusal was followed by RSET on the same connection, not by a reconnect.
    assert len(peer.connections) == 1


async def test_server_down_is_retry() -> None:
    with refused_port() as port:
        async with started(settings_for(port)) as channel:
            result = await channel.send(outbound("a@example.org"))
    assert result.outcome is Outcome.RETRY
    assert result.error_code == "smtp-connect"


async def test_silence_before_data_is_retry() -> None:
    handler = RecordingHandler(hang_on_rcpt={"slow@example.org"})
    async with smtp_peer(handler) as peer, started(settings_for(peer.port, timeout_s=0.3)) as ch:
        result = await ch.send(outbound("slow@example.org"))
    assert result.outcome is Outcome.RETRY
    assert result.error_code == "smtp-timeout"
    assert peer.handler.received == []


async def test_a_cancelled_send_does_not_leave_a_half_open_transaction() -> None:
    handler = RecordingHandler(hang_on_rcpt={"slow@example.org"})
    async with smtp_peer(handler) as peer, started(settings_for(peer.port, pool_size=1)) as ch:
        stuck = asyncio.create_task(ch.send(outbound("slow@example.org")))
        await asyncio.wait_for(handler.rcpt_arrived.wait(), timeout=5)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        # MAIL was accepted on that connection: reusing it would get "503 nested MAIL".
        result = await ch.send(outbound("next@example.org"))
    assert result.outcome is Outcome.ACCEPTED, result
    assert [r.rcpt_tos for r in peer.handler.received] == [["next@example.org"]]


async def test_silence_after_data_is_ambiguous() -> None:
    handler = RecordingHandler(hang_after_data={"slow@example.org"})
    async with smtp_peer(handler) as peer, started(settings_for(peer.port, timeout_s=0.3)) as ch:
        result = await ch.send(outbound("slow@example.org"))
        after = await ch.send(outbound("next@example.org"))
    assert result.outcome is Outcome.AMBIGUOUS
    assert result.error_code == "smtp-no-reply"
    # The server does hold the message: resending it blindly would deliver it twice.
    assert peer.handler.received[0].rcpt_tos == ["slow@example.org"]
    # The connection that went silent is replaced, not reused.
    assert after.outcome is Outcome.ACCEPTED
    assert len(peer.connections) == 2


async def test_disconnect_after_data_is_ambiguous() -> None:
    handler = RecordingHandler(drop_after_data={"cut@example.org"})
    async with smtp_peer(handler) as peer, started(settings_for(peer.port)) as channel:
        result = await channel.send(outbound("cut@example.org"))
    assert result.outcome is Outcome.AMBIGUOUS
    assert [r.rcpt_tos for r in peer.handler.received] == [["cut@example.org"]]


# TLS and AUTH ---------------------------------------------------------------------------


async def test_starttls_with_self_signed_certificate(self_signed: SelfSigned) -> None:
    tls = self_signed.server_context()
    async with smtp_peer(tls_context=tls, require_starttls=True) as peer:
        settings = settings_for(peer.port, security="starttls", ca_file=self_signed.cert)
        async with started(settings) as channel:
            result = await channel.send(outbound("a@example.org"))
    assert result.outcome is Outcome.ACCEPTED, result
    assert peer.handler.received[0].over_tls is True


async def test_starttls_refuses_an_untrusted_certificate(self_signed: SelfSigned) -> None:
    tls = self_signed.server_context()
    async with smtp_peer(tls_context=tls, require_starttls=True) as peer:
        async with started(settings_for(peer.port, security="starttls")) as channel:
            refused = await channel.send(outbound("a@example.org"))
        unchecked = settings_for(peer.port, security="starttls", validate_certs=False)
        async with started(unchecked) as channel:
            accepted = await channel.send(outbound("b@example.org"))
    assert (refused.outcome, refused.error_code) == (Outcome.RETRY, "smtp-tls")
    assert refused.reason is not None and "ca_file" in refused.reason
    assert accepted.outcome is Outcome.ACCEPTED
    assert [r.rcpt_tos for r in peer.handler.received] == [["b@example.org"]]


async def test_starttls_required_but_not_offered_is_retry() -> None:
    async with smtp_peer() as peer, started(settings_for(peer.port, security="starttls")) as ch:
        result = await ch.send(outbound("a@example.org"))
    assert result.outcome is Outcome.RETRY
    assert result.error_code == "smtp-config"
    assert peer.handler.received == []


async def test_implicit_tls(self_signed: SelfSigned) -> None:
    async with smtp_peer(implicit_tls=self_signed.server_context()) as peer:
        settings = settings_for(peer.port, security="tls", ca_file=self_signed.cert)
        async with started(settings) as channel:
            result = await channel.send(outbound("a@example.org"))
    assert result.outcome is Outcome.ACCEPTED, result
    assert peer.handler.received[0].over_tls is True


async def test_implicit_tls_refuses_an_untrusted_certificate(self_signed: SelfSigned) -> None:
    tls = self_signed.server_context()
    async with (
        smtp_peer(implicit_tls=tls) as peer,
        started(settings_for(peer.port, security="tls")) as ch,
    ):
        result = await ch.send(outbound("a@example.org"))
    assert (result.outcome, result.error_code) == (Outcome.RETRY, "smtp-tls")
    assert result.reason is not None and "ca_file" in result.reason
    assert peer.handler.received == []


@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
async def test_auth_with_good_credentials(self_signed: SelfSigned, mechanism: str) -> None:
    handler = RecordingHandler()
    other = {"LOGIN": "PLAIN", "PLAIN": "LOGIN"}[mechanism]
    async with smtp_peer(
        handler,
        tls_context=self_signed.server_context(),
        require_starttls=True,
        auth_required=True,
        authenticator=handler.authenticate,
        auth_exclude_mechanism=[other],
    ) as peer:
        settings = settings_for(
            peer.port,
            security="starttls",
            ca_file=self_signed.cert,
            username="campaign",
            password=PASSWORD,
        )
        async with started(settings) as channel:
            results = [await channel.send(outbound(f"r{i}@example.org")) for i in range(3)]
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 3
    # One login per connection, not per message.
    assert handler.logins == [(mechanism, "campaign")]


async def test_auth_with_bad_credentials_is_retry_and_never_shows_the_password(
    self_signed: SelfSigned, caplog: pytest.LogCaptureFixture
) -> None:
    handler = RecordingHandler()
    async with smtp_peer(
        handler,
        tls_context=self_signed.server_context(),
        require_starttls=True,
        auth_required=True,
        authenticator=handler.authenticate,
    ) as peer:
        settings = settings_for(
            peer.port,
            security="starttls",
            ca_file=self_signed.cert,
            username="campaign",
            password="wrong-" + PASSWORD,
        )
        with caplog.at_level(logging.DEBUG):
            async with started(settings) as channel:
                result = await channel.send(outbound("a@example.org"))
    assert result.outcome is Outcome.RETRY
    assert result.error_code == "smtp-535"
    assert result.reason is not None and "username/password" in result.reason
    assert PASSWORD not in result.reason
    assert PASSWORD not in caplog.text
    assert "username/password" in caplog.text
    assert handler.logins and handler.received == []
    assert PASSWORD not in repr(settings)


# Settings -------------------------------------------------------------------------------


def test_settings_validation() -> None:
    ok = SmtpSettings.model_validate({"host": "smtp.example.cn", "from": FROM})
    assert (ok.port, ok.security, ok.pool_size, ok.timeout_s) == (587, "starttls", 4, 30)
    assert ok.sender.addr_spec == "noreply@example.cn"
    with pytest.raises(ValidationError, match="both username and password"):
        SmtpSettings.model_validate({"host": "h", "from": FROM, "username": "u"})
    with pytest.raises(ValidationError, match="not an e-mail address"):
        SmtpSettings.model_validate({"host": "h", "from": "组委会"})
    with pytest.raises(ValidationError, match="mailto"):
        SmtpSettings.model_validate({"host": "h", "from": FROM, "list_unsubscribe": ["ftp://x"]})
    with pytest.raises(ValidationError, match="security"):
        SmtpSettings.model_validate({"host": "h", "from": FROM, "security": "ssl"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        SmtpSettings.model_validate({"host": "h", "from": FROM, "sender": "x"})
