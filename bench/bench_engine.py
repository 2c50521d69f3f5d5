"""Benchmark: the real Engine on SQLite sending N recipients through the simulator channel.

    .venv/bin/python bench/bench_engine.py [--recipients 100000] [--concurrency 200] [--json]

Two modes, each in its own child process (so peak RSS is that mode's alone): `plain` (the
simulator accepts at once, no receipts) and `receipts` (every message also gets a delivery
receipt, applied through the same group-commit writer). Per mode:

- materialise: streaming the CSV into one pending delivery row per recipient (rows/s);
- send: claiming, pacing, marking in flight, calling the simulator and recording every outcome
  (msg/s, from the first to the last `sent_at`, and over the wall time of the send phase);
- settle (receipts mode): until every delivery is `delivered`;
- peak RSS of the process.

The receipts mode runs on `--receipts-recipients` (default 10,000): the simulator hands its
receipts to the engine one at a time, each awaiting its durable commit, so receipts settle at
the commit rate (a few hundred a second), not at the send rate.

The rate is set to the highest the configuration allows (100,000/s) and the simulator has no
latency, so what is measured is the engine's own cost per message. Figures are for the notes;
nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODES = ("plain", "receipts")


def write_config(folder: Path, recipients: int, concurrency: int, receipts: bool) -> Path:
    """An audience of `recipients` mobile numbers and a config with one simulator channel."""
    audience = folder / "audience.csv"
    with audience.open("w", encoding="utf-8") as stream:
        stream.write("手机,姓名\n")
        stream.writelines(f"138{i:08d},用户{i}\n" for i in range(recipients))
    today = datetime.now(UTC).date()
    config = folder / "bench.toml"
    config.write_text(
        f"""
[dispatcher]
database = "sqlite:///{folder / "bench.db"}"
timezone = "Asia/Shanghai"
slogans = {json.dumps(str(REPO / "slogans"))}
campaigns = []

[engine]
batch_size = 1000
poll_interval = "100ms"

[server]
enabled = false

[channels.sms]
type = "simulator"
rate = 100000
concurrency = {concurrency}
receipts = {"true" if receipts else "false"}
seed = 2010

[[campaign]]
[campaign.campaign]
id = "bench"
name = "bench"
start = {today - timedelta(days=1)}
end = {today + timedelta(days=1)}
send_window = {{ start = "00:00", end = "23:59:59.999999" }}

[campaign.audiences.public]
file = {json.dumps(str(audience))}
kind = "phone"
address_column = "手机"
columns = {{ name = "姓名" }}

