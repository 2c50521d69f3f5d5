"""Benchmark: the twilio channel through the real Engine against a Twilio-compatible server.

    .venv/bin/python bench/bench_twilio.py --recipients 100000 --runs 3 [--json]

The server (tests/peers/twilio_server.py) runs as a separate process, so its CPU is not ours.
Two comparisons from the same run, each repeated `--runs` times (medians reported):

(a) server answering at once: the bare ceiling (the same HTTP client the adapter uses, the
    SDK's async client over aiohttp, sending the same messages at the same concurrency with
    no bookkeeping) versus the dispatcher's sending rate with its full per-recipient log
    (Engine + SQLite in a temp dir: in-flight mark, attempt, outcome, audit chain). Target
    ratio >= 0.7. Also shown: raw aiohttp posting the same form bodies (no SDK at all), and
    the dispatcher's rate including materialisation.
(b) server answering after 100 ms: the dispatcher's rate versus a hand-written loop over the
    SDK's synchronous client for the first 300 recipients. Target ratio >= 20.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from fake_twilio import TEMPLATE_PREFIX, twilio_fake, write_twilio_config

REPO = Path(__file__).resolve().parents[1]
ACCOUNT = "AC" + "0" * 31 + "7"
TOKEN = "bench-token"
SENDER = "+15005550006"
SDK_RECIPIENTS = 300


def address(index: int) -> str:
    """Return the E.164 number of recipient `index` (valid Chinese mobile numbers)."""
    return f"+86138{index:08d}"


def body(index: int) -> str:
    """Return the body the stage's template renders for recipient `index`."""
    return f"{TEMPLATE_PREFIX}r{index}您好"


def write_config(folder: Path, base_url: str, recipients: int, concurrency: int) -> Path:
    """Write an audience of `recipients` and a config with one twilio channel and stage."""
    return write_twilio_config(
        folder,
        base_url,
        account=ACCOUNT,
        token=TOKEN,
        sender=SENDER,
        addresses=(address(i) for i in range(recipients)),
        concurrency=concurrency,
    )


@dataclass(frozen=True)
class DispatcherRun:
    rate: float  # recipients / sending time
    end_to_end: float  # recipients / (materialisation + sending)
    materialise_s: float
    send_s: float
    commits: int


async def dispatcher_rate(base_url: str, recipients: int, concurrency: int) -> DispatcherRun:
    """Fire one stage of `recipients` through the real Engine; return its rates.

    The firing is materialised first (audience read, normalised, rendered, one row each), then
    a fresh Engine sends it: the sending rate is what the ceiling compares with, since the bare
    loop reads no audience either. The end-to-end rate is reported beside it.
    """
    from dispatcher.config.loader import load_config
    from dispatcher.engine import heap
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
        preparer = Engine(cfg, db, clock, actor="bench")
        await preparer.start(send=False)
        try:
            started = time.perf_counter()
            result = await preparer.fire(
                campaign, stage, Firing(campaign.id, stage.id, clock.now(), 0), trigger="manual"
            )
            materialise_s = time.perf_counter() - started
        finally:
            await preparer.stop()
        assert result.run_id is not None
        sender = Engine(cfg, db, clock, actor="bench")
        await sender.start(send=True)
        heap.settle()  # as `dispatcher run` does
        try:
            started = time.perf_counter()
            # The database is the only signal of "settled", but asking it 20 times a second
            # would cost the engine a twentieth of its CPU: it is asked once the workers have
            # had an answer for every recipient.
            while sum(sum(w.stats.outcomes.values()) for w in sender.workers.values()) < recipients:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            while await sender.open_deliveries([result.run_id]):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            send_s = time.perf_counter() - started
        finally:
            await sender.stop()
        async with db.engine.connect() as conn:
            (summary,) = await summaries(conn, now=clock.now(), campaign=campaign.id)
        await db.close()
    sent = summary.by_status.get("sent", 0)
    if sent != recipients:
        raise SystemExit(f"dispatcher sent {sent} of {recipients}: {summary.as_dict()}")
    return DispatcherRun(
        recipients / send_s,
        recipients / (materialise_s + send_s),
        materialise_s,
        send_s,
        sender.writer.commits,
    )


