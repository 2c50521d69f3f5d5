"""Benchmark: count a generated audience CSV; report rows/s and peak RSS.

    .venv/bin/python bench/bench_audience_memory.py --rows 1000000

Run each size in its own process: peak RSS is a high-water mark for the whole process.
The CSV is written row by row (so writing it does not raise the peak), in GB18030 like an
Excel export on Chinese Windows, with messy numbers, invalid rows and duplicates mixed in.
"""

from __future__ import annotations

import argparse
import csv
import resource
import sys
import tempfile
import time
from pathlib import Path

from dispatcher.audience import AudienceSource, count_audience

CITIES = ("北京", "上海", "广州", "武汉", "成都", "西安")


def phone_cell(index: int) -> str:
    """Return the phone cell of row `index`: mostly clean, some messy, some bad or repeated."""
    number = f"13{index % 7 + 3}{index:08d}"
    kind = index % 20
    if kind == 1:
        return f"{number[:3]} {number[3:7]} {number[7:]}"
    if kind == 2:
        return f"+86-{number[:3]}-{number[3:7]}-{number[7:]}"
    if kind == 3:
        return f"{number}.0"
    if kind == 4:
        return f"010 6521 {index % 10000:04d}"  # landline
    if kind == 5:
        return f"13{(index - 5) % 7 + 3}{index - 5:08d}"  # the number of row index-5 again
    return number


def write_audience(path: Path, rows: int) -> None:
    """Write a `rows`-row audience CSV to `path`, one row at a time."""
    with path.open("w", encoding="gb18030", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\r\n")
        writer.writerow(["姓名", "手机", "城市", "单位"])
        for index in range(rows):
            city = CITIES[index % len(CITIES)]
            writer.writerow([f"用户{index}", phone_cell(index), city, f"{city}市质量技术监督局"])


def peak_rss_mib() -> float:
    """Return this process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    """Write the audience, count it, and print rows/s and peak RSS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="data rows to generate")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-audience-") as directory:
        path = Path(directory) / "audience.csv"
        write_audience(path, args.rows)
        size_mib = path.stat().st_size / 2**20
        rss_before = peak_rss_mib()
        started = time.perf_counter()
        counts = count_audience(AudienceSource(path, "手机", "phone"))
        elapsed = time.perf_counter() - started
    print(f"rows:        {counts.rows:,} ({size_mib:.1f} MiB file)")
    print(f"valid:       {counts.valid:,}  invalid: {counts.invalid:,}  dup: {counts.duplicates:,}")
    print(f"time:        {elapsed:.2f} s")
    print(f"rows/s:      {counts.rows / elapsed:,.0f}")
    print(f"peak RSS:    {peak_rss_mib():.1f} MiB (before counting: {rss_before:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
