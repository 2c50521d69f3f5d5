"""Benchmark: materialise a CSV audience into SQLite through the real Engine; rows/s, peak RSS.

    .venv/bin/python bench/bench_materialise.py [--sizes 10000,1000000] [--runs 1] [--json]

For each size a CSV of that many recipients is written once (by this process), then every run
materialises each size in a fresh child process with a fresh database: an Engine started with
`send=False` (no send workers, as `dispatcher send` without `--wait`) fires one stage and
streams the audience into one pending delivery row per recipient. Per size and run:

- rows/s: audience rows over the time `Engine.fire` takes (run creation, reading, normalising,
  rendering, inserting in batches with their checkpoints and audit entries);
- peak RSS of the child (`ru_maxrss`), and its peak before firing (imports, migrations): the
  difference is what materialising adds.

The memory ratio (peak RSS at the largest size over the smallest) is computed within each run;
the median of those ratios is reported. Target <= 1.25: memory must not grow with the audience.
`--profile` runs the children under tracemalloc and lists where the memory that grew during the
firing was allocated (slow; for diagnosis only, its timings are not figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOP_LINES = 15


def write_audience(path: Path, rows: int) -> None:
    """Write a UTF-8 audience CSV of `rows` distinct mobile numbers, one row at a time."""
    with path.open("w", encoding="utf-8") as stream:
        stream.write("手机,姓名,城市\n")
        stream.writelines(f"138{i:08d},用户{i},北京\n" for i in range(rows))


def write_config(folder: Path, audience: Path) -> Path:
    """A config with one simulator channel and one stage over `audience`, database in `folder`."""
    today = datetime.now(UTC).date()
    config = folder / "bench.toml"
    config.write_text(
        f"""
[dispatcher]
database = "sqlite:///{folder / "bench.db"}"
timezone = "Asia/Shanghai"
slogans = {json.dumps(str(REPO / "slogans"))}
campaigns = []

[server]
enabled = false

[channels.sms]
type = "simulator"
rate = 1000
receipts = false

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
columns = {{ name = "姓名", city = "城市" }}

[[campaign.stages]]
id = "blast"
channel = "sms"
audience = "public"
at = {today}T00:00:00
template = "{{{{ name }}}}您好！{{{{ city }}}}9月“质量月”主题：抓质量水平提升 促发展方式转变。"
validity = "1d"
""",
        encoding="utf-8",
    )
    return config


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def materialise_once(config_path: Path, rows: int, profile: bool) -> dict[str, Any]:
    """Fire the stage of `config_path` with no send workers; the figures of this process."""
    from dispatcher.config.loader import load_config
    from dispatcher.engine.clock import SystemClock
    from dispatcher.engine.engine import Engine
    from dispatcher.plan import Firing
    from dispatcher.store.database import Database

    cfg = load_config(config_path, env={})
    campaign, stage = cfg.find_stage("bench/blast")
    db = Database.open(cfg.database_url)
    await db.upgrade()
    clock = SystemClock()
    engine = Engine(cfg, db, clock, actor="bench")
    await engine.start(send=False)
    before_mib = peak_rss_mib()
    if profile:
        tracemalloc.start(10)
        baseline = tracemalloc.take_snapshot()
    started = time.perf_counter()
    fired = await engine.fire(campaign, stage, Firing(campaign.id, stage.id, clock.now(), 0))
    seconds = time.perf_counter() - started
    figures: dict[str, Any] = {}
    if profile:
        _, traced_peak = tracemalloc.get_traced_memory()
        grown = tracemalloc.take_snapshot().compare_to(baseline, "lineno")
        tracemalloc.stop()
        figures["traced_peak_mib"] = round(traced_peak / 2**20, 1)
        figures["grown_top"] = [str(stat) for stat in grown[:TOP_LINES]]
    await engine.stop()
    await db.close()
    made = fired.materialised
    if made is None or made.deliveries != rows:
        raise SystemExit(f"bench_materialise: expected {rows} deliveries, got {made}")
    return {
        "rows": rows,
        "deliveries": made.deliveries,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds),
        "rss_before_mib": round(before_mib, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        **figures,
    }


def run_child(audience: Path, rows: int, profile: bool) -> dict[str, Any]:
    """Materialise `audience` in a fresh process and database; its figures."""
    with tempfile.TemporaryDirectory(prefix="bench-materialise-db-") as tmp:
        config = write_config(Path(tmp), audience)
        args = [sys.executable, __file__, "--child", str(config), "--rows", str(rows)]
        child = subprocess.run(
            args + (["--profile"] if profile else []),
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
    if child.returncode != 0:
        raise SystemExit(f"bench_materialise: {rows} rows failed:\n{child.stderr}")
    result: dict[str, Any] = json.loads(child.stdout.splitlines()[-1])
    return result


def main() -> None:
    """Materialise every size in its own process, `--runs` times; print figures (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000", help="comma-separated row counts")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="tracemalloc in the children")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(materialise_once(args.child, args.rows, args.profile))))
        return

    sizes = sorted(int(size) for size in args.sizes.split(","))
    samples: dict[int, list[dict[str, Any]]] = {size: [] for size in sizes}
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-materialise-") as tmp:
        audiences = {size: Path(tmp) / f"audience-{size}.csv" for size in sizes}
        for size, path in audiences.items():
            write_audience(path, size)
        for _ in range(args.runs):
            run = {size: run_child(audiences[size], size, args.profile) for size in sizes}
            for size in sizes:
                samples[size].append(run[size])
            # Within the run: the two children ran back to back on the same machine state.
            ratios.append(run[sizes[-1]]["peak_rss_mib"] / run[sizes[0]]["peak_rss_mib"])
    median = {
        str(size): {
            key: statistics.median(s[key] for s in samples[size])
            for key in ("rows_per_s", "seconds", "rss_before_mib", "peak_rss_mib")
        }
        for size in sizes
    }
    report = {
        "sizes": sizes,
        "runs": args.runs,
        "samples": {str(size): samples[size] for size in sizes},
        "median": median,
        "memory_ratios": [round(r, 3) for r in ratios],
        "memory_ratio": round(statistics.median(ratios), 3),
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"materialise into SQLite, {args.runs} run(s), medians")
    print(f"{'rows':>10} {'rows/s':>9} {'seconds':>8} {'RSS before MiB':>15} {'peak RSS MiB':>13}")
    for size in sizes:
        m = median[str(size)]
        print(
            f"{size:>10,} {m['rows_per_s']:>9,.0f} {m['seconds']:>8.1f} "
            f"{m['rss_before_mib']:>15.1f} {m['peak_rss_mib']:>13.1f}"
        )
    print(
        f"memory ratio {sizes[-1]:,} / {sizes[0]:,}: {report['memory_ratio']:.2f} (target <= 1.25)"
    )
    if args.profile:
        for size in sizes:
            print(f"\n{size:,} rows: tracemalloc, grown during the firing (last run):")
            print("\n".join(samples[size][-1]["grown_top"]))


if __name__ == "__main__":
    main()