async def sdk_bare_rate(base_url: str, recipients: int, concurrency: int) -> float:
    """Send through the SDK's async client (as the adapter does), no bookkeeping; msg/s."""
    from twilio.http.async_http_client import AsyncTwilioHttpClient
    from twilio.rest import Client

    http = AsyncTwilioHttpClient(pool_connections=False)
    http.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
    client = Client(ACCOUNT, TOKEN, http_client=http)
    client.api.base_url = base_url
    indexes = iter(range(recipients))

    async def worker() -> None:
        for i in indexes:
            await client.messages.create_async(to=address(i), from_=SENDER, body=body(i))

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await http.close()
    return recipients / elapsed


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
        "bare_aiohttp": [],
        "bare_sdk": [],
        "dispatcher": [],
        "dispatcher_end_to_end": [],
        "materialise_rows_per_s": [],
        "commits": [],
        "sdk_sync": [],
        "dispatcher_100ms": [],
        "ceiling_ratio": [],
        "sdk_speedup": [],
    }
    for _ in range(args.runs):
        # One run = every measurement once, each against a fresh server; the ratios are taken
        # within the run, then their median is reported.
        with twilio_fake(ACCOUNT, TOKEN) as url:
            samples["bare_aiohttp"].append(asyncio.run(bare_rate(url, n, args.concurrency)))
        with twilio_fake(ACCOUNT, TOKEN) as url:
            samples["bare_sdk"].append(asyncio.run(sdk_bare_rate(url, n, args.concurrency)))
        with twilio_fake(ACCOUNT, TOKEN) as url:
            run = asyncio.run(dispatcher_rate(url, n, args.concurrency))
        samples["dispatcher"].append(run.rate)
        samples["dispatcher_end_to_end"].append(run.end_to_end)
        samples["materialise_rows_per_s"].append(n / run.materialise_s)
        samples["commits"].append(run.commits)
        with twilio_fake(ACCOUNT, TOKEN, latency_ms=args.latency_ms) as url:
            samples["sdk_sync"].append(sdk_rate(url, min(SDK_RECIPIENTS, n_latency)))
        with twilio_fake(ACCOUNT, TOKEN, latency_ms=args.latency_ms) as url:
            samples["dispatcher_100ms"].append(
                asyncio.run(dispatcher_rate(url, n_latency, args.concurrency)).rate
            )
        samples["ceiling_ratio"].append(samples["dispatcher"][-1] / samples["bare_sdk"][-1])
        samples["sdk_speedup"].append(samples["dispatcher_100ms"][-1] / samples["sdk_sync"][-1])
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
        "ceiling_ratio": med["ceiling_ratio"],
        "aiohttp_ratio": statistics.median(
            d / b for d, b in zip(samples["dispatcher"], samples["bare_aiohttp"], strict=True)
        ),
        "sdk_speedup": med["sdk_speedup"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"N={n} (latency run: {n_latency}), concurrency {args.concurrency}, runs {args.runs}")
    print(f"{'':34}{'msg/s':>10}")
    rows = [
        ("(a) bare aiohttp, 0 ms", f"{med['bare_aiohttp']:.0f}"),
        ("(a) bare SDK async client, 0 ms", f"{med['bare_sdk']:.0f}"),
        ("(a) dispatcher sending, 0 ms", f"{med['dispatcher']:.0f}"),
        ("(a) dispatcher incl. materialising", f"{med['dispatcher_end_to_end']:.0f}"),
        ("(a) ratio to SDK (target >= 0.7)", f"{report['ceiling_ratio']:.2f}"),
        ("(a) ratio to bare aiohttp", f"{report['aiohttp_ratio']:.2f}"),
        (f"(b) SDK sync loop, {args.latency_ms:.0f} ms", f"{med['sdk_sync']:.1f}"),
        (f"(b) dispatcher, {args.latency_ms:.0f} ms", f"{med['dispatcher_100ms']:.0f}"),
        ("(b) speed-up (target >= 20x)", f"{report['sdk_speedup']:.1f}"),
    ]
    for label, value in rows:
        print(f"{label:38}{value:>10}")


if __name__ == "__main__":
    main()
