"""Benchmark: send rate of one `dispatcher run` process versus three, on one PostgreSQL database.

    DISPATCHER_TEST_PG_URL=postgresql://... .venv/bin/python bench/bench_scale.py \\
        [--recipients 10000] [--latency-ms 100] [--concurrency 10] [--provider twilio] [--json]

The provider is not the limit: the Twilio-compatible fake (a separate process) or the
simulator channel answers every request after `--latency-ms`, the channel's rate cap is
100,000/s, and each worker sends at most `--concurrency` messages at once, so a worker's
ceiling is concurrency / latency (100/s with the defaults: 100 ms is a realistic provider round
trip) and more workers should send more. The default concurrency keeps three workers,
PostgreSQL and the fake within two cores: at 20 per worker and 50 ms this machine's CPU, not the
design, becomes the limit of the three-worker phase.
Each phase gets a fresh database (created on the server at DISPATCHER_TEST_PG_URL, dropped
afterwards) and a stage set to fire a little after every daemon is up, so the newcomers'
start delay is not measured. The rate is sent messages over the time from the first send to
the last (the deliveries' `sent_at`). Target: three workers >= 2.5 x one worker.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO
from zoneinfo import ZoneInfo

import psycopg

REPO = Path(__file__).resolve().parents[1]
SID = "AC" + "b3" * 16
TOKEN = "bench-token"
SENDER = "+15005550006"
TZ = "Asia/Shanghai"
OPEN = ("pending", "claimed", "sending")
LEAD_S = 20.0  # the stage fires this long after the daemons are launched


@dataclass(frozen=True, slots=True)
class Phase:
    workers: int
    recipients: int
    sent: int
    other: dict[str, int]
    seconds: float
    rate: float
    materialise_s: float


def env(database_url: str | None = None) -> dict[str, str]:
    """Our environment minus anything that would redirect a child, plus the database URL."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "TWILIO_"))}
    out["PYTHONUNBUFFERED"] = "1"
    if database_url is not None:
        out["DISPATCHER_DATABASE_URL"] = database_url
    return out


