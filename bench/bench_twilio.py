"""Benchmark: the twilio channel through the real Engine against a Twilio-compatible server.

    .venv/bin/python bench/bench_twilio.py --recipients 100000 --runs 3 [--json]

The server (tests/peers/twilio_server.py) runs as a separate process, so its CPU is not ours.
Two comparisons from the same run, each repeated `--runs` times (medians reported):

(a) server answering at once: the bare ceiling (aiohttp, as the SDK uses, posting the same
    form bodies at the same concurrency with no bookkeeping) versus the dispatcher's rate
    with its full per-recipient log (Engine + SQLite in a temp dir). Target ratio >= 0.7.
(b) server answering after 100 ms: the dispatcher's rate versus a hand-written loop over the
    SDK's synchronous client for the first 300 recipients. Target ratio >= 20.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
ACCOUNT = "AC" + "0" * 31 + "7"
TOKEN = "bench-token"
SENDER = "+15005550006"
TEMPLATE_PREFIX = "质量月宣传："
SDK_RECIPIENTS = 300


def address(index: int) -> str:
    """Return the E.164 number of recipient `index` (valid Chinese mobile numbers)."""
    return f"+86138{index:08d}"


def body(index: int) -> str:
    """Return the body the stage's template renders for recipient `index`."""
    return f"{TEMPLATE_PREFIX}r{index}您好"


@contextmanager
def twilio_server(latency_ms: float) -> Iterator[str]:
    """Start the Twilio-compatible server as a subprocess; yield its base URL."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.peers.twilio_server",
            "--port",
            "0",
            "--print-port",
            "--account",
            f"{ACCOUNT}:{TOKEN}",
            "--latency-ms",
            str(latency_ms),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def write_config(folder: Path, base_url: str, recipients: int, concurrency: int) -> Path:
    """Write an audience of `recipients` and a config with one twilio channel and stage."""
    audience = folder / "audience.csv"
    with audience.open("w", encoding="utf-8") as stream:
        stream.write("address,name\n")
        stream.writelines(f"{address(i)},r{i}\n" for i in range(recipients))
    today = datetime.now(UTC).date()
    config = folder / "bench.toml"
    config.write_text(
        f"""
[dispatcher]
database = "sqlite:///{folder / "bench.db"}"
timezone = "UTC"
slogans = {json.dumps(str(REPO / "slogans"))}
campaigns = []

[engine]
poll_interval = "100ms"

[server]
enabled = false

[channels.sms]
type = "twilio"
rate = 100000
concurrency = {concurrency}
account_sid = "{ACCOUNT}"
auth_token = "{TOKEN}"
from = "{SENDER}"
api_base = "{base_url}"
status_callback = false
max_connections = {concurrency}

[[campaign]]
[campaign.campaign]
id = "bench"
name = "bench"
timezone = "UTC"
start = {today - timedelta(days=1)}
end = {today + timedelta(days=1)}
send_window = {{ start = "00:00", end = "23:59" }}

[campaign.audiences.people]
file = "{audience}"
kind = "phone"
address_column = "address"
region = "CN"
columns = {{ name = "name" }}

