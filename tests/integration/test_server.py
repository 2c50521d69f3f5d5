"""The HTTP endpoint against a real database and a real engine.

Deliveries are made the real way: a stage on a `twilio` channel is fired and sent to the
Twilio-compatible fake (tests/peers/twilio_server.py, callbacks off), so every delivery is
`sent` with a real provider sid; then the tests play Twilio and post signed (or forged)
callbacks to the app, through httpx's ASGI transport or a real uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import func, select
from twilio.request_validator import RequestValidator

from dispatcher import audit
from dispatcher.config.loader import Config, load_config
from dispatcher.engine.clock import SystemClock
from dispatcher.engine.engine import Engine
from dispatcher.errors import ConfigError
from dispatcher.plan import Firing
from dispatcher.server.app import build_app, serve
from dispatcher.store.database import Database
from dispatcher.store.tables import AuditEntry, Delivery, OptOut
from tests.peers.twilio_server import TwilioServer

SID = "AC" + "0123456789abcdef" * 2
TOKEN = "server-test-token-4d2e"
SENDER = "+15005550006"
PUBLIC_URL = "https://dispatch.example.cn/hooks"
NUMBERS = ["+8613800138001", "+8613800138002", "+8613800138003"]
TZ = ZoneInfo("Asia/Shanghai")

D = Delivery.__table__  # type: ignore[attr-defined]
A = AuditEntry.__table__  # type: ignore[attr-defined]
OPT = OptOut.__table__  # type: ignore[attr-defined]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(
    root: Path,
    *,
    api_base: str,
    public_url: str | None = PUBLIC_URL,
    listen: str = "127.0.0.1:0",
    max_body: int = 4096,
    database: str = "var/dispatcher.db",
) -> Path:
    """A config with a twilio channel `tw` and a simulator `sim`, whose window is open now."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "slogans").mkdir(exist_ok=True)
    (root / "people.csv").write_text(
        "phone,name\n" + "".join(f"{n[3:]},P{i}\n" for i, n in enumerate(NUMBERS)),
        encoding="utf-8",
    )
    now = datetime.now(TZ)
    # The send window opens an hour ago and closes in three, whatever the time of day.
    start, end = (
        (now - timedelta(hours=1)).strftime("%H:%M"),
        (now + timedelta(hours=3)).strftime("%H:%M"),
    )
    first, last = (now - timedelta(days=1)).date(), (now + timedelta(days=3)).date()
    at = (now + timedelta(days=2)).strftime("%Y-%m-%dT10:00:00")
    public = f'public_url = "{public_url}"' if public_url else ""
    (root / "config.toml").write_text(
        f"""
[dispatcher]
database = "sqlite:///{database}"
campaigns = []

[engine]
poll_interval = "100ms"
heartbeat = "1s"

[server]
listen = "{listen}"
{public}
max_body_bytes = {max_body}

[channels.tw]
type = "twilio"
rate = 200
account_sid = "{SID}"
auth_token = "{TOKEN}"
from = "{SENDER}"
api_base = "{api_base}"

[channels.sim]
type = "simulator"
rate = 200
receipts = false

[[campaign]]
campaign = {{ id = "qm", name = "QM", start = {first}, end = {last}, timezone = "Asia/Shanghai", send_window = {{ start = "{start}", end = "{end}" }} }}
audiences.people = {{ file = "people.csv", address_column = "phone" }}
stages = [
  {{ id = "blast", channel = "tw", audience = "people", at = {at}, template = "质量月 {{{{ name }}}}" }},
  {{ id = "echo", channel = "sim", audience = "people", at = {at}, template = "hello {{{{ name }}}}" }},
]
""",
        encoding="utf-8",
    )
    return root / "config.toml"