class Child:
    """A subprocess whose output goes to files in `logs`."""

    def __init__(self, args: list[str], *, cwd: Path, logs: Path, name: str, env: dict[str, str]):
        self.out_path = logs / f"{name}.out"
        self.err_path = logs / f"{name}.err"
        self._out: IO[bytes] = self.out_path.open("wb")
        self._err: IO[bytes] = self.err_path.open("wb")
        self.process = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._out, stderr=self._err)

    def text(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()
        self._err.close()
        return self.process.returncode


def started(daemon: Child) -> bool:
    """Whether `daemon` says it runs (or has exited)."""
    return "dispatcher running" in daemon.text() or daemon.process.poll() is not None


def wait(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `condition()` until true; raise naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_scale: timed out waiting for {what}")
        time.sleep(0.2)


@contextmanager
def fresh_database(base: str) -> Iterator[str]:
    """A new, empty database on the server of `base`, dropped afterwards."""
    name = f"dispatcher_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def twilio_fake(logs: Path, latency_ms: float) -> Iterator[str]:
    """The Twilio-compatible fake in its own process; yields its base URL."""
    fake = Child(
        [
            sys.executable,
            "-m",
            "tests.peers.twilio_server",
            "--port",
            "0",
            "--print-port",
            "--account",
            f"{SID}:{TOKEN}",
            "--latency-ms",
            str(latency_ms),
        ],
        cwd=REPO,
        logs=logs,
        name="twilio",
        env=env(),
    )
    try:
        wait(
            lambda: fake.out_path.read_text().strip() or fake.process.poll() is not None,
            30,
            "the Twilio fake",
        )
        if fake.process.poll() is not None:
            raise SystemExit(f"bench_scale: the Twilio fake exited:\n{fake.text()}")
        yield f"http://127.0.0.1:{int(fake.out_path.read_text().split()[0])}"
    finally:
        fake.stop()


def write_config(
    root: Path, *, recipients: int, at: datetime, channel: str, concurrency: int
) -> Path:
    """A configuration with one stage firing at `at` (local, naive) on channel `sms`."""
    (root / "slogans").mkdir(parents=True, exist_ok=True)
    rows = ["name,phone"] + [f"用户{i},+{8613900000000 + i}" for i in range(recipients)]
    (root / "people.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    day = at.date()
    (root / "campaign.toml").write_text(
        f"""
[campaign]
id = "bench"
name = "bench"
timezone = "{TZ}"
start = {day - timedelta(days=1)}
end = {day + timedelta(days=1)}
send_window = {{ start = "00:00", end = "23:59:59.999999" }}

[audiences.people]
file = "people.csv"
kind = "phone"
address_column = "phone"
region = "CN"
columns = {{ name = "name" }}

[[stages]]
id = "blast"
channel = "sms"
audience = "people"
at = {at.replace(microsecond=0).isoformat()}
template = "{{{{ name }}}}您好！9月是全国“质量月”。"
grace = "1h"
validity = "12h"
""",
        encoding="utf-8",
    )
    (root / "dispatcher.toml").write_text(
        f"""
[dispatcher]
timezone = "{TZ}"
slogans = "slogans"
campaigns = ["campaign.toml"]

[server]
enabled = false

[engine]
heartbeat = "1s"
lease = "10s"
poll_interval = "200ms"

[channels.sms]
rate = 100000
concurrency = {concurrency}
{channel}
""",
        encoding="utf-8",
    )
    return root / "dispatcher.toml"


def counts(database_url: str) -> tuple[dict[str, int], float | None, float | None]:
    """Deliveries by status, seconds from the first send to the last, and to materialise."""
    with psycopg.connect(database_url) as conn:
        by_status: dict[str, int] = dict(
            conn.execute("SELECT status, count(*) FROM deliveries GROUP BY status").fetchall()
        )
        first, last = conn.execute(
            "SELECT min(sent_at), max(sent_at) FROM deliveries WHERE status = 'sent'"
        ).fetchone() or (None, None)
        made = conn.execute("SELECT max(created_at) - min(created_at) FROM deliveries").fetchone()
    span = (last - first).total_seconds() if first is not None and last is not None else None
    return by_status, span, made[0].total_seconds() if made and made[0] is not None else None


def phase(args: argparse.Namespace, workers: int, channel: str, work: Path) -> Phase:
    """Send `args.recipients` messages with `workers` daemons; return the measured rate."""
    with fresh_database(args.pg_url) as database_url:
        at = datetime.now(ZoneInfo(TZ)).replace(tzinfo=None) + timedelta(seconds=LEAD_S)
        config = write_config(
            work,
            recipients=args.recipients,
            at=at,
            channel=channel,
            concurrency=args.concurrency,
        )
        daemons = [
            Child(
                [sys.executable, "-m", "dispatcher.cli.main", "run", str(config), "--no-server"],
                cwd=work,
                logs=work,
                name=f"w{workers}-{i}",
                env=env(database_url),
            )
            for i in range(workers)
        ]
        try:
            for daemon in daemons:
                wait(functools.partial(started, daemon), 60, "a daemon to start")
                if daemon.process.poll() is not None:
                    raise SystemExit(f"bench_scale: a daemon exited:\n{daemon.text()}")
            if datetime.now(ZoneInfo(TZ)).replace(tzinfo=None) > at:
                print(
                    "bench_scale: warning: a daemon started after the stage fired", file=sys.stderr
                )

            def done() -> bool:
                by_status, _, _ = counts(database_url)
                total = sum(by_status.values())
                return total == args.recipients and not any(by_status.get(s) for s in OPEN)

            wait(done, LEAD_S + args.recipients / 10 + 120, "the stage to be sent")
            by_status, span, made = counts(database_url)
        finally:
            for daemon in daemons:
                daemon.stop()
    sent = by_status.pop("sent", 0)
    seconds = span or float("nan")
    return Phase(
        workers, args.recipients, sent, by_status, seconds, sent / seconds, made or float("nan")
    )


def main() -> None:
    """Measure one worker, then three, and print both rates and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=10, help="per worker")
    parser.add_argument("--provider", choices=("twilio", "simulator"), default="twilio")
    parser.add_argument("--pg-url", default=os.environ.get("DISPATCHER_TEST_PG_URL"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.pg_url:
        raise SystemExit("bench_scale: set DISPATCHER_TEST_PG_URL (or --pg-url) to a PostgreSQL")

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for workers in (1, 3):
            work = Path(tmp) / f"workers{workers}"
            work.mkdir()
            if args.provider == "twilio":
                with twilio_fake(work, args.latency_ms) as api_base:
                    channel = (
                        f'type = "twilio"\naccount_sid = "{SID}"\nauth_token = "{TOKEN}"\n'
                        f'from = "{SENDER}"\napi_base = "{api_base}"\nstatus_callback = false\n'
                    )
                    results.append(phase(args, workers, channel, work))
            else:
                channel = f'type = "simulator"\nlatency_ms = {args.latency_ms}\nreceipts = false\n'
                results.append(phase(args, workers, channel, work))

    one, three = results
    ratio = three.rate / one.rate
    if args.json:
        settings = {
            "provider": args.provider,
            "latency_ms": args.latency_ms,
            "concurrency": args.concurrency,
            "recipients": args.recipients,
        }
        print(json.dumps({**settings, "phases": [asdict(p) for p in results], "ratio": ratio}))
        return
    ceiling = args.concurrency / (args.latency_ms / 1000)
    print(
        f"provider {args.provider}, latency {args.latency_ms:.0f} ms, concurrency "
        f"{args.concurrency}/worker (ceiling {ceiling:.0f}/s per worker), "
        f"{args.recipients} recipients"
    )
    for p in results:
        extra = f" (also {p.other})" if p.other else ""
        print(
            f"  {p.workers} worker(s): {p.sent} sent in {p.seconds:.1f} s = {p.rate:.0f}/s"
            f" (materialised in {p.materialise_s:.1f} s){extra}"
        )
    print(f"  ratio 3/1: {ratio:.2f} (target >= 2.5)")


if __name__ == "__main__":
    main()
