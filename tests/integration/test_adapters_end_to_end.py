"""Each channel adapter end to end: `dispatcher send CONFIG --stage ID --wait` as a subprocess.

The far side (Twilio-compatible API, SMTP server, webhook receiver, SMSC) runs in this process
on a background thread with its own event loop, bound to a free port on 127.0.0.1; the CLI runs
as a real subprocess against it. The checks read `dispatcher status --json`, the database's
attempts and opt-outs, and what the peer received.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiosmtpd.smtp import SMTP as SmtpServer
from aiosmtpd.smtp import Envelope, Session

from tests.peers.smsc_server import FakeSmsc, ReceiptPlan
from tests.peers.twilio_server import TwilioServer

REPO = Path(__file__).resolve().parents[2]
ACCOUNT = "AC" + "0" * 31 + "1"
TOKEN = "e2e-token"
CLI_TIMEOUT_S = 60.0

T = TypeVar("T")


class LoopThread:
    """An event loop on a daemon thread, for peers the CLI subprocess must reach."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run `coro` on the peer loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the peer loop (peers are not thread-safe) and return its result."""

        async def wrapped() -> T:
            return fn()

        return self.run(wrapped())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def peer_loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    try:
        yield loop
    finally:
        loop.close()


# -- configuration ------------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value), ensure_ascii=False)


def write_config(
    tmp_path: Path,
    *,
    channel_type: str,
    channel_settings: dict[str, object],
    kind: str,
    addresses: list[str],
    stage_extra: str = "",
    template: str = "{{ name }}您好：质量月活动9月开始。",
) -> Path:
    """Write the audience CSV and a main config with one channel and one inline campaign."""
    audience = tmp_path / "audience.csv"
    audience.write_text(
        "address,name\n" + "".join(f"{a},r{i}\n" for i, a in enumerate(addresses)),
        encoding="utf-8",
    )
    today = datetime.now(UTC).date()
    settings = "\n".join(f"{k} = {_toml_value(v)}" for k, v in channel_settings.items())
    region = 'region = "CN"\n' if kind == "phone" else ""
    config = tmp_path / "dispatcher.toml"
    config.write_text(
        f"""
[dispatcher]
database = "sqlite:///{tmp_path / "e2e.db"}"
timezone = "UTC"
slogans = {json.dumps(str(REPO / "slogans"))}
campaigns = []

[engine]
backoff_base = "100ms"
backoff_max = "500ms"
max_attempts = 3
poll_interval = "100ms"
heartbeat = "1s"

[server]
enabled = false

[channels.out]
type = "{channel_type}"
rate = 1000
concurrency = 10
{settings}

[[campaign]]
[campaign.campaign]
id = "e2e"
name = "端到端"
timezone = "UTC"
start = {today - timedelta(days=1)}
end = {today + timedelta(days=1)}
send_window = {{ start = "00:00", end = "23:59" }}

[campaign.audiences.people]
file = "{audience}"
kind = "{kind}"
address_column = "address"
{region}columns = {{ name = "name" }}

[[campaign.stages]]
id = "go"
channel = "out"
audience = "people"
at = {today}T00:00:00
template = {json.dumps(template, ensure_ascii=False)}
validity = "1d"
{stage_extra}
""",
        encoding="utf-8",
    )
    return config


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the dispatcher CLI as a subprocess and return its completed process."""
    env = {k: v for k, v in os.environ.items() if k != "DISPATCHER_DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def send_and_status(config: Path) -> dict[str, Any]:
    """Send stage `go` with --wait, then return the one stage run of `status --json`."""
    sent = cli("send", str(config), "--stage", "go", "--wait", cwd=config.parent)
    assert sent.returncode == 0, sent.stderr + sent.stdout
    return status_of(config)


def status_of(config: Path) -> dict[str, Any]:
    """Return the single stage run reported by `dispatcher status --json`."""
    shown = cli("status", str(config), "--json", cwd=config.parent)
    assert shown.returncode == 0, shown.stderr
    runs = [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]
    assert len(runs) == 1, runs
    run: dict[str, Any] = runs[0]
    assert run["adds_up"], run
    return run


def deliveries(config: Path) -> dict[str, dict[str, Any]]:
    """Return every delivery row keyed by address, with its attempts' outcomes in order."""
    with sqlite3.connect(config.parent / "e2e.db") as db:
        db.row_factory = sqlite3.Row
        rows = {r["address"]: dict(r) for r in db.execute("SELECT * FROM deliveries")}
        for row in rows.values():
            row["outcomes"] = [
                a["outcome"]
                for a in db.execute(
                    "SELECT outcome FROM attempts WHERE delivery_id = ? ORDER BY number",
                    (row["id"],),
                )
            ]
    return rows


def opt_outs(config: Path) -> set[str]:
    with sqlite3.connect(config.parent / "e2e.db") as db:
        return {r[0] for r in db.execute("SELECT address FROM opt_outs")}


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


# -- twilio -------------------------------------------------------------------------------------