async def wait_for(check: Callable[[], Awaitable[bool]], within_s: float = 10.0) -> None:
    """Poll `check` until it holds; fail after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@dataclass
class Env:
    config: Config
    db: Database
    engine: Engine
    twilio: TwilioServer
    client: httpx.AsyncClient
    root: Path

    async def deliveries(self, channel: str = "tw") -> list[dict[str, Any]]:
        async with self.db.engine.connect() as conn:
            rows = await conn.execute(
                select(
                    D.c.id,
                    D.c.address,
                    D.c.status,
                    D.c.provider_id,
                    D.c.error_code,
                    D.c.reason,
                    D.c.final_at,
                )
                .where(D.c.channel == channel)
                .order_by(D.c.id)
            )
            return [dict(r._mapping) for r in rows]

    async def by_address(self, address: str, channel: str = "tw") -> dict[str, Any]:
        [row] = [r for r in await self.deliveries(channel) if r["address"] == address]
        return row

    async def opt_outs(self) -> dict[str, str]:
        async with self.db.engine.connect() as conn:
            return {r[0]: r[1] for r in await conn.execute(select(OPT.c.address, OPT.c.source))}

    async def audit_entries(self, kind: str | None = None) -> list[dict[str, Any]]:
        async with self.db.engine.connect() as conn:
            stmt = select(A).order_by(A.c.seq)
            if kind is not None:
                stmt = stmt.where(A.c.kind == kind)
            return [dict(r._mapping) for r in await conn.execute(stmt)]

    async def snapshot(self) -> tuple[Any, ...]:
        async with self.db.engine.connect() as conn:
            count = (await conn.execute(select(func.count()).select_from(A))).scalar_one()
        return (await self.deliveries(), await self.opt_outs(), count)

    async def fire(self, stage_id: str) -> None:
        """Fire a stage now and wait until every delivery is settled."""
        campaign, stage = self.config.find_stage(stage_id)
        firing = Firing(campaign.id, stage.id, datetime.now(UTC), 0)
        result = await self.engine.fire(campaign, stage, firing, trigger="manual", wait=True)
        assert result.run_id is not None

        async def settled() -> bool:
            return await self.engine.open_deliveries([result.run_id]) == 0  # type: ignore[list-item]

        await wait_for(settled)


@contextlib.asynccontextmanager
async def environment(root: Path, **config: Any) -> AsyncIterator[Env]:
    async with TwilioServer(accounts={SID: TOKEN}) as twilio:
        cfg = load_config(write_config(root, api_base=twilio.base_url, **config))
        db = Database.open(cfg.database_url)
        await db.upgrade()
        engine = Engine(cfg, db, SystemClock())
        await engine.start()
        app = build_app(engine, db, cfg)
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url="http://testserver"
            ) as client:
                yield Env(cfg, db, engine, twilio, client, root)
        finally:
            await engine.stop(timeout=5)
            await db.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with environment(tmp_path / "site") as environment_:
        await environment_.fire("blast")
        yield environment_


def sign(path: str, params: dict[str, str], *, base: str = PUBLIC_URL, token: str = TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(base + path, params))


def status_params(sid: str, status: str, code: str | None = None) -> dict[str, str]:
    params = {
        "AccountSid": SID,
        "ApiVersion": "2010-04-01",
        "From": SENDER,
        "MessageSid": sid,
        "MessageStatus": status,
        "SmsSid": sid,
        "SmsStatus": status,
        "To": NUMBERS[0],
    }
    if code is not None:
        params["ErrorCode"] = code
    return params


def inbound_params(sender: str, body: str) -> dict[str, str]:
    return {
        "AccountSid": SID,
        "ApiVersion": "2010-04-01",
        "Body": body,
        "From": sender,
        "MessageSid": "SM" + "9" * 32,
        "NumMedia": "0",
        "To": SENDER,
    }


async def post_signed(
    client: httpx.AsyncClient, path: str, params: dict[str, str], signature: str | None = None
) -> httpx.Response:
    headers = {"X-Twilio-Signature": signature if signature is not None else sign(path, params)}
    return await client.post(path, data=params, headers=headers)


# -- status callbacks ------------------------------------------------------------------------


async def test_every_delivery_is_sent_with_a_provider_sid(env: Env) -> None:
    rows = await env.deliveries()
    assert [r["status"] for r in rows] == ["sent"] * 3
    assert {r["provider_id"] for r in rows} == {m.sid for m in env.twilio.messages}


async def test_forged_signature_is_refused_and_changes_nothing(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatcher.server")
    row = await env.by_address(NUMBERS[0])
    params = status_params(row["provider_id"], "delivered")
    before = await env.snapshot()

    forged = sign("/twilio/status", params, token="not-the-token")
    wrong_url = sign("/twilio/status", params, base="http://testserver")  # not the public URL
    tampered = sign("/twilio/status", {**params, "MessageStatus": "failed"})
    for signature in (forged, wrong_url, tampered, ""):
        response = await post_signed(env.client, "/twilio/status", params, signature)
        assert response.status_code == 403
        assert "Traceback" not in response.text
    unknown_account = {**params, "AccountSid": "AC" + "f" * 32}
    response = await post_signed(env.client, "/twilio/status", unknown_account)
    assert response.status_code == 403

    assert await env.snapshot() == before
    assert any("refused /twilio/status" in r.getMessage() for r in caplog.records)


async def test_delivered_callback_moves_sent_to_delivered(env: Env) -> None:
    row = await env.by_address(NUMBERS[0])
    response = await post_signed(
        env.client, "/twilio/status", status_params(row["provider_id"], "delivered")
    )
    assert response.status_code == 200
    after = await env.by_address(NUMBERS[0])
    assert after["status"] == "delivered"
    assert after["error_code"] is None
    changes = [c for e in await env.audit_entries("deliveries") for c in _changes(e)]
    assert [row["id"], "delivered", None] in changes


async def test_replayed_callback_changes_nothing(env: Env) -> None:
    row = await env.by_address(NUMBERS[0])
    params = status_params(row["provider_id"], "delivered")
    assert (await post_signed(env.client, "/twilio/status", params)).status_code == 200
    first = await env.by_address(NUMBERS[0])
    for _ in range(3):
        assert (await post_signed(env.client, "/twilio/status", params)).status_code == 200
    assert await env.by_address(NUMBERS[0]) == first


async def test_out_of_order_callbacks_never_move_back(env: Env) -> None:
    row = await env.by_address(NUMBERS[1])
    sid = row["provider_id"]
    assert (
        await post_signed(env.client, "/twilio/status", status_params(sid, "delivered"))
    ).status_code == 200
    for late in (
        status_params(sid, "sent"),
        status_params(sid, "queued"),
        status_params(sid, "undelivered", "30003"),
    ):
        assert (await post_signed(env.client, "/twilio/status", late)).status_code == 200
    after = await env.by_address(NUMBERS[1])
    assert (after["status"], after["error_code"]) == ("delivered", None)


async def test_intermediate_status_is_ignored(env: Env) -> None:
    row = await env.by_address(NUMBERS[1])
    before = await env.snapshot()
    for status in ("queued", "sending", "sent", "accepted"):
        params = status_params(row["provider_id"], status)
        assert (await post_signed(env.client, "/twilio/status", params)).status_code == 200
    assert await env.snapshot() == before


async def test_undelivered_fails_the_delivery_with_the_error_code(env: Env) -> None:
    row = await env.by_address(NUMBERS[2])
    params = status_params(row["provider_id"], "undelivered", "30003")
    assert (await post_signed(env.client, "/twilio/status", params)).status_code == 200
    after = await env.by_address(NUMBERS[2])
    assert (after["status"], after["error_code"]) == ("failed", "30003")
    assert "30003" in (await _error_reason(env, row["id"]))


async def test_failed_status_fails_the_delivery(env: Env) -> None:
    row = await env.by_address(NUMBERS[0])
    params = status_params(row["provider_id"], "failed", "30008")
    assert (await post_signed(env.client, "/twilio/status", params)).status_code == 200
    after = await env.by_address(NUMBERS[0])
    assert (after["status"], after["error_code"]) == ("failed", "30008")


async def test_unknown_message_sid_is_answered_200_and_logged(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dispatcher.server")
    unknown = "SM" + "0" * 32
    before = await env.snapshot()
    response = await post_signed(env.client, "/twilio/status", status_params(unknown, "delivered"))
    assert response.status_code == 200
    assert any(unknown in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    deliveries, opt_outs, _ = await env.snapshot()
    assert (deliveries, opt_outs) == before[:2]


async def test_callback_without_a_sid_is_a_bad_request(env: Env) -> None:
    params = {"AccountSid": SID, "MessageStatus": "delivered"}
    response = await post_signed(env.client, "/twilio/status", params)
    assert response.status_code == 400
    assert "MessageSid" in response.text


async def test_signature_over_the_request_url_when_no_public_url(tmp_path: Path) -> None:
    async with environment(tmp_path / "site", public_url=None) as env:
        await env.fire("blast")
        row = await env.by_address(NUMBERS[0])
        params = status_params(row["provider_id"], "delivered")
        refused = await post_signed(env.client, "/twilio/status", params)  # signed for PUBLIC_URL
        assert refused.status_code == 403
        signature = sign("/twilio/status", params, base="http://testserver")
        accepted = await post_signed(env.client, "/twilio/status", params, signature)
        assert accepted.status_code == 200
        assert (await env.by_address(NUMBERS[0]))["status"] == "delivered"


# -- inbound replies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "keyword"),
    [
        ("退订", "退订"),
        ("stop", "STOP"),
        ("ＳＴＯＰ", "STOP"),
        ("T", "T"),
        (" td\n", "TD"),
        ("\u3000Unsubscribe", "UNSUBSCRIBE"),
    ],
)
async def test_opt_out_reply_lists_the_sender_and_is_audited(
    env: Env, body: str, keyword: str
) -> None:
    response = await post_signed(env.client, "/twilio/inbound", inbound_params(NUMBERS[1], body))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/xml")
    assert response.text.endswith("<Response/>")
    assert await env.opt_outs() == {NUMBERS[1]: "reply:tw"}
    [entry] = await env.audit_entries("optout.add")
    assert entry["subject"] == NUMBERS[1]
    data = json.loads(entry["data"])
    assert data["source"] == "reply:tw"
    assert data["keyword"] == keyword


async def test_opt_out_then_start_removes_it_and_audits_both(env: Env) -> None:
    sender = "+86 138-0013-8002"  # any spelling of the number: it is normalised
    await post_signed(env.client, "/twilio/inbound", inbound_params(sender, "退订"))
    await post_signed(env.client, "/twilio/inbound", inbound_params(sender, "STOP"))  # no change
    assert await env.opt_outs() == {NUMBERS[1]: "reply:tw"}
    response = await post_signed(env.client, "/twilio/inbound", inbound_params(sender, "start"))
    assert response.status_code == 200
    assert await env.opt_outs() == {}
    assert [e["subject"] for e in await env.audit_entries("optout.add")] == [NUMBERS[1]]
    [removed] = await env.audit_entries("optout.remove")
    assert removed["subject"] == NUMBERS[1]
    assert json.loads(removed["data"])["keyword"] == "START"
    async with env.db.engine.connect() as conn:
        assert (await audit.verify(conn)).ok


async def test_opted_out_recipient_is_suppressed_at_the_next_firing(env: Env) -> None:
    await post_signed(env.client, "/twilio/inbound", inbound_params(NUMBERS[0], "ＳＴＯＰ"))
    await env.fire("echo")
    row = await env.by_address(NUMBERS[0], channel="sim")
    assert (row["status"], row["reason"]) == ("suppressed", "opted_out")
    others = [r["status"] for r in await env.deliveries("sim") if r["address"] != NUMBERS[0]]
    assert others == ["sent", "sent"]


async def test_other_replies_change_nothing_and_log_masked(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dispatcher.server")
    before = await env.snapshot()
    for body in ("STOP please", "谢谢", "", "call me on 13800138009"):
        response = await post_signed(
            env.client, "/twilio/inbound", inbound_params(NUMBERS[2], body)
        )
        assert response.status_code == 200
        assert response.text.endswith("<Response/>")
    assert await env.snapshot() == before
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "+86138****8003" in text
    assert NUMBERS[2] not in text and "13800138009" not in text


async def test_forged_reply_is_refused(env: Env) -> None:
    params = inbound_params(NUMBERS[0], "退订")
    response = await post_signed(
        env.client, "/twilio/inbound", params, sign("/twilio/inbound", params, token="guess")
    )
    assert response.status_code == 403
    assert await env.opt_outs() == {}


# -- robustness ------------------------------------------------------------------------------


async def test_oversized_body_is_refused(env: Env) -> None:
    params = inbound_params(NUMBERS[0], "x" * 5000)  # max_body_bytes is 4096
    response = await post_signed(env.client, "/twilio/inbound", params)
    assert response.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
        for _ in range(100):
            yield b"Body=" + b"y" * 1000 + b"&"

    response = await env.client.post(
        "/twilio/status",
        content=chunks(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 413
    assert await env.opt_outs() == {}


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"AccountSid=%ff%fe", "application/x-www-form-urlencoded", 400),  # not UTF-8
        (b"\xff\xfe\x00garbage", "application/x-www-form-urlencoded", 400),
        (b"AccountSid", "application/x-www-form-urlencoded", 400),  # no '='
        (b'{"MessageSid": "SM1"}', "application/json", 415),
    ],
)
async def test_malformed_body_is_a_short_error(
    env: Env, body: bytes, content_type: str, status: int
) -> None:
    response = await env.client.post(
        "/twilio/status", content=body, headers={"content-type": content_type}
    )
    assert response.status_code == status
    assert len(response.text) < 100 and "Traceback" not in response.text


async def test_wrong_method_and_unknown_path(env: Env) -> None:
    assert (await env.client.get("/twilio/status")).status_code == 405
    assert (await env.client.post("/healthz")).status_code == 405
    assert (await env.client.get("/nowhere")).status_code == 404


async def test_a_failing_handler_answers_500_without_a_traceback(
    env: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A database that cannot be opened: a directory where the SQLite file should be.
    (tmp_path / "broken.db").mkdir()
    broken = Database.open(f"sqlite:///{tmp_path / 'broken.db'}")
    app = build_app(env.engine, broken, env.config)
    caplog.set_level(logging.ERROR, logger="dispatcher.server")
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ) as client:
            response = await post_signed(
                client, "/twilio/inbound", inbound_params(NUMBERS[0], "退订")
            )
            assert response.status_code == 500
            assert response.text == "internal error\n"
            # The app keeps answering after the failure.
            assert (await client.get("/metrics")).status_code == 200
    finally:
        await broken.close()
    [record] = [r for r in caplog.records if "/twilio/inbound failed" in r.getMessage()]
    assert record.exc_info is None  # one line, no traceback


# -- health and metrics ----------------------------------------------------------------------


async def test_healthz_ok(env: Env) -> None:
    response = await env.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "database": "ok",
        "scheduler": "running",
        "worker": env.engine.worker_id,
    }


async def test_healthz_503_when_the_database_is_unreachable(env: Env, tmp_path: Path) -> None:
    (tmp_path / "gone.db").mkdir()
    broken = Database.open(f"sqlite:///{tmp_path / 'gone.db'}")
    app = build_app(env.engine, broken, env.config)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ) as client:
            response = await client.get("/healthz")
            metrics_text = (await client.get("/metrics")).text
    finally:
        await broken.close()
    assert response.status_code == 503
    body = response.json()
    assert body["database"] == "unreachable"
    assert "database unreachable" in body["reason"]
    assert "dispatcher_database_up 0" in metrics_text.splitlines()


async def test_healthz_503_when_the_daemon_is_stopping(env: Env) -> None:
    stopping = asyncio.Event()
    app = build_app(env.engine, env.db, env.config, stopping=stopping)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        assert (await client.get("/healthz")).status_code == 200
        stopping.set()
        response = await client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["scheduler"] == "stopping"


_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\.)*",?)*)\})?'
    r" (?P<value>[-+]?([0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?|Inf|NaN))$"
)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text to {'name{labels}': value}, failing on any line that is not valid."""
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            assert name not in types, f"family {name} declared twice"
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        match = _SAMPLE.match(line)
        assert match is not None, f"not a sample line: {line!r}"
        key = line.rsplit(" ", 1)[0]
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(match["value"].replace("Inf", "inf"))
    return samples


