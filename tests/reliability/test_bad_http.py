"""Bad HTTP requests: a short 2xx, 3xx or 4xx answer, never a 500, and refusals change nothing.

The endpoint of `dispatcher run` faces the internet (Twilio's callbacks and replies). Random
bytes, random form fields, wrong content types, huge or chunked bodies, invalid UTF-8 and
missing, random, forged or valid signatures go to every route, through the real app over a
real engine and SQLite database holding real deliveries (sent to the Twilio-compatible fake
in tests/peers). Every answer is below 500 and carries no traceback; every refusal (4xx)
leaves the deliveries, the opt-out list and the audit chain exactly as they were; a request
without a valid signature is always refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from starlette.datastructures import ImmutableMultiDict
from twilio.request_validator import RequestValidator

from dispatcher.config.loader import load_config
from dispatcher.engine.clock import SystemClock
from dispatcher.engine.engine import Engine
from dispatcher.plan import Firing
from dispatcher.server.app import build_app
from dispatcher.store.database import Database
from dispatcher.store.tables import AuditEntry, Delivery, OptOut
from tests.conftest import wait_until
from tests.peers.twilio_server import TwilioServer

SID = "AC" + "fedcba9876543210" * 2
TOKEN = "reliability-token-77"
SENDER = "+15005550006"
PUBLIC_URL = "https://dispatch.example.cn/hooks"
NUMBERS = ["+8613800138001", "+8613800138002", "+8613800138003"]
MAX_BODY = 4096
TWILIO_PATHS = ("/twilio/status", "/twilio/inbound")
FORM = "application/x-www-form-urlencoded"
TZ = ZoneInfo("Asia/Shanghai")

D = Delivery.__table__  # type: ignore[attr-defined]
A = AuditEntry.__table__  # type: ignore[attr-defined]
OPT = OptOut.__table__  # type: ignore[attr-defined]


def write_config(root: Path, api_base: str) -> Path:
    """One twilio channel and a stage for three numbers, sending all day."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "slogans").mkdir()
    (root / "people.csv").write_text(
        "phone,name\n" + "".join(f"{n[3:]},P{i}\n" for i, n in enumerate(NUMBERS)),
        encoding="utf-8",
    )
    now = datetime.now(TZ)
    first, last = (now - timedelta(days=1)).date(), (now + timedelta(days=3)).date()
    at = (now + timedelta(days=2)).strftime("%Y-%m-%dT10:00:00")
    (root / "config.toml").write_text(
        f"""
[dispatcher]
database = "sqlite:///var/dispatcher.db"
campaigns = []

[engine]
poll_interval = "100ms"
heartbeat = "1s"

[server]
listen = "127.0.0.1:0"
public_url = "{PUBLIC_URL}"
max_body_bytes = {MAX_BODY}

[channels.tw]
type = "twilio"
rate = 200
account_sid = "{SID}"
auth_token = "{TOKEN}"
from = "{SENDER}"
api_base = "{api_base}"

[[campaign]]
campaign = {{ id = "qm", name = "QM", start = {first}, end = {last}, timezone = "Asia/Shanghai", send_window = {{ start = "00:00", end = "23:59:59" }} }}
audiences.people = {{ file = "people.csv", address_column = "phone" }}
stages = [
  {{ id = "blast", channel = "tw", audience = "people", at = {at}, template = "质量月 {{{{ name }}}}" }},
]
""",
        encoding="utf-8",
    )
    return root / "config.toml"


@dataclass
class Env:
    db: Database
    engine: Engine
    client: httpx.AsyncClient
    provider_ids: list[str]


async def _start(root: Path, twilio: TwilioServer) -> Env:
    config = load_config(write_config(root, twilio.base_url), env={})
    db = Database.open(config.database_url)
    await db.upgrade()
    engine = Engine(config, db, SystemClock())
    await engine.start()
    campaign, stage = config.find_stage("blast")
    firing = Firing(campaign.id, stage.id, datetime.now(UTC), 0)
    result = await engine.fire(campaign, stage, firing, trigger="manual", wait=True)
    assert result.run_id is not None
    run_ids = [result.run_id]

    async def settled() -> bool:
        return await engine.open_deliveries(run_ids) == 0

    await wait_until(settled, 10, "the blast to be sent")
    async with db.engine.connect() as conn:
        ids = [r[0] for r in await conn.execute(select(D.c.provider_id).order_by(D.c.id))]
    assert len(ids) == 3 and all(ids), ids
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=build_app(engine, db, config)),
        base_url="http://testserver",
    )
    return Env(db, engine, client, ids)


