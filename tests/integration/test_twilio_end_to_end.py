"""End to end, as an operator runs it: `dispatcher run` as a subprocess, a Twilio-compatible fake
on 127.0.0.1 that posts signed status callbacks back to the daemon's endpoint, `dispatcher send`
to fire stages, and a signed 退订 reply that keeps the next stage away from one number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from sqlalchemy import select
from twilio.request_validator import RequestValidator

from dispatcher import audit
from dispatcher.store.database import Database
from dispatcher.store.tables import AuditEntry, Delivery, StageRun
from tests.peers.twilio_server import TwilioServer

REPO = Path(__file__).resolve().parents[2]
SID = "AC" + "abcdef0123456789" * 2
TOKEN = "end-to-end-token-91c7"
SENDER = "+15005550006"
NUMBERS = ["+8613800138001", "+8613800138002", "+8613800138003"]
UNDELIVERABLE = NUMBERS[1]
REPLIER = NUMBERS[2]
TZ = ZoneInfo("Asia/Shanghai")

D = Delivery.__table__  # type: ignore[attr-defined]
R = StageRun.__table__  # type: ignore[attr-defined]
A = AuditEntry.__table__  # type: ignore[attr-defined]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(root: Path, *, api_base: str, port: int) -> Path:
    (root / "slogans").mkdir(parents=True)
    (root / "people.csv").write_text(
        "手机,name\n" + "".join(f"{n[3:]},P{i}\n" for i, n in enumerate(NUMBERS)), encoding="utf-8"
    )
    now = datetime.now(TZ)
    start = (now - timedelta(hours=1)).strftime("%H:%M")
    end = (now + timedelta(hours=3)).strftime("%H:%M")
    first, last = (now - timedelta(days=1)).date(), (now + timedelta(days=3)).date()
    at = (now + timedelta(days=2)).strftime("%Y-%m-%dT10:00:00")  # never due during the test
    (root / "config.toml").write_text(
        f"""
[dispatcher]
database = "sqlite:///var/dispatcher.db"
campaigns = []

[engine]
poll_interval = "100ms"
heartbeat = "1s"

[server]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"

[channels.tw]
type = "twilio"
rate = 50
account_sid = "{SID}"
auth_token = "{TOKEN}"
from = "{SENDER}"
api_base = "{api_base}"

