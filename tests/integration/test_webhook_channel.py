"""WebhookChannel against a real aiohttp server on 127.0.0.1: bodies, signatures, robots, errors.

The fake robots check signatures the way the real ones are documented to, computed here from
the documentation and not with the adapter's own functions, and refuse a bad one with the
robot's own error answer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from dispatcher.channels.base import ChannelContext, OutboundMessage, Outcome, SendResult
from dispatcher.channels.webhook import WebhookChannel, WebhookSettings

BODY = "抓质量水平提升 促发展方式转变"
SECRET = "SEC-test-secret-签名"

Reply = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass
class Hit:
    """One request as the server saw it."""

    method: str
    raw_path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes
    peer: object

    def json(self) -> Any:
        return json.loads(self.body)


async def accept(request: web.Request, body: bytes) -> web.StreamResponse:
    return web.json_response({"ok": True})


@dataclass
class WebhookPeer:
    port: int = 0
    hits: list[Hit] = field(default_factory=list)
    reply: Reply = accept
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peername = request.transport.get_extra_info("peername") if request.transport else None
        hit = Hit(request.method, request.raw_path, request.query, request.headers, body, peername)
        self.hits.append(hit)
        return await self.reply(request, body)


@asynccontextmanager
async def webhook_peer() -> AsyncIterator[WebhookPeer]:
    """Run an aiohttp server on a free 127.0.0.1 port that records requests and replies."""
    peer = WebhookPeer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", peer.handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    peer.port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    try:
        yield peer
    finally:
        peer.release.set()
        await runner.cleanup()


@asynccontextmanager
async def started(settings: WebhookSettings) -> AsyncIterator[WebhookChannel]:
    channel = WebhookChannel("hook", settings, ChannelContext())
    await channel.start()
    try:
        yield channel
    finally:
        await channel.close()


def settings(url: str, **overrides: Any) -> WebhookSettings:
    return WebhookSettings.model_validate({"url": url, "timeout_s": 5, **overrides})


def outbound(address: str = "ops-group", delivery_id: int = 7) -> OutboundMessage:
    return OutboundMessage(
        delivery_id=delivery_id,
        address=address,
        body=BODY,
        campaign="质量月2010",
        stage="blast",
        subject="质量月",
        metadata={"region": "华东"},
    )


async def send_one(peer: WebhookPeer, path: str = "/hook", **overrides: Any) -> SendResult:
    async with started(settings(peer.url(path), **overrides)) as channel:
        return await channel.send(outbound())


@contextmanager
def refused_port() -> Iterator[int]:
    """A port bound by us but not listening: connecting to it is refused, every time."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def hmac_b64(key: bytes, msg: bytes) -> str:
    return base64.b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode()


# Generic endpoints ----------------------------------------------------------------------


async def test_default_body_has_every_message_field() -> None:
    async with webhook_peer() as peer:
        result = await send_one(peer)
    assert result.outcome is Outcome.ACCEPTED
    [hit] = peer.hits
    assert hit.method == "POST"
    assert hit.headers["Content-Type"] == "application/json; charset=utf-8"
    assert hit.headers["X-Dispatcher-Delivery"] == "7"
    assert hit.json() == {
        "address": "ops-group",
        "body": BODY,
        "subject": "质量月",
        "campaign": "质量月2010",
        "stage": "blast",
        "delivery_id": 7,
        "metadata": {"region": "华东"},
    }
    assert BODY.encode() in hit.body  # UTF-8, not \\u escapes
    assert result.provider_id is not None and len(result.provider_id) == 32


async def test_body_template_is_sent_as_rendered() -> None:
    template = (
        '{"to": {{ address|tojson }}, "text": {{ body|tojson }},\n'
        ' "tag": "{{ campaign }}/{{ stage }}", "n": {{ delivery_id }},'
        ' "region": {{ metadata.region|tojson }}, "html": {{ "<b>&"|tojson }}}'
    )
    async with webhook_peer() as peer:
        result = await send_one(
            peer, method="put", headers={"Authorization": "Bearer t0k"}, body_template=template
        )
    assert result.outcome is Outcome.ACCEPTED
    [hit] = peer.hits
    assert hit.method == "PUT"
    assert hit.headers["Authorization"] == "Bearer t0k"
    assert hit.json() == {
        "to": "ops-group",
        "text": BODY,
        "tag": "质量月2010/blast",
        "n": 7,
        "region": "华东",
        "html": "<b>&",
    }
    assert b'"tag": "' in hit.body and b",\n" in hit.body  # the operator's layout, byte for byte