async def snapshot(db: Database) -> tuple[Any, ...]:
    """Everything a request could change that matters: deliveries, opt-outs, the audit head."""
    async with db.engine.connect() as conn:
        deliveries = (await conn.execute(select(D).order_by(D.c.id))).all()
        opt_outs = (await conn.execute(select(OPT).order_by(OPT.c.address))).all()
        count = (await conn.execute(select(func.count()).select_from(A))).scalar_one()
        head = (
            await conn.execute(select(A.c.seq, A.c.hash).order_by(A.c.seq.desc()).limit(1))
        ).first()
    return [tuple(r) for r in deliveries], [tuple(r) for r in opt_outs], count, tuple(head or ())


# -- requests --------------------------------------------------------------------------------------

FIELDS = [
    "AccountSid", "MessageSid", "SmsSid", "MessageStatus", "SmsStatus", "ErrorCode", "From",
    "To", "Body", "MessagingServiceSid", "ApiVersion", "NumMedia",
]  # fmt: skip
VALUES = [
    SID, "AC" + "0" * 32, SENDER, *NUMBERS, "+86 138-0013-8009", "13800138009", "not a number",
    "delivered", "undelivered", "failed", "canceled", "sent", "queued", "DELIVERED", "bogus",
    "30003", "", "STOP", "退订", "ＳＴＯＰ", "start", "T", "td", "\x00", "a\x00b", "é" * 3,
    "\ufffd" * 3, "x" * 5000,
]  # fmt: skip


# Mostly the two webhooks, since they take bodies; every route and some wrong ones too.
TARGETS = [
    *[("POST", "/twilio/status")] * 4, *[("POST", "/twilio/inbound")] * 4, ("GET", "/healthz"),
    ("GET", "/metrics"), ("HEAD", "/metrics"), ("POST", "/healthz"), ("DELETE", "/metrics"),
    ("GET", "/twilio/status"), ("PUT", "/twilio/inbound"), ("POST", "/twilio/status/"),
    ("POST", "/nowhere"),
]  # fmt: skip
CONTENT_TYPES = [
    FORM, FORM, FORM, f"{FORM}; charset=utf-8", FORM.upper(), f"{FORM}; x", "application/json",
    "text/plain", "multipart/form-data; boundary=x", "", "garbage/;;;=",
]  # fmt: skip


@dataclass
class Probe:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None
    chunked: bool
    signed: bool  # carries the signature the account's token gives for exactly this request


@st.composite
def probes(draw: st.DrawFn, provider_ids: list[str]) -> Probe:
    method, path = draw(st.sampled_from(TARGETS))
    # Mostly what Twilio sends (so that signed requests reach the handlers), plus noise.
    base = draw(
        st.sampled_from(
            [
                [],
                [("AccountSid", SID)],
                [("AccountSid", SID), ("MessageSid", provider_ids[0]), ("MessageStatus", "failed")],
                [("AccountSid", SID), ("SmsSid", provider_ids[1]), ("SmsStatus", "delivered")],
                [("AccountSid", SID), ("From", NUMBERS[2]), ("To", SENDER), ("Body", "退订")],
            ]
        )
    )
    pairs = base + draw(
        st.lists(
            st.tuples(
                st.sampled_from(FIELDS) | st.text(max_size=8),
                st.sampled_from([*VALUES, *provider_ids]) | st.text(max_size=20),
            ),
            max_size=12,
        )
    )
    body_kind = draw(
        st.sampled_from(["form", "form", "form", "bytes", "huge", "bad utf-8", "none"])
    )
    body: bytes | None
    if body_kind == "form":
        body = urlencode(pairs).encode()
    elif body_kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif body_kind == "huge":
        body = b"Body=" + b"y" * draw(st.integers(min_value=MAX_BODY, max_value=5 * MAX_BODY))
    elif body_kind == "bad utf-8":
        body = urlencode(pairs).encode() + b"&Body=%ff%fe\xff"
    else:
        body = None
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    headers = {"content-type": content_type} if content_type else {}
    signature_kind = draw(st.sampled_from(["valid", "valid", "none", "random", "forged", "other"]))
    signed = False
    if signature_kind != "none":
        url = PUBLIC_URL + path
        params: Any = ImmutableMultiDict(pairs) if body_kind == "form" else {}
        if signature_kind == "valid":
            signature = RequestValidator(TOKEN).compute_signature(url, params)
            signed = body_kind == "form"
        elif signature_kind == "forged":
            signature = RequestValidator("guessed-token").compute_signature(url, params)
        elif signature_kind == "other":  # valid, but for the other endpoint
            other = "/twilio/inbound" if path == "/twilio/status" else "/twilio/status"
            signature = RequestValidator(TOKEN).compute_signature(PUBLIC_URL + other, params)
        else:
            signature = draw(
                st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
            )
        headers["x-twilio-signature"] = str(signature)
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        headers["content-length"] = draw(st.sampled_from(["abc", "-1", "99999999999999999999"]))
        signed = False
    chunked = body is not None and draw(st.integers(min_value=0, max_value=4)) == 0
    return Probe(method, path, headers, body, chunked, signed)