[[campaign.stages]]
id = "blast"
channel = "sms"
audience = "public"
at = {today}T00:00:00
template = "{{{{ name }}}}您好！9月是全国“质量月”，主题：抓质量水平提升 促发展方式转变。"
validity = "1d"
""",
        encoding="utf-8",
    )
    return config


async def _wait(condition: Any, what: str, limit_s: float = 3600) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def run_mode(mode: str, recipients: int, concurrency: int) -> dict[str, Any]:
    """Materialise, then send, `recipients` through a fresh Engine and database; the figures."""
    from sqlalchemy import func, select

    from dispatcher.channels.simulator import SimulatorChannel
    from dispatcher.config.loader import load_config
    from dispatcher.engine.clock import SystemClock
    from dispatcher.engine.engine import Engine
    from dispatcher.plan import Firing
    from dispatcher.store.database import Database
    from dispatcher.store.tables import Delivery

    d = Delivery.__table__  # type: ignore[attr-defined]
    receipts = mode == "receipts"
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        cfg = load_config(write_config(Path(tmp), recipients, concurrency, receipts), env={})
        campaign, stage = cfg.find_stage("bench/blast")
        db = Database.open(cfg.database_url)
        await db.upgrade()
        clock = SystemClock()

        # Phase 1: materialise only (no send workers), as `dispatcher send` without --wait does.
        planner = Engine(cfg, db, clock, actor="bench")
        await planner.start(send=False)
        started = time.perf_counter()
        fired = await planner.fire(campaign, stage, Firing(campaign.id, stage.id, clock.now(), 0))
        materialise_s = time.perf_counter() - started
        await planner.stop()
        assert fired.materialised is not None and fired.materialised.deliveries == recipients

        # Phase 2: send what is pending, as a daemon would.
        engine = Engine(cfg, db, clock, actor="bench")
        started = time.perf_counter()
        await engine.start()
        channel = engine.channels["sms"]
        assert isinstance(channel, SimulatorChannel)
        worker = engine.workers["sms"]
        await _wait(lambda: worker.stats.sent + worker.stats.failed >= recipients, "the sends")
        send_wall_s = time.perf_counter() - started
        settle_s = None
        if receipts:
            await _wait(lambda: channel.receipts_delivered >= recipients, "the receipts")
            settle_s = time.perf_counter() - started
        await engine.stop()
        async with db.engine.connect() as conn:
            counts: dict[str, int] = dict(
                (await conn.execute(select(d.c.status, func.count()).group_by(d.c.status))).all()
            )
            first, last = (
                await conn.execute(select(func.min(d.c.sent_at), func.max(d.c.sent_at)))
            ).one()
        await db.close()
    final = "delivered" if receipts else "sent"
    if counts.get(final) != recipients:
        raise SystemExit(f"{mode}: expected {recipients} {final}, got {counts}")
    first_dt = d.c.sent_at.type.process_result_value(first, None)
    last_dt = d.c.sent_at.type.process_result_value(last, None)
    sent_span_s = (last_dt - first_dt).total_seconds()
    return {
        "mode": mode,
        "recipients": recipients,
        "concurrency": concurrency,
        "materialise_s": round(materialise_s, 2),
        "materialise_rows_per_s": round(recipients / materialise_s),
        "send_wall_s": round(send_wall_s, 2),
        "send_msgs_per_s": round(recipients / send_wall_s),
        "sent_at_span_s": round(sent_span_s, 2),
        "sent_at_msgs_per_s": round(recipients / sent_span_s) if sent_span_s > 0 else None,
        "settle_s": round(settle_s, 2) if settle_s is not None else None,
        "writer_commits": engine.writer.commits,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "statuses": counts,
    }


def main() -> None:
    """Run each mode in a child process and print a table (or JSON lines)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument("--receipts-recipients", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--modes", default=",".join(MODES), help="plain,receipts (default: both)")
    parser.add_argument("--json", action="store_true", help="one JSON object per mode")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(run_mode(args.child, args.recipients, args.concurrency))))
        return
    results = []
    for mode in args.modes.split(","):
        n = (
            min(args.recipients, args.receipts_recipients)
            if mode == "receipts"
            else args.recipients
        )
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--recipients",
                str(n),
                "--concurrency",
                str(args.concurrency),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{child.stderr}")
        results.append(json.loads(child.stdout.splitlines()[-1]))
    if args.json:
        for item in results:
            print(json.dumps(item))
        return
    print(f"concurrency {args.concurrency}, SQLite, simulator with no latency")
    header = (
        f"{'mode':<9} {'recipients':>10} {'materialise rows/s':>19} {'send msg/s':>11} "
        f"{'sent_at msg/s':>14} "
        f"{'settled s':>10} {'commits':>8} {'peak RSS MiB':>13}"
    )
    print(header)
    for r in results:
        settled = f"{r['settle_s']:.1f}" if r["settle_s"] is not None else "-"
        print(
            f"{r['mode']:<9} {r['recipients']:>10,} {r['materialise_rows_per_s']:>19,} "
            f"{r['send_msgs_per_s']:>11,} "
            f"{r['sent_at_msgs_per_s'] or 0:>14,} {settled:>10} {r['writer_commits']:>8,} "
            f"{r['peak_rss_mib']:>13}"
        )


if __name__ == "__main__":
    main()