async def test_metrics_expose_sends_receipts_queue_and_latency(env: Env) -> None:
    row = await env.by_address(NUMBERS[2])
    params = status_params(row["provider_id"], "undelivered", "30003")
    await post_signed(env.client, "/twilio/status", params)
    await post_signed(env.client, "/twilio/status", params, "forged")

    response = await env.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_metrics(response.text)
    assert m['dispatcher_sends_total{channel="tw",outcome="accepted"}'] == 3
    assert m['dispatcher_sends_total{channel="tw",outcome="failed"}'] == 0
    assert m['dispatcher_receipts_total{channel="tw",status="undelivered"}'] == 1
    assert m['dispatcher_receipt_errors_total{channel="tw",code="30003"}'] == 1
    assert m['dispatcher_deliveries{channel="tw",status="sent"}'] == 2
    assert m['dispatcher_deliveries{channel="tw",status="failed"}'] == 1
    assert m['dispatcher_deliveries{channel="tw",status="pending"}'] == 0
    assert m['dispatcher_send_latency_seconds_count{channel="tw"}'] == 3
    assert m['dispatcher_send_latency_seconds_bucket{channel="tw",le="+Inf"}'] == 3
    assert m['dispatcher_send_latency_seconds_sum{channel="tw"}'] > 0
    assert m['dispatcher_rate_limit_wait_seconds_total{channel="tw"}'] >= 0
    assert m['dispatcher_http_requests_total{route="/twilio/status",status="403"}'] == 1
    assert m["dispatcher_database_up"] == 1
    assert m["dispatcher_opt_outs"] == 0
    buckets = [
        v
        for k, v in m.items()
        if k.startswith('dispatcher_send_latency_seconds_bucket{channel="tw"')
    ]
    assert buckets == sorted(buckets)  # cumulative