@st.composite
def signed_probes(draw: st.DrawFn, provider_ids: list[str]) -> Probe:
    """Twilio-shaped, validly signed webhook calls with random values: the handlers' own input."""
    path = draw(st.sampled_from(TWILIO_PATHS))
    values = st.sampled_from([*VALUES, *provider_ids]) | st.text(max_size=30)
    fields = draw(st.lists(st.tuples(st.sampled_from(FIELDS[1:]), values), min_size=1, max_size=8))
    pairs = [("AccountSid", SID), *fields]
    signature = RequestValidator(TOKEN).compute_signature(
        PUBLIC_URL + path, ImmutableMultiDict(pairs)
    )
    headers = {"content-type": FORM, "x-twilio-signature": str(signature)}
    chunked = draw(st.booleans())
    return Probe("POST", path, headers, urlencode(pairs).encode(), chunked, signed=True)


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 997):
        yield body[start : start + 997]


async def send(env: Env, probe: Probe) -> httpx.Response:
    content: Any = _chunks(probe.body) if probe.chunked and probe.body is not None else probe.body
    request = env.client.build_request(probe.method, probe.path, content=content)
    request.headers.update(probe.headers)
    return await env.client.send(request)


async def check(env: Env, probe: Probe) -> int:
    """Send `probe` and check the answer and the database; return the status."""
    before = await snapshot(env.db)
    response = await send(env, probe)
    after = await snapshot(env.db)
    status, text = response.status_code, response.text
    assert status < 500, (status, text, probe)
    assert "Traceback" not in text and 'File "' not in text, (text, probe)
    if 400 <= status < 500:
        assert len(text) < 200, text  # a short reason, not a dump
        assert after == before, f"refused with {status} but the database changed: {probe}"
    if probe.method == "POST" and probe.path in TWILIO_PATHS and not probe.signed:
        assert 400 <= status < 500, (status, text, probe)
    return status


@contextlib.contextmanager
def running(root: Path) -> Iterator[tuple[asyncio.Runner, Env]]:
    """The app over a started engine, in a runner whose loop stays between examples."""
    with asyncio.Runner() as runner:
        twilio = TwilioServer(accounts={SID: TOKEN})
        runner.run(twilio.start())
        try:
            env = runner.run(_start(root, twilio))
            try:
                yield runner, env
                # Still serving afterwards.
                health = runner.run(env.client.get("/healthz"))
                assert health.status_code == 200, health.text
            finally:
                runner.run(env.client.aclose())
                runner.run(env.engine.stop(timeout=5))
                runner.run(env.db.close())
        finally:
            runner.run(twilio.stop())


HTTP_FUZZ = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_any_request_gets_an_answer_below_500_and_refusals_change_nothing(tmp_path: Path) -> None:
    statuses: set[int] = set()
    with running(tmp_path / "site") as (runner, env):

        @settings(HTTP_FUZZ, max_examples=60)
        @given(probes(env.provider_ids))
        def each(probe: Probe) -> None:
            statuses.add(runner.run(check(env, probe)))

        each()
    assert {200, 403, 405, 415} <= statuses, statuses  # every kind of answer was reached


def test_signed_webhooks_with_random_values_never_fail(tmp_path: Path) -> None:
    statuses: set[int] = set()
    with running(tmp_path / "site") as (runner, env):

        @settings(HTTP_FUZZ, max_examples=40)
        @given(signed_probes(env.provider_ids))
        def each(probe: Probe) -> None:
            statuses.add(runner.run(check(env, probe)))

        each()
    assert 200 in statuses and 400 in statuses, statuses
