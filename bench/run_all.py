"""Run every benchmark and write bench/RESULTS.md: machine, date, medians, in-run ratios.

    .venv/bin/python bench/run_all.py [--quick] [--only NAME[,NAME]] [--output PATH]

Each benchmark runs as its own subprocess with `--json` (its own `--runs 3`, or three
repetitions driven from here when it has no `--runs`), so no benchmark shares a process, an
event loop or a peak RSS with another. Every figure reported is the median of the per-run
samples; every ratio is computed within one run (both sides measured back to back in that run)
and the median of those ratios is reported, never a ratio of medians.

PostgreSQL is optional: without DISPATCHER_TEST_PG_URL the scale-out section says it was not
run. `--quick` runs small sizes once, as a smoke check; RESULTS.md then says QUICK at the top.
Benchmarks are run by hand; nothing here is a test and nothing asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PG_ENV = "DISPATCHER_TEST_PG_URL"


class BenchFailed(Exception):
    """A benchmark exited non-zero, or its output lacked what this report needs."""


@dataclass(frozen=True, slots=True)
class Options:
    quick: bool
    runs: int
    pg_url: str | None


@dataclass(slots=True)
class Section:
    """One benchmark's part of RESULTS.md."""

    name: str
    title: str
    lines: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    seconds: float = 0.0
    failed: bool = False


# -- running ---------------------------------------------------------------------------------


def shown(command: Sequence[str]) -> str:
    """The command as an operator would type it from the repository root."""
    python = Path(sys.executable)
    words = [
        os.path.relpath(python, REPO) if python.is_relative_to(REPO) else str(python),
        *command[1:],
    ]
    words = [os.path.relpath(w, REPO) if w.startswith(str(BENCH)) else w for w in words]
    return shlex.join(words)


def run_json(section: Section, script: str, args: list[str], env: dict[str, str]) -> str:
    """Run `bench/script args` and return its stdout; record the command and its time."""
    command = [sys.executable, str(BENCH / script), *args]
    started = time.perf_counter()
    child = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    section.seconds += time.perf_counter() - started
    text = shown(command)
    if PG_ENV in env:
        text = f"{PG_ENV}=<PostgreSQL URL> {text}"
    if text not in section.commands:
        section.commands.append(text)
    if child.returncode != 0:
        tail = "\n".join((child.stderr or child.stdout).strip().splitlines()[-15:])
        raise BenchFailed(f"`{text}` exited with {child.returncode}:\n\n```\n{tail}\n```")
    return child.stdout


def bench_env(pg_url: str | None = None) -> dict[str, str]:
    """Our environment, without a database URL unless one is given."""
    env = {k: v for k, v in os.environ.items() if k != PG_ENV}
    if pg_url is not None:
        env[PG_ENV] = pg_url
    return env


def need(report: dict[str, Any], *path: str) -> Any:
    """`report[path[0]][path[1]]...`, or BenchFailed naming the missing key."""
    value: Any = report
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise BenchFailed(f"the JSON output lacks the key `{'.'.join(path)}`")
        value = value[key]
    return value


# -- formatting ------------------------------------------------------------------------------


def num(value: float, digits: int = 0) -> str:
    """`value` with thousands separators and `digits` decimals."""
    return f"{value:,.{digits}f}"


def figure(samples: Sequence[float], digits: int = 0) -> str:
    """The median of `samples`, followed by the samples themselves when there are several."""
    median = num(statistics.median(samples), digits)
    if len(samples) == 1:
        return median
    return f"**{median}** ({' / '.join(num(s, digits) for s in samples)})"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-run ratios: numerators[i] / denominators[i]."""
    if len(numerators) != len(denominators):
        raise BenchFailed("per-run samples of unequal length")
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


# -- the benchmarks --------------------------------------------------------------------------


def engine_section(opts: Options, section: Section) -> None:
    """bench_engine.py: the engine's own cost per message (simulator, no latency)."""
    args = ["--recipients", "5000", "--receipts-recipients", "1000"] if opts.quick else []
    samples: dict[str, list[dict[str, Any]]] = {}
    for _ in range(opts.runs):
        out = run_json(section, "bench_engine.py", [*args, "--json"], bench_env())
        for line in out.strip().splitlines():
            item = json.loads(line)
            samples.setdefault(need(item, "mode"), []).append(item)
    rows = []
    for mode, items in samples.items():

        def col(key: str, items: list[dict[str, Any]] = items) -> list[float]:
            return [float(need(i, key)) for i in items]

        settle = [float(s) for s in (i.get("settle_s") for i in items) if s is not None]
        rows.append(
            [
                mode,
                num(items[0]["recipients"]),
                figure(col("materialise_rows_per_s")),
                figure(col("send_msgs_per_s")),
                figure(settle, 1) if settle else "-",
                figure(col("peak_rss_mib"), 1),
            ]
        )
    section.lines += table(
        ["mode", "recipients", "materialise rows/s", "send msg/s", "settled s", "peak RSS MiB"],
        rows,
    )
    section.lines += [
        "",
        "Method: the real Engine on SQLite with the simulator channel (no latency, rate cap "
        "100,000/s), so the engine's own cost per message is what is measured. Each mode runs "
        "in its own child process. *materialise* times `Engine.fire` with no send workers; "
        "*send msg/s* is recipients over the wall time from starting the send workers until "
        "all are sent; *settled* (receipts mode) until every delivery is `delivered`. "
        "No target: context for the other figures.",
    ]