[[campaign]]
campaign = {{ id = "qm", name = "QM", start = {first}, end = {last}, timezone = "Asia/Shanghai", send_window = {{ start = "{start}", end = "{end}" }}, unsubscribe = "回T退订" }}
audiences.people = {{ file = "people.csv", address_column = "手机" }}
stages = [
  {{ id = "opening", channel = "tw", audience = "people", at = {at}, template = "{{{{ name }}}}您好，9月是质量月" }},
  {{ id = "reminder", channel = "tw", audience = "people", at = {at}, template = "质量月提醒" }},
]
""",
        encoding="utf-8",
    )
    return root / "config.toml"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "TWILIO_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def dispatcher(*args: str, cwd: Path) -> tuple[int, str, str]:
    """Run the CLI without blocking this loop (the fake Twilio server lives on it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher.cli.main",
        *args,
        cwd=cwd,
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def daemon(config: Path, base_url: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`dispatcher run CONFIG` until the block ends, then SIGTERM; output in var/daemon.log."""
    log_path = config.parent / "daemon.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dispatcher.cli.main",
            "run",
            str(config),
            cwd=config.parent,
            env=_env(),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:

                async def healthy() -> bool:
                    assert proc.returncode is None, log_path.read_text()
                    try:
                        return (await client.get("/healthz")).status_code == 200
                    except httpx.TransportError:
                        return False

                await wait_for(healthy, within_s=60)
            yield proc
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), timeout=60)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def wait_for(check: Callable[[], Awaitable[bool]], within_s: float = 30.0) -> None:
    """Poll `check` until it holds; fail after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def deliveries(db: Database, stage: str) -> dict[str, dict[str, Any]]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(
            select(D.c.address, D.c.status, D.c.reason, D.c.error_code, D.c.provider_id)
            .join(R, R.c.id == D.c.stage_run_id)
            .where(R.c.stage == stage)
        )
        return {r.address: dict(r._mapping) for r in rows}


async def test_sends_receipts_forgery_and_an_opt_out_reply(tmp_path: Path) -> None:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    async with TwilioServer(accounts={SID: TOKEN}, callbacks=True) as twilio:
        twilio.program_delivery(UNDELIVERABLE, "undelivered", 30003)
        config = write_config(tmp_path, api_base=twilio.base_url, port=port)
        db = Database.open(f"sqlite:///{tmp_path / 'var' / 'dispatcher.db'}")
        try:
            async with (
                daemon(config, public) as proc,
                httpx.AsyncClient(base_url=public, timeout=10) as client,
            ):
                # 1. The first stage goes out; Twilio calls back; receipts settle each delivery.
                code, out, err = await dispatcher(
                    "send", str(config), "--stage", "opening", cwd=tmp_path
                )
                assert code == 0, err

                async def opening_settled() -> bool:
                    rows = await deliveries(db, "opening")
                    return len(rows) == 3 and all(
                        r["status"] in ("delivered", "failed") for r in rows.values()
                    )

                await wait_for(opening_settled)
                opening = await deliveries(db, "opening")
                assert {a: r["status"] for a, r in opening.items()} == {
                    NUMBERS[0]: "delivered",
                    UNDELIVERABLE: "failed",
                    REPLIER: "delivered",
                }
                assert opening[UNDELIVERABLE]["error_code"] == "30003"
                callbacks = twilio.callbacks_sent
                assert len(callbacks) == 6  # "sent" and a final status for each message
                assert {c.response_status for c in callbacks} == {200}
                assert {c.url for c in callbacks} == {public + "/twilio/status"}

                # 2. A forged callback is refused and changes nothing.
                sid = opening[NUMBERS[0]]["provider_id"]
                forged = {
                    "AccountSid": SID,
                    "MessageSid": sid,
                    "MessageStatus": "failed",
                    "ErrorCode": "30007",
                }
                bad_signature = RequestValidator("guessed").compute_signature(
                    public + "/twilio/status", forged
                )
                refused = await client.post(
                    "/twilio/status", data=forged, headers={"X-Twilio-Signature": bad_signature}
                )
                assert refused.status_code == 403
                assert (await deliveries(db, "opening"))[NUMBERS[0]]["status"] == "delivered"

                # 3. One recipient replies 退订 (signed as Twilio signs it).
                reply = {
                    "AccountSid": SID,
                    "ApiVersion": "2010-04-01",
                    "Body": "退订",
                    "From": REPLIER,
                    "MessageSid": "SM" + "7" * 32,
                    "To": SENDER,
                }
                signature = RequestValidator(TOKEN).compute_signature(
                    public + "/twilio/inbound", reply
                )
                answer = await client.post(
                    "/twilio/inbound", data=reply, headers={"X-Twilio-Signature": signature}
                )
                assert answer.status_code == 200
                assert answer.text.endswith("<Response/>")

                # 4. The next stage reaches everyone else, and not the one who replied.
                code, out, err = await dispatcher(
                    "send", str(config), "--stage", "reminder", cwd=tmp_path
                )
                assert code == 0, err

                async def reminder_settled() -> bool:
                    rows = await deliveries(db, "reminder")
                    return len(rows) == 3 and all(
                        r["status"] in ("delivered", "failed", "suppressed") for r in rows.values()
                    )

                await wait_for(reminder_settled)
                reminder = await deliveries(db, "reminder")
                assert (reminder[REPLIER]["status"], reminder[REPLIER]["reason"]) == (
                    "suppressed",
                    "opted_out",
                )
                assert reminder[NUMBERS[0]]["status"] == "delivered"
                assert len(twilio.messages_to(REPLIER)) == 1  # the opening only
                assert len(twilio.messages_to(NUMBERS[0])) == 2
                assert twilio.duplicates() == {}

                metrics = (await client.get("/metrics")).text
                assert 'dispatcher_sends_total{channel="tw",outcome="accepted"} 5' in metrics
                assert 'dispatcher_receipts_total{channel="tw",status="undelivered"} 2' in metrics
                assert "dispatcher_opt_outs 1" in metrics
                assert proc.returncode is None

            assert proc.returncode == 0
            log = (tmp_path / "daemon.log").read_text(encoding="utf-8")
            assert "Traceback" not in log
            for number in NUMBERS:
                assert number not in log and number[3:] not in log  # masked, always
            assert "+86138****8003 opted out" in log

            # 5. The operator sees the reply on the list, masked; the audit chain holds.
            code, out, err = await dispatcher("optout", "list", str(config), "--json", cwd=tmp_path)
            assert code == 0, err
            [listed] = [json.loads(line) for line in out.splitlines()]
            assert (listed["address"], listed["source"]) == ("+86138****8003", "reply:tw")
            async with db.engine.connect() as conn:
                verified = await audit.verify(conn)
                kinds = [r[0] for r in await conn.execute(select(A.c.kind).order_by(A.c.seq))]
                [opt_out] = (
                    await conn.execute(
                        select(A.c.subject, A.c.data).where(A.c.kind == "optout.add")
                    )
                ).all()
            assert verified.ok, verified.problem
            assert kinds[0] == "daemon.start" and kinds[-1] == "daemon.stop"
            assert opt_out.subject == REPLIER
            assert json.loads(opt_out.data)["keyword"] == "退订"
        finally:
            await db.close()


async def test_run_with_the_port_taken_exits_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, api_base="http://127.0.0.1:9", port=port)
        code, out, err = await dispatcher("run", str(config), cwd=tmp_path)
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in err
    assert "server.listen" in err and "Traceback" not in out + err