OK_1, OK_2, OK_3 = "+8613800138001", "+8613800138002", "+8613800138003"
BAD_NUMBER, OPTED_OUT, THROTTLED, BROKEN = (
    "+8613800138011",
    "+8613800138012",
    "+8613800138013",
    "+8613800138014",
)


def test_twilio_end_to_end(tmp_path: Path, peer_loop: LoopThread) -> None:
    # A 2 s Retry-After gives the test ample time to lift the throttle after its first hit.
    server = TwilioServer({ACCOUNT: TOKEN}, retry_after="2")
    peer_loop.run(server.start())
    try:
        peer_loop.call(lambda: server.program_error(BAD_NUMBER, 21211))
        peer_loop.call(lambda: server.program_error(OPTED_OUT, 21610))
        peer_loop.call(lambda: server.program_fault(THROTTLED, "throttle"))
        peer_loop.call(lambda: server.program_fault(BROKEN, "server_error"))
        config = write_config(
            tmp_path,
            channel_type="twilio",
            channel_settings={
                "account_sid": ACCOUNT,
                "auth_token": TOKEN,
                "from": "+15005550006",
                "api_base": server.base_url,
                "status_callback": False,
                "timeout_s": 5,
            },
            kind="phone",
            addresses=[OK_1, OK_2, OK_3, BAD_NUMBER, OPTED_OUT, THROTTLED, BROKEN],
        )

        def lift_throttle_after_first_hit() -> None:
            wait_for(lambda: peer_loop.call(lambda: server.stats["throttle"]) >= 1, 30)
            peer_loop.call(lambda: server._faults.pop(THROTTLED, None))

        lifter = threading.Thread(target=lift_throttle_after_first_hit, daemon=True)
        lifter.start()
        run = send_and_status(config)
        lifter.join(1)

        assert run["deliveries"] == 7
        assert run["by_status"]["sent"] == 4, run
        assert run["by_status"]["failed"] == 2, run
        assert run["by_status"]["suppressed"] == 1, run

        got = peer_loop.call(lambda: {m.to: m.body for m in server.messages})
        assert set(got) == {OK_1, OK_2, OK_3, THROTTLED}
        assert got[OK_1] == "r0您好：质量月活动9月开始。"
        assert not peer_loop.call(server.duplicates)

        rows = deliveries(config)
        assert rows[BAD_NUMBER]["status"] == "failed"
        assert rows[BAD_NUMBER]["error_code"] == "21211"
        assert rows[OPTED_OUT]["status"] == "suppressed"
        assert rows[OPTED_OUT]["reason"] == "opted_out"
        assert OPTED_OUT in opt_outs(config)
        assert rows[THROTTLED]["status"] == "sent"
        assert rows[THROTTLED]["outcomes"] == ["retry", "accepted"]
        assert rows[BROKEN]["status"] == "failed"
        assert rows[BROKEN]["outcomes"] == ["retry", "retry", "retry"]
    finally:
        peer_loop.run(server.stop())


# -- smtp ---------------------------------------------------------------------------------------

SUBJECT = "抓质量水平提升 促发展方式转变"