def twilio_section(opts: Options, section: Section) -> None:
    """bench_twilio.py: the ceiling and SDK-loop comparisons."""
    n = "2000" if opts.quick else "100000"
    out = run_json(
        section,
        "bench_twilio.py",
        ["--recipients", n, "--runs", str(opts.runs), "--json"],
        bench_env(),
    )
    report = json.loads(out)
    samples = need(report, "samples")

    def col(key: str) -> list[float]:
        return [float(v) for v in need(samples, key)]

    vs_sdk = ratios(col("dispatcher"), col("bare_sdk"))
    vs_http = ratios(col("dispatcher"), col("bare_aiohttp"))
    speedup = ratios(col("dispatcher_100ms"), col("sdk_sync"))
    latency = f"{float(need(report, 'latency_ms')):.0f} ms"
    section.lines += table(
        ["figure", "msg/s (median, then per run)"],
        [
            [
                "(a) bare aiohttp posting the form bodies, provider at once",
                figure(col("bare_aiohttp")),
            ],
            ["(a) bare SDK async client, provider at once", figure(col("bare_sdk"))],
            ["(a) dispatcher sending, provider at once", figure(col("dispatcher"))],
            [
                "(a) dispatcher incl. materialising, provider at once",
                figure(col("dispatcher_end_to_end")),
            ],
            [
                f"(b) hand-written SDK sync loop, provider after {latency}",
                figure(col("sdk_sync"), 1),
            ],
            [f"(b) dispatcher, provider after {latency}", figure(col("dispatcher_100ms"))],
        ],
    )
    section.lines += [""]
    section.lines += table(
        ["ratio (within each run)", "median (per run)", "target", ""],
        [
            [
                "(a) dispatcher / bare SDK async client",
                figure(vs_sdk, 2),
                "≥ 0.7",
                verdict(statistics.median(vs_sdk) >= 0.7),
            ],
            [
                "(a) dispatcher / bare aiohttp",
                figure(vs_http, 2),
                "≥ 0.7",
                verdict(statistics.median(vs_http) >= 0.7),
            ],
            [
                "(b) dispatcher / SDK sync loop",
                figure(speedup, 1),
                "≥ 20",
                verdict(statistics.median(speedup) >= 20),
            ],
        ],
    )
    section.lines += [
        "",
        f"Method: {num(int(need(report, 'recipients')))} recipients for (a), "
        f"{num(int(need(report, 'latency_recipients')))} for (b) "
        f"({num(int(need(report, 'sdk_recipients')))} for the synchronous SDK loop), "
        f"concurrency {need(report, 'concurrency')}, against the Twilio-compatible fake "
        "(tests/peers/twilio_server.py) in its own process, a fresh one per measurement. "
        "The dispatcher's rate is the sending phase of the real Engine on SQLite with the "
        "`twilio` channel (the stage is materialised first, by an Engine without send workers); "
        "the bare loops post the same messages at the same concurrency with no bookkeeping. "
        "Which ceiling the 0.7 target is held against is shown for both.",
    ]