[[campaign.stages]]
id = "blast"
channel = "sms"
audience = "people"
at = {today}T00:00:00
template = "{TEMPLATE_PREFIX}{{{{ name }}}}您好"
validity = "1d"
""",
        encoding="utf-8",
    )
    return config


@dataclass(frozen=True)
class DispatcherRun:
    rate: float
    sent: int
    seconds: float


async def dispatcher_rate(base_url: str, recipients: int, concurrency: int) -> DispatcherRun:
    """Fire one stage of `recipients` through the real Engine; return its end-to-end rate."""
    from dispatcher.config.loader import load_config
    from dispatcher.engine.clock import SystemClock
    from dispatcher.engine.engine import Engine
    from dispatcher.plan import Firing
    from dispatcher.reports.status import summaries
    from dispatcher.store.database import Database

    with tempfile.TemporaryDirectory(prefix="bench-twilio-") as tmp:
        cfg = load_config(write_config(Path(tmp), base_url, recipients, concurrency))
        campaign, stage = cfg.find_stage("bench/blast")
        db = Database.open(cfg.database_url)
        await db.upgrade()
        clock = SystemClock()
        engine = Engine(cfg, db, clock, actor="bench")
        await engine.start(send=True)
        try:
            started = time.perf_counter()
            result = await engine.fire(
                campaign, stage, Firing(campaign.id, stage.id, clock.now(), 0), trigger="manual"
            )
            assert result.run_id is not None
            # The database is the only signal of "settled": poll it.
            while await engine.open_deliveries([result.run_id]):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
        finally:
            await engine.stop()
        async with db.engine.connect() as conn:
            (summary,) = await summaries(conn, now=clock.now(), campaign=campaign.id)
        await db.close()
    sent = summary.by_status.get("sent", 0)
    if sent != recipients:
        raise SystemExit(f"dispatcher sent {sent} of {recipients}: {summary.as_dict()}")
    return DispatcherRun(recipients / elapsed, sent, elapsed)


async def bare_rate(base_url: str, recipients: int, concurrency: int) -> float:
    """Post the same form bodies with aiohttp at `concurrency`, no bookkeeping; return msg/s."""
    url = f"{base_url}/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
    auth = "Basic " + base64.b64encode(f"{ACCOUNT}:{TOKEN}".encode()).decode()
    indexes = iter(range(recipients))
    failures = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        for i in indexes:
            form = {"To": address(i), "From": SENDER, "Body": body(i)}
            async with session.post(url, data=form, headers={"Authorization": auth}) as resp:
                await resp.read()
                failures += resp.status != 201

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"bare loop: {failures} requests not answered 201")
    return recipients / elapsed


def sdk_rate(base_url: str, recipients: int) -> float:
    """Send `recipients` one by one through the SDK's synchronous client; return msg/s."""
    from twilio.rest import Client

    client = Client(ACCOUNT, TOKEN)
    client.api.base_url = base_url
    started = time.perf_counter()
    for i in range(recipients):
        client.messages.create(to=address(i), from_=SENDER, body=body(i))
    return recipients / (time.perf_counter() - started)


def main() -> None:
    """Run the comparisons and print a table (or JSON) of medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument(
        "--latency-recipients", type=int, help="recipients of (b) (default: min(N, 10000))"
    )
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    n = args.recipients
    n_latency = args.latency_recipients or min(n, 10_000)

    samples: dict[str, list[float]] = {
        "bare": [],
        "dispatcher": [],
        "sdk": [],
        "dispatcher_100ms": [],
    }
    for _ in range(args.runs):
        with twilio_server(0) as url:
            samples["bare"].append(asyncio.run(bare_rate(url, n, args.concurrency)))
        with twilio_server(0) as url:
            samples["dispatcher"].append(
                asyncio.run(dispatcher_rate(url, n, args.concurrency)).rate
            )
        with twilio_server(args.latency_ms) as url:
            samples["sdk"].append(sdk_rate(url, min(SDK_RECIPIENTS, n_latency)))
        with twilio_server(args.latency_ms) as url:
            samples["dispatcher_100ms"].append(
                asyncio.run(dispatcher_rate(url, n_latency, args.concurrency)).rate
            )
    med = {k: statistics.median(v) for k, v in samples.items()}
    report = {
        "recipients": n,
        "latency_recipients": n_latency,
        "sdk_recipients": min(SDK_RECIPIENTS, n_latency),
        "concurrency": args.concurrency,
        "latency_ms": args.latency_ms,
        "runs": args.runs,
        "samples": samples,
        "median": med,
        "ceiling_ratio": med["dispatcher"] / med["bare"],
        "sdk_speedup": med["dispatcher_100ms"] / med["sdk"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"N={n} (latency run: {n_latency}), concurrency {args.concurrency}, runs {args.runs}")
    print(f"{'':34}{'msg/s':>10}")
    print(f"{'(a) bare aiohttp ceiling, 0 ms':34}{med['bare']:>10.0f}")
    print(f"{'(a) dispatcher, 0 ms':34}{med['dispatcher']:>10.0f}")
    print(f"{'(a) ratio (target >= 0.7)':34}{report['ceiling_ratio']:>10.2f}")
    ms = f"{args.latency_ms:.0f} ms"
    print(f"{'(b) SDK sync loop, ' + ms:34}{med['sdk']:>10.1f}")
    print(f"{'(b) dispatcher, ' + ms:34}{med['dispatcher_100ms']:>10.0f}")
    print(f"{'(b) speed-up (target >= 20x)':34}{report['sdk_speedup']:>10.1f}")


if __name__ == "__main__":
    main()
