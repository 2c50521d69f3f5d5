"""The HTML report as a browser shows it: headless Chromium loads the file, runs its script,
lays out its charts, and the numbers in the resulting DOM match the database.

Chromium gets no network to speak of (its background services are off, and the page asks for
nothing); the page must work from the file alone. Without Chromium the test skips, unless
DISPATCHER_REQUIRE_CHROMIUM=1 (CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIMIT = 25


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    reason = "chromium is not installed (apt-get install chromium)"
    if os.environ.get("DISPATCHER_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"{reason}, and DISPATCHER_REQUIRE_CHROMIUM=1 requires it")
    pytest.skip(reason)


def chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--hide-scrollbars",
            f"--user-data-dir={profile}", *args,
        ],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
    )  # fmt: skip


def dispatcher(*args: str, database: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["DISPATCHER_DATABASE_URL"] = f"sqlite:///{database}"
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


class Dom(HTMLParser):
    """The elements of a dumped DOM with their attributes, and the text inside each id'd one."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        wanted = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [
            a for t, a in self.elements
            if t == tag and all(a.get(k) == v or (v == "*" and k in a) for k, v in wanted.items())
        ]  # fmt: skip

    def one(self, tag: str, **attrs: str) -> dict[str, str]:
        found = self.find(tag, **attrs)
        assert len(found) == 1, (tag, attrs, found)
        return found[0]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the HTML report, its database) for the campaign's first days, rehearsed."""
    root = tmp_path_factory.mktemp("html")
    for name in ("campaigns", "slogans"):
        shutil.copytree(REPO / name, root / name)
    text = (REPO / "config.example.toml").read_text(encoding="utf-8")
    # Some messages fail after sending, so that every funnel step differs.
    text = text.replace(
        "receipt_delay_ms = 200\n", "receipt_delay_ms = 200\nundelivered_rate = 0.1\n"
    )
    (root / "config.toml").write_text(text, encoding="utf-8")
    database = root / "rehearsal.db"
    rehearsal = dispatcher(
        "rehearse", str(root / "config.toml"), "--keep", str(database), "--to", "2010-09-03",
        database=database,
    )  # fmt: skip
    assert rehearsal.returncode == 0, rehearsal.stderr
    page = root / "report.html"
    result = dispatcher(
        "report", str(root / "config.toml"), "--format", "html", "--out", str(page),
        "--limit", str(LIMIT), database=database,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return page, database


def database_truth(database: Path) -> dict[str, object]:
    conn = sqlite3.connect(database)
    try:
        rows = conn.execute("SELECT channel, status, sent_at FROM deliveries").fetchall()
    finally:
        conn.close()
    statuses = Counter(status for _, status, _ in rows)
    sent_times = [datetime.fromisoformat(s).replace(tzinfo=UTC) for _, _, s in rows if s]
    span = max(sent_times) - min(sent_times)
    starts = [t.replace(second=0, microsecond=0) for t in sent_times]
    if span > timedelta(hours=6):
        starts = [t.replace(minute=0) for t in starts]
    return {
        "total": len(rows),
        "sent": sum(1 for _, status, s in rows if s or status in ("sent", "delivered")),
        "statuses": statuses,
        "channels": Counter(channel for channel, _, _ in rows),
        "buckets": Counter(starts),
    }


def test_the_report_renders_in_chromium_with_the_databases_numbers(
    report: tuple[Path, Path], tmp_path: Path
) -> None:
    binary = chromium_path()
    page, database = report
    result = chromium(binary, tmp_path / "profile", "--dump-dom", page.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    dom = Dom()
    dom.feed(result.stdout)
    truth = database_truth(database)

    # The inline script ran to its end, after the browser laid out both charts.
    assert dom.one("body").get("data-ready") == "true"
    assert dom.one("svg", id="funnel-chart").get("data-drawn") == "true"
    assert dom.one("svg", id="timeline-chart").get("data-drawn") == "true"

    statuses = truth["statuses"]
    assert isinstance(statuses, Counter)
    funnel = {a["data-step"]: int(a["data-count"]) for a in dom.find("rect", class_="funnel-bar")}
    assert funnel == {
        "materialised": truth["total"],
        "sent": truth["sent"],
        "delivered": statuses["delivered"],
    }
    assert funnel["materialised"] > funnel["sent"] > funnel["delivered"] > 0
    outcome = {
        a["data-status"]: int(a["data-count"]) for a in dom.find("rect", class_="outcome-seg")
    }
    assert outcome["failed"] == statuses["failed"] and outcome["delivered"] == statuses["delivered"]
    assert sum(outcome.values()) == truth["total"]

    bars = dom.find("rect", class_="time-bar")
    buckets = truth["buckets"]
    assert isinstance(buckets, Counter)
    assert len(bars) == len(buckets)
    by_start = {
        datetime.fromisoformat(a["data-start"]).astimezone(UTC): int(a["data-count"]) for a in bars
    }
    assert by_start == dict(buckets)
    assert all(float(a["height"]) > 0 for a in bars)

    channels = {a["data-channel"]: int(a["data-total"]) for a in dom.find("tr", data_channel="*")}
    assert channels == dict(truth["channels"])  # type: ignore[call-overload]
    assert len(dom.find("tr", data_status="*")) == LIMIT
    assert dom.find("p", id="rows-capped")
    assert dom.find("select", id="status-filter")


def test_the_report_reads_well_as_a_picture(report: tuple[Path, Path], tmp_path: Path) -> None:
    binary = chromium_path()
    page, _ = report
    shot = tmp_path / "report.png"
    result = chromium(
        binary,
        tmp_path / "profile",
        "--window-size=1280,2000",
        f"--screenshot={shot}",
        page.as_uri(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 2000)
    # A page of text, tables and coloured charts compresses far worse than a blank one (~10 kB).
    assert len(data) > 30_000, len(data)
    if os.environ.get("DISPATCHER_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["DISPATCHER_KEEP_SCREENSHOT"])