def rate_section(opts: Options, section: Section) -> None:
    """bench_rate_accuracy.py: the cap as seen from the provider."""
    args = ["--recipients", "4000"] if opts.quick else []
    out = run_json(
        section,
        "bench_rate_accuracy.py",
        [*args, "--runs", str(opts.runs), "--json"],
        bench_env(),
    )
    report = json.loads(out)
    samples = need(report, "samples")
    cap = float(need(report, "rate"))

    def col(key: str) -> list[float]:
        return [float(need(s, key)) for s in samples]

    deviation = col("deviation_pct")
    windows = col("max_window")
    section.lines += table(
        ["figure", "median (per run)", "target", ""],
        [
            ["steady rate at the provider, msg/s", figure(col("steady_rate"), 1), "", ""],
            [
                "deviation from the cap, %",
                figure(deviation, 2),
                "within ±2 %",
                verdict(abs(statistics.median(deviation)) <= 2),
            ],
            [
                "busiest 1 s window at the provider (whole run)",
                figure(windows),
                f"never > {num(cap)}",
                verdict(max(windows) <= cap) + f" (worst run: {num(max(windows))})",
            ],
            [
                "busiest 1 s window of the requests as they left the sender",
                figure(col("engine_max_window")),
                f"never > {num(cap)}",
                verdict(max(col("engine_max_window")) <= cap),
            ],
            [
                "engine process CPU while sending, % of one core",
                figure(col("engine_cpu_pct"), 1),
                "",
                "",
            ],
        ],
    )
    section.lines += [
        "",
        f"Method: {num(int(need(report, 'recipients')))} recipients through the real Engine "
        f"(SQLite) and the `twilio` channel, cap {num(cap)} msg/s, concurrency "
        f"{need(report, 'concurrency')}, to the Twilio-compatible fake answering after "
        f"{float(need(report, 'latency_ms')):.0f} ms in its own process and recording each "
        "message's arrival time (when its handler starts, in user space). The stage is "
        "materialised first, then sent by a fresh engine. The steady rate counts the messages "
        "received between the "
        f"first and last receive time, less {float(need(report, 'trim_s')):g} s at each end, "
        "over that span. The busiest window is the most messages in any window [t, t + 1 s) "
        "over the whole run; the cap must hold in every run, so the worst run decides. The "
        "sender-side window is over the attempts' `started_at`, taken at the rate limit's last "
        "check, in aiohttp's connection-ready hook right before the request is written: what "
        "the dispatcher controls. The difference between the two is the fake's own delay in "
        "stamping arrivals on a busy machine; the channel's `rate_margin` "
        f"({need(report, 'rate_margin')} here) is the room for such jitter.",
    ]


def materialise_section(opts: Options, section: Section) -> None:
    """bench_materialise.py: rows/s and peak RSS at two audience sizes."""
    args = ["--sizes", "1000,20000"] if opts.quick else []
    out = run_json(
        section,
        "bench_materialise.py",
        [*args, "--runs", str(opts.runs), "--json"],
        bench_env(),
    )
    report = json.loads(out)
    sizes = [int(s) for s in need(report, "sizes")]
    rows = []
    for size in sizes:
        items = need(report, "samples", str(size))

        def col(key: str, items: list[dict[str, Any]] = items) -> list[float]:
            return [float(need(i, key)) for i in items]

        rows.append(
            [
                num(size),
                figure(col("rows_per_s")),
                figure(col("seconds"), 1),
                figure(col("rss_before_mib"), 1),
                figure(col("peak_rss_mib"), 1),
            ]
        )
    section.lines += table(
        ["rows", "rows/s", "seconds", "peak RSS before firing MiB", "peak RSS MiB"], rows
    )
    memory = [float(r) for r in need(report, "memory_ratios")]
    section.lines += [""]
    section.lines += table(
        ["ratio (within each run)", "median (per run)", "target", ""],
        [
            [
                f"peak RSS {num(sizes[-1])} / {num(sizes[0])}",
                figure(memory, 3),
                "≤ 1.25",
                verdict(statistics.median(memory) <= 1.25),
            ]
        ],
    )
    section.lines += [
        "",
        "Method: one stage over a generated UTF-8 CSV (distinct mobile numbers, two template "
        "fields) materialised into a fresh SQLite database by the real Engine started without "
        "send workers; each size runs in a fresh child process so its peak RSS "
        "(`ru_maxrss`) is its own. Timed: `Engine.fire` (run creation, streaming read, "
        "normalisation, rendering, batched inserts with checkpoints). Writing the CSV is not "
        "timed and happens in the parent.",
    ]


AUDIENCE_ROWS = re.compile(r"^rows/s:\s+([\d,]+)", re.MULTILINE)
AUDIENCE_RSS = re.compile(r"^peak RSS:\s+([\d.]+) MiB", re.MULTILINE)