async def test_address_is_url_quoted_into_the_url() -> None:
    async with webhook_peer() as peer:
        url = peer.url("/users/{address}/notify?via=dispatcher")
        async with started(settings(url)) as channel:
            result = await channel.send(outbound(address="张三/李四 +86"))
    assert result.outcome is Outcome.ACCEPTED
    assert peer.hits[0].raw_path.lower() == (
        "/users/%e5%bc%a0%e4%b8%89%2f%e6%9d%8e%e5%9b%9b%20%2b86/notify?via=dispatcher"
    )


async def test_generic_hmac_signature_verifies() -> None:
    async with webhook_peer() as peer:
        result = await send_one(peer, hmac_secret=SECRET)
    assert result.outcome is Outcome.ACCEPTED
    [hit] = peer.hits
    timestamp = hit.headers["X-Dispatcher-Timestamp"]
    assert abs(int(timestamp) - time.time()) < 60
    expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + hit.body, hashlib.sha256)
    assert hit.headers["X-Dispatcher-Signature"] == "sha256=" + expected.hexdigest()


async def test_hmac_header_name_is_configurable() -> None:
    async with webhook_peer() as peer:
        await send_one(peer, hmac_secret=SECRET, hmac_header="X-Hub-Signature-256")
    assert peer.hits[0].headers["X-Hub-Signature-256"].startswith("sha256=")
    assert "X-Dispatcher-Signature" not in peer.hits[0].headers


async def test_provider_id_from_the_configured_response_field() -> None:
    async def with_id(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.json_response({"data": {"message_id": "m-42"}})

    async with webhook_peer() as peer:
        peer.reply = with_id
        found = await send_one(peer, id_field="data.message_id")
        missing = await send_one(peer, id_field="data.nope")
    assert found.provider_id == "m-42"
    assert missing.outcome is Outcome.ACCEPTED
    assert missing.provider_id is not None and len(missing.provider_id) == 32


async def test_connections_are_bounded_by_max_connections() -> None:
    async with webhook_peer() as peer, started(settings(peer.url("/"), max_connections=2)) as ch:
        results = await asyncio.gather(*(ch.send(outbound(delivery_id=i)) for i in range(10)))
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 10
    assert len(peer.hits) == 10
    assert 1 <= len({hit.peer for hit in peer.hits}) <= 2


# Bad bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ('{"text": {{ body }}}', "did not render JSON"),
        ('{"text": {{ nope|tojson }}}', "'nope' is undefined"),
        ("{{ ''.__class__.__mro__ }}", "does not render"),
    ],
)
async def test_bad_body_template_fails_without_a_request(template: str, why: str) -> None:
    async with webhook_peer() as peer:
        result = await send_one(peer, body_template=template)
    assert result.outcome is Outcome.FAILED
    assert result.error_code == "bad-body"
    assert result.reason is not None and why in result.reason
    assert BODY not in result.reason
    assert peer.hits == []


def test_settings_validation() -> None:
    with pytest.raises(ValidationError, match="template line 1"):
        WebhookSettings(url="https://example.cn/hook", body_template='{"a": {{ body }')
    with pytest.raises(ValidationError, match="http"):
        WebhookSettings(url="ftp://example.cn/hook")
    with pytest.raises(ValidationError, match="hmac_secret"):
        WebhookSettings.model_validate(
            {"url": "https://example.cn", "preset": "wecom", "secret": "x"}
        )
    with pytest.raises(ValidationError, match="preset"):
        WebhookSettings.model_validate({"url": "https://example.cn", "preset": "wechat"})
    ok = WebhookSettings.model_validate({"url": "https://example.cn", "secret": None})
    assert (ok.method, ok.timeout_s, ok.max_connections) == ("POST", 10, 20)
    assert "SEC" not in repr(
        WebhookSettings.model_validate(
            {"url": "https://example.cn", "preset": "dingtalk", "secret": SECRET}
        )
    )