# -- a real uvicorn ----------------------------------------------------------------------------


async def test_serve_on_a_real_socket(tmp_path: Path) -> None:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    async with environment(tmp_path / "site", listen=f"127.0.0.1:{port}", public_url=public) as env:
        await env.fire("blast")
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        stop = await serve(env.engine, env.db, asyncio.Event())
        try:
            assert {s: signal.getsignal(s) for s in handlers} == handlers  # the daemon's own
            async with httpx.AsyncClient(base_url=public, timeout=10) as client:
                health = await client.get("/healthz")
                assert health.status_code == 200 and health.json()["database"] == "ok"
                row = await env.by_address(NUMBERS[0])
                params = status_params(row["provider_id"], "delivered")
                signature = sign("/twilio/status", params, base=public)
                ok = await client.post(
                    "/twilio/status", data=params, headers={"X-Twilio-Signature": signature}
                )
                assert ok.status_code == 200
                assert (await env.by_address(NUMBERS[0]))["status"] == "delivered"

                async def chunks() -> AsyncIterator[bytes]:
                    for _ in range(1000):
                        yield b"Body=" + b"z" * 1000 + b"&"

                big = await client.post(
                    "/twilio/inbound",
                    content=chunks(),
                    headers={"content-type": "application/x-www-form-urlencoded"},
                )
                assert big.status_code == 413
                assert (await client.get("/healthz")).status_code == 200

            # A second endpoint on the same port is refused with a clear message.
            with pytest.raises(ConfigError, match="already in use") as refused:
                await serve(env.engine, env.db, asyncio.Event())
            assert "server.listen" in str(refused.value)
        finally:
            await stop()
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient(base_url=public, timeout=5) as client:
                await client.get("/healthz")
        assert {s: signal.getsignal(s) for s in handlers} == handlers


async def _error_reason(env: Env, delivery_id: int) -> str:
    async with env.db.engine.connect() as conn:
        value = (await conn.execute(select(D.c.error_reason).where(D.c.id == delivery_id))).scalar()
    return str(value)


def _changes(entry: dict[str, Any]) -> list[list[Any]]:
    return list(json.loads(entry["data"])["changes"])