def audience_section(opts: Options, section: Section) -> None:
    """bench_audience_memory.py (text output): the streaming CSV reader alone."""
    sizes = (1_000, 20_000) if opts.quick else (10_000, 1_000_000)
    samples: dict[int, list[tuple[float, float]]] = {size: [] for size in sizes}
    for _ in range(opts.runs):
        for size in sizes:
            out = run_json(section, "bench_audience_memory.py", ["--rows", str(size)], bench_env())
            rate, rss = AUDIENCE_ROWS.search(out), AUDIENCE_RSS.search(out)
            if rate is None or rss is None:
                raise BenchFailed("bench_audience_memory.py printed no `rows/s:` or `peak RSS:`")
            samples[size].append((float(rate.group(1).replace(",", "")), float(rss.group(1))))
    section.lines += table(
        ["rows", "rows/s", "peak RSS MiB"],
        [
            [num(size), figure([s[0] for s in items]), figure([s[1] for s in items], 1)]
            for size, items in samples.items()
        ],
    )
    memory = ratios([s[1] for s in samples[sizes[1]]], [s[1] for s in samples[sizes[0]]])
    section.lines += [""]
    section.lines += table(
        ["ratio (within each run)", "median (per run)", "target", ""],
        [
            [
                f"peak RSS {num(sizes[1])} / {num(sizes[0])}",
                figure(memory, 3),
                "≤ 1.25",
                verdict(statistics.median(memory) <= 1.25),
            ]
        ],
    )
    section.lines += [
        "",
        "Method: `count_audience` over a generated GB18030 CSV with messy, invalid and "
        "repeated numbers (the audience reader alone, no database), each size in its own "
        "process. This script has no `--json` or `--runs`: its text output is parsed and it "
        "is repeated from here.",
    ]


def scale_section(opts: Options, section: Section) -> None:
    """bench_scale.py: one versus three `dispatcher run` processes on PostgreSQL."""
    if opts.pg_url is None:
        section.lines += [f"Not run: set {PG_ENV} to a PostgreSQL database URL."]
        return
    args = ["--recipients", "2000"] if opts.quick else []
    phases: dict[int, list[dict[str, Any]]] = {1: [], 3: []}
    for _ in range(opts.runs):
        out = run_json(section, "bench_scale.py", [*args, "--json"], bench_env(opts.pg_url))
        report = json.loads(out.strip().splitlines()[-1])
        for phase in need(report, "phases"):
            phases[int(need(phase, "workers"))].append(phase)
    rates = {w: [float(need(p, "rate")) for p in items] for w, items in phases.items()}
    scaling = ratios(rates[3], rates[1])
    recipients = int(need(phases[1][0], "recipients"))
    section.lines += table(
        ["workers", "sent msg/s (median, then per run)", "seconds"],
        [
            [str(w), figure(rates[w]), figure([float(need(p, "seconds")) for p in phases[w]], 1)]
            for w in (1, 3)
        ],
    )
    section.lines += [""]
    section.lines += table(
        ["ratio (within each run)", "median (per run)", "target", ""],
        [
            [
                "three workers / one worker",
                figure(scaling, 2),
                "≥ 2.5",
                verdict(statistics.median(scaling) >= 2.5),
            ]
        ],
    )
    section.lines += [
        "",
        f"Method: {num(recipients)} recipients, `dispatcher run` processes on one fresh "
        "PostgreSQL database per phase, the `twilio` channel to the Twilio-compatible fake "
        f"({float(need(report, 'latency_ms')):.0f} ms latency, concurrency "
        f"{need(report, 'concurrency')} per worker, cap 100,000/s: the per-worker ceiling is "
        f"{int(need(report, 'concurrency')) / float(need(report, 'latency_ms')) * 1000:.0f}/s, "
        "so more workers should send more). The rate is sent messages over the time "
        "from the first `sent_at` to the last. bench_scale.py has no `--runs`: it is repeated "
        "from here, and the ratio is taken within each repetition.",
    ]


BENCHMARKS: dict[str, tuple[str, Callable[[Options, Section], None]]] = {
    "engine": ("Engine throughput (simulator)", engine_section),
    "twilio": ("Twilio channel: ceiling and SDK loop", twilio_section),
    "rate": ("Rate accuracy at the cap", rate_section),
    "materialise": ("Materialisation: rows/s and memory", materialise_section),
    "audience": ("Audience reader: rows/s and memory", audience_section),
    "scale": ("Scale-out on PostgreSQL: one vs three workers", scale_section),
}


# -- the machine -----------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return ""