# Robot presets ---------------------------------------------------------------------------


async def test_wecom_payload() -> None:
    async def wecom(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async with webhook_peer() as peer:
        peer.reply = wecom
        result = await send_one(peer, "/cgi-bin/webhook/send?key=abc", preset="wecom")
    assert result.outcome is Outcome.ACCEPTED
    [hit] = peer.hits
    assert hit.query["key"] == "abc"
    assert hit.json() == {"msgtype": "text", "text": {"content": BODY}}


async def test_dingtalk_payload_and_signature() -> None:
    async def dingtalk(request: web.Request, body: bytes) -> web.StreamResponse:
        # Documented check: timestamp in ms within an hour, and
        # sign = urlencode(base64(HmacSHA256(key=secret, msg=timestamp + "\n" + secret))).
        timestamp, sign = request.query.get("timestamp", ""), request.query.get("sign", "")
        expected = hmac_b64(SECRET.encode(), f"{timestamp}\n{SECRET}".encode())
        fresh = timestamp.isdigit() and abs(int(timestamp) - time.time() * 1000) < 3_600_000
        if not (fresh and hmac.compare_digest(sign, expected)):
            return web.json_response({"errcode": 310000, "errmsg": "sign not match"})
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async with webhook_peer() as peer:
        peer.reply = dingtalk
        path = "/robot/send?access_token=tok"
        signed = await send_one(peer, path, preset="dingtalk", secret=SECRET)
        unsigned = await send_one(peer, path, preset="dingtalk")
    assert signed.outcome is Outcome.ACCEPTED, signed
    assert peer.hits[0].query["access_token"] == "tok"
    assert peer.hits[0].json() == {"msgtype": "text", "text": {"content": BODY}}
    # The fake robot refuses the unsigned request the way DingTalk does: HTTP 200, errcode.
    assert (unsigned.outcome, unsigned.error_code) == (Outcome.FAILED, "dingtalk-310000")
    assert unsigned.reason == "sign not match"


async def test_feishu_payload_and_signature() -> None:
    async def feishu(request: web.Request, body: bytes) -> web.StreamResponse:
        # Documented check: timestamp in seconds within an hour, and
        # sign = base64(HmacSHA256(key=timestamp + "\n" + secret, msg="")).
        data = json.loads(body)
        timestamp, sign = str(data.get("timestamp", "")), str(data.get("sign", ""))
        expected = hmac_b64(f"{timestamp}\n{SECRET}".encode(), b"")
        fresh = timestamp.isdigit() and abs(int(timestamp) - time.time()) < 3600
        if not (fresh and hmac.compare_digest(sign, expected)):
            return web.json_response({"code": 19021, "msg": "sign match fail", "data": {}})
        return web.json_response({"StatusCode": 0, "StatusMessage": "success", "code": 0})

    async with webhook_peer() as peer:
        peer.reply = feishu
        signed = await send_one(peer, "/open-apis/bot/v2/hook/x", preset="feishu", secret=SECRET)
        unsigned = await send_one(peer, "/open-apis/bot/v2/hook/x", preset="feishu")
    assert signed.outcome is Outcome.ACCEPTED, signed
    sent = peer.hits[0].json()
    assert sent["msg_type"] == "text" and sent["content"] == {"text": BODY}
    assert (unsigned.outcome, unsigned.error_code) == (Outcome.FAILED, "feishu-19021")


async def test_slack_payload_and_plain_text_answers() -> None:
    async def slack(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path.endswith("/gone"):
            return web.Response(status=404, text="channel_not_found")
        return web.Response(text="ok")

    async with webhook_peer() as peer:
        peer.reply = slack
        ok = await send_one(peer, "/services/T0/B0/ok", preset="slack")
        gone = await send_one(peer, "/services/T0/B0/gone", preset="slack")
    assert ok.outcome is Outcome.ACCEPTED
    assert peer.hits[0].json() == {"text": BODY}
    assert (gone.outcome, gone.error_code) == (Outcome.FAILED, "http-404")
    assert gone.reason is not None and "channel_not_found" in gone.reason


@pytest.mark.parametrize(
    ("preset", "answer", "outcome", "code", "retry_after"),
    [
        (
            "wecom",
            {"errcode": 45009, "errmsg": "api freq out of limit"},
            "retry",
            "wecom-45009",
            60,
        ),
        (
            "wecom",
            {"errcode": 93000, "errmsg": "invalid webhook url"},
            "failed",
            "wecom-93000",
            None,
        ),
        (
            "dingtalk",
            {"errcode": 130101, "errmsg": "send too fast"},
            "retry",
            "dingtalk-130101",
            600,
        ),
        (
            "dingtalk",
            {"errcode": 300001, "errmsg": "token is not exist"},
            "failed",
            "dingtalk-300001",
            None,
        ),
        ("feishu", {"code": 11232, "msg": "frequency limited"}, "retry", "feishu-11232", None),
        ("feishu", {"code": 19024, "msg": "Key Words Not Found"}, "failed", "feishu-19024", None),
    ],
)
async def test_robot_error_codes_in_http_200(
    preset: str, answer: dict[str, Any], outcome: str, code: str, retry_after: float | None
) -> None:
    async def robot(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.json_response(answer)

    async with webhook_peer() as peer:
        peer.reply = robot
        result = await send_one(peer, preset=preset)
    assert result.outcome is Outcome(outcome)
    assert result.error_code == code
    assert result.reason == answer.get("errmsg", answer.get("msg"))
    assert result.retry_after == retry_after


# HTTP status and transport ----------------------------------------------------------------


async def test_429_retry_after_in_seconds_and_as_a_date() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)

    async def throttled(request: web.Request, body: bytes) -> web.StreamResponse:
        retry_after = "7" if request.path == "/seconds" else later
        return web.Response(status=429, text="slow down", headers={"Retry-After": retry_after})

    async with webhook_peer() as peer:
        peer.reply = throttled
        seconds = await send_one(peer, "/seconds")
        date = await send_one(peer, "/date")
    assert (seconds.outcome, seconds.error_code, seconds.retry_after) == (
        Outcome.RETRY,
        "http-429",
        7,
    )
    assert seconds.reason == "HTTP 429 Too Many Requests: slow down"
    assert date.outcome is Outcome.RETRY
    assert date.retry_after is not None and 100 < date.retry_after <= 120


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(500, Outcome.RETRY), (503, Outcome.RETRY), (404, Outcome.FAILED), (400, Outcome.FAILED)],
)
async def test_status_codes(status: int, outcome: Outcome) -> None:
    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=status, text=f"status {status} body")

    async with webhook_peer() as peer:
        peer.reply = answer
        result = await send_one(peer)
    assert result.outcome is outcome
    assert result.error_code == f"http-{status}"
    assert result.reason is not None and f"status {status} body" in result.reason