@dataclass
class SmtpHandler:
    """Records what the server took; answers programmed RCPT replies per address."""

    rcpt_replies: dict[str, str]
    received: list[tuple[list[str], EmailMessage]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    async def handle_RCPT(
        self,
        server: SmtpServer,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address in self.rcpt_replies:
            self.refused.append(address)
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SmtpServer, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.received.append((list(envelope.rcpt_tos), message))
        return "250 accepted"


def test_smtp_end_to_end(tmp_path: Path, peer_loop: LoopThread) -> None:
    handler = SmtpHandler(
        {"bad@example.cn": "550 5.1.1 no such user", "busy@example.cn": "451 4.3.0 try again later"}
    )

    async def start() -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: SmtpServer(handler, hostname="peer.test", loop=loop), "127.0.0.1", 0
        )

    server = peer_loop.run(start())
    port = server.sockets[0].getsockname()[1]
    try:
        good = ["a@example.cn", "b@example.cn", "c@example.cn"]
        config = write_config(
            tmp_path,
            channel_type="smtp",
            channel_settings={
                "host": "127.0.0.1",
                "port": port,
                "security": "none",
                "from": "质量月组委会 <noreply@example.cn>",
                "timeout_s": 5,
            },
            kind="email",
            addresses=[*good, "bad@example.cn", "busy@example.cn"],
            stage_extra=f"subject = {json.dumps(SUBJECT, ensure_ascii=False)}",
        )
        run = send_and_status(config)
        assert run["by_status"]["sent"] == 3, run
        assert run["by_status"]["failed"] == 2, run

        received = peer_loop.call(lambda: list(handler.received))
        assert sorted(r[0][0] for r in received) == good
        for rcpt, message in received:
            assert message["Subject"] == SUBJECT
            index = good.index(rcpt[0])
            assert message.get_content().strip() == f"r{index}您好：质量月活动9月开始。"

        rows = deliveries(config)
        assert rows["bad@example.cn"]["outcomes"] == ["failed"]
        assert "550" in (rows["bad@example.cn"]["error_code"] or "")
        assert rows["busy@example.cn"]["outcomes"] == ["retry", "retry", "retry"]
        assert peer_loop.call(lambda: handler.refused.count("busy@example.cn")) == 3
    finally:
        server.close()
        peer_loop.run(server.wait_closed())


# -- webhook ------------------------------------------------------------------------------------


@dataclass
class WebhookPeer:
    """Records JSON bodies; answers a programmed status per recipient address."""

    statuses: dict[str, int]
    bodies: list[Any] = field(default_factory=list)
    hits: dict[str, int] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        to = str(payload.get("address"))
        self.hits[to] = self.hits.get(to, 0) + 1
        status = self.statuses.get(to, 200)
        if status == 200:
            self.bodies.append(payload)
            return web.json_response({"ok": True})
        return web.json_response({"error": "nope"}, status=status)


def test_webhook_end_to_end(tmp_path: Path, peer_loop: LoopThread) -> None:
    missing, broken = "+8613800138021", "+8613800138022"
    peer = WebhookPeer({missing: 404, broken: 500})

    async def start() -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_post("/hook", peer.handle)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        return runner, sock.getsockname()[1]

    runner, port = peer_loop.run(start())
    try:
        config = write_config(
            tmp_path,
            channel_type="webhook",
            channel_settings={"url": f"http://127.0.0.1:{port}/hook", "timeout_s": 5},
            kind="phone",
            addresses=[OK_1, OK_2, missing, broken],
        )
        run = send_and_status(config)
        assert run["by_status"]["sent"] == 2, run
        assert run["by_status"]["failed"] == 2, run

        bodies = peer_loop.call(lambda: list(peer.bodies))
        assert sorted(b["address"] for b in bodies) == [OK_1, OK_2]
        assert {b["body"] for b in bodies} == {
            "r0您好：质量月活动9月开始。",
            "r1您好：质量月活动9月开始。",
        }
        rows = deliveries(config)
        assert rows[missing]["outcomes"] == ["failed"]
        assert rows[broken]["outcomes"] == ["retry", "retry", "retry"]
        assert peer_loop.call(lambda: dict(peer.hits)) == {OK_1: 1, OK_2: 1, missing: 1, broken: 3}
    finally:
        peer_loop.run(runner.cleanup())


# -- smpp ---------------------------------------------------------------------------------------

ESME_RINVDSTADR = 0x0B
ESME_RTHROTTLED = 0x58
LONG_TEXT = (
    "{{ name }}您好：2010年全国“质量月”活动于9月1日开始，主题是“抓质量水平提升，促发展方式转变”。"
    "各地将开展现场咨询、免费检测和真假鉴定等活动，欢迎踊跃参加。"
)


def test_smpp_end_to_end(tmp_path: Path, peer_loop: LoopThread) -> None:
    smsc = FakeSmsc(system_id="dispatcher", password="s3cret")
    port = peer_loop.run(smsc.start())
    throttled, invalid = "+8613800138031", "+8613800138032"
    try:
        peer_loop.call(lambda: smsc.program_status(throttled, ESME_RTHROTTLED))
        peer_loop.call(lambda: smsc.program_status(invalid, ESME_RINVDSTADR))
        peer_loop.call(lambda: setattr(smsc, "default_receipt", ReceiptPlan(stat="DELIVRD")))
        config = write_config(
            tmp_path,
            channel_type="smpp",
            channel_settings={
                "host": "127.0.0.1",
                "port": port,
                "system_id": "dispatcher",
                "password": "s3cret",
                "source_addr": "10690000",
            },
            kind="phone",
            addresses=[OK_1, OK_2, throttled, invalid],
            template=LONG_TEXT,
            stage_extra="max_segments = 4",
        )
        sent = cli("send", str(config), "--stage", "go", "--wait", cwd=tmp_path)
        assert sent.returncode == 0, sent.stderr + sent.stdout

        def settled() -> bool:
            run = status_of(config)
            by_status: dict[str, int] = run["by_status"]
            return by_status["delivered"] == 3 and by_status["failed"] == 1

        wait_for(settled, 10)
        expected = LONG_TEXT.replace("{{ name }}", "r0")
        messages = peer_loop.call(lambda: list(smsc.messages))
        by_dest = {m.destination: m for m in messages}
        assert set(by_dest) == {"8613800138001", "8613800138002", "8613800138031"}
        assert by_dest["8613800138001"].text == expected
        assert len(by_dest["8613800138001"].parts) > 1  # concatenated, reassembled by the SMSC

        rows = deliveries(config)
        assert rows[throttled]["outcomes"] == ["retry", "accepted"]
        assert rows[invalid]["outcomes"] == ["failed"]
        assert rows[OK_1]["status"] == "delivered"
    finally:
        peer_loop.run(smsc.stop())