def postgres_version(pg_url: str | None) -> str:
    """The server version at `pg_url`, or why there is none."""
    if pg_url is None:
        return f"not configured ({PG_ENV} unset)"
    try:
        import psycopg

        with psycopg.connect(pg_url, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "unknown"
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"


def git_revision() -> str:
    """The commit benchmarked, and whether the tree had changes on top of it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (with uncommitted changes)" if dirty else head


def machine(pg_url: str | None) -> list[tuple[str, str]]:
    """What the figures were measured on."""
    cpu = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.MULTILINE)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    os_name = re.search(r'^PRETTY_NAME="?([^"\n]+)', _read("/etc/os-release"), re.MULTILINE)
    return [
        ("CPU", cpu.group(1).strip() if cpu else platform.processor() or "unknown"),
        ("cores", str(os.cpu_count())),
        ("RAM", f"{int(mem.group(1)) / 2**20:.1f} GiB" if mem else "unknown"),
        ("OS", f"{os_name.group(1) if os_name else platform.system()}, {platform.release()}"),
        ("Python", platform.python_version()),
        ("SQLite", sqlite3.sqlite_version),
        ("PostgreSQL", postgres_version(pg_url)),
        ("commit", git_revision()),
    ]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


# -- the report ------------------------------------------------------------------------------


def render(
    opts: Options,
    sections: list[Section],
    *,
    started: datetime,
    load_before: str,
    only: list[str] | None,
) -> str:
    """RESULTS.md as text."""
    total = sum(s.seconds for s in sections)
    invoked = shown([sys.executable, str(Path(sys.argv[0]).resolve()), *sys.argv[1:]])
    lines = ["# Benchmark results", ""]
    if opts.quick:
        lines += [
            "> **QUICK run**: small sizes, one run each, a smoke check of the benchmarks. "
            "Not for quoting: run `make bench` for the figures.",
            "",
        ]
    lines += [
        f"Date: {started.strftime('%Y-%m-%d %H:%M')} UTC. Command: `{invoked}`. "
        f"Total benchmark time: {total / 60:.1f} min.",
        "",
    ]
    if only:
        lines += [f"Only: {', '.join(only)} (the other benchmarks were not run).", ""]
    lines += table(["machine", ""], machine(opts.pg_url))
    lines += [
        "",
        f"Load average (1 / 5 / 15 min) before: {load_before}; after: {load()}. "
        "Other processes on the machine share its cores with the benchmarks.",
        "",
        f"How to read the figures: each is the **median** of {opts.runs} run(s), with the "
        "per-run samples after it in parentheses. Each **ratio** is computed within one run "
        "(both sides measured back to back in that run), and the median of those per-run "
        "ratios is reported, not a ratio of medians. Targets are from issue #7. Benchmarks "
        "are run by hand and never asserted in tests.",
        "",
    ]
    for section in sections:
        lines += [f"## {section.title}", ""]
        lines += section.lines
        if section.commands:
            lines += ["", "Reproduce:", ""]
            lines += [f"    {c}" for c in section.commands]
            if opts.runs > 1 and section.name in ("engine", "audience", "scale"):
                lines += ["", f"(repeated {opts.runs} times by run_all.py)"]
        if section.seconds:
            took = section.seconds
            lines += ["", f"Took {took:.0f} s." if took < 120 else f"Took {took / 60:.1f} min."]
        lines += [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks, write the report; exit 1 if any benchmark failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: a smoke check")
    parser.add_argument(
        "--only", help=f"comma-separated benchmarks to run (of: {', '.join(BENCHMARKS)})"
    )
    parser.add_argument("--runs", type=int, help="runs per benchmark (default 3, quick 1)")
    parser.add_argument("--output", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    unknown = [name for name in only or () if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    opts = Options(
        quick=args.quick,
        runs=args.runs or (1 if args.quick else 3),
        pg_url=os.environ.get(PG_ENV) or None,
    )
    started, load_before = datetime.now(UTC), load()
    sections = []
    for name, (title, bench) in BENCHMARKS.items():
        if only is not None and name not in only:
            continue
        section = Section(name, title)
        print(f"run_all: {name} ...", file=sys.stderr, flush=True)
        try:
            bench(opts, section)
        except BenchFailed as exc:
            section.failed = True
            section.lines = [f"**Failed**: {exc}"]
        print(
            f"run_all: {name} {'FAILED' if section.failed else 'done'} in {section.seconds:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        sections.append(section)
    text = render(opts, sections, started=started, load_before=load_before, only=only)
    args.output.write_text(text, encoding="utf-8")
    print(f"run_all: wrote {args.output}", file=sys.stderr)
    return 1 if any(s.failed for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