async def test_redirect_is_not_followed() -> None:
    async def moved(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=301, headers={"Location": "https://example.cn/new"})

    async with webhook_peer() as peer:
        peer.reply = moved
        result = await send_one(peer)
    assert (result.outcome, result.error_code) == (Outcome.FAILED, "http-301")
    assert result.reason is not None and "https://example.cn/new" in result.reason
    assert len(peer.hits) == 1


async def test_connection_refused_is_retry() -> None:
    with refused_port() as port:
        async with started(settings(f"http://127.0.0.1:{port}/hook")) as channel:
            result = await channel.send(outbound())
    assert (result.outcome, result.error_code) == (Outcome.RETRY, "http-connect")


async def test_read_timeout_after_the_request_is_ambiguous() -> None:
    async def silent(request: web.Request, body: bytes) -> web.StreamResponse:
        await peer.release.wait()
        return web.json_response({})

    async with webhook_peer() as peer:
        peer.reply = silent
        result = await send_one(peer, timeout_s=0.3)
    assert (result.outcome, result.error_code) == (Outcome.AMBIGUOUS, "http-read-timeout")
    # The receiver did get the request: resending blindly could act on it twice.
    assert len(peer.hits) == 1


async def test_connection_dropped_after_the_request_is_ambiguous() -> None:
    async def hang_up(request: web.Request, body: bytes) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        await peer.release.wait()
        return web.json_response({})

    async with webhook_peer() as peer:
        peer.reply = hang_up
        result = await send_one(peer)
    assert (result.outcome, result.error_code) == (Outcome.AMBIGUOUS, "http-no-response")
    assert len(peer.hits) == 1
