"""`dispatcher report` against a rehearsed database: every format's numbers against the rows.

The rehearsal's simulators are set so that the log holds every common ending: delivered,
sent without a receipt (e-mail), failed at once (21211) and failed after sending (30003).
Expected values come from the database itself, read directly with sqlite3.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tracemalloc
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import insert, select

from dispatcher import audit
from dispatcher.addresses import mask_address
from dispatcher.reports import queries
from dispatcher.reports.writers import COLUMNS, CsvWriter
from dispatcher.store.database import Database
from dispatcher.store.tables import AuditEntry, Delivery, StageRun

REPO = Path(__file__).resolve().parents[2]
CAMPAIGN = "quality-month-2010"


def dispatcher(*args: str, database: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    if database is not None:
        env["DISPATCHER_DATABASE_URL"] = f"sqlite:///{database}"
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=180,
        check=False,
    )


def copy_example(root: Path) -> Path:
    for name in ("campaigns", "slogans"):
        shutil.copytree(REPO / name, root / name)
    text = (REPO / "config.example.toml").read_text(encoding="utf-8")
    sms, email = "receipt_delay_ms = 200\nseed = 2010", "latency_ms = 50\nseed = 2010"
    assert sms in text and email in text
    text = text.replace(sms, "receipt_delay_ms = 200\nundelivered_rate = 0.1\nseed = 2010")
    text = text.replace(email, "latency_ms = 50\nreceipts = false\nseed = 2010")
    (root / "config.toml").write_text(text, encoding="utf-8")
    return root / "config.toml"


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reports")
    config = copy_example(root)
    database = root / "rehearsal.db"
    result = dispatcher("rehearse", str(config), "--keep", str(database), "--to", "2010-09-03")
    assert result.returncode == 0, result.stderr
    return config, database


@pytest.fixture
def setup(rehearsed: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """(config, a private copy of the database): reports may append to its audit log."""
    copy = tmp_path / "report.db"
    shutil.copy(rehearsed[1], copy)
    return rehearsed[0], copy


def db_rows(database: Path, where: str = "", args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(database)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(
            "SELECT d.*, r.campaign, r.stage FROM deliveries d "
            f"JOIN stage_runs r ON r.id = d.stage_run_id {where} ORDER BY d.id",
            args,
        ).fetchall()
    finally:
        conn.close()
    return [dict(r) for r in rows]


def was_sent(row: dict[str, Any]) -> bool:
    return row["sent_at"] is not None or row["status"] in ("sent", "delivered")


def utc(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def test_the_rehearsal_has_every_common_ending(rehearsed: tuple[Path, Path]) -> None:
    rows = db_rows(rehearsed[1])
    statuses = Counter(r["status"] for r in rows)
    assert statuses["delivered"] and statuses["sent"] and statuses["failed"]
    codes = {r["error_code"] for r in rows if r["status"] == "failed"}
    assert {"21211", "30003"} <= codes


def test_csv_has_every_recipient_masked_with_a_bom(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    config, database = setup
    out = tmp_path / "deliveries.csv"
    result = dispatcher(
        "report", str(config), "--format", "csv", "--out", str(out), database=database
    )
    assert result.returncode == 0, result.stderr
    raw = out.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # Excel reads UTF-8 only with the BOM
    text = raw.decode("utf-8-sig")
    records = list(csv.DictReader(io.StringIO(text, newline="")))
    assert tuple(records[0].keys()) == COLUMNS
    expected = db_rows(database)
    assert len(records) == len(expected)
    for record, row in zip(records, expected, strict=True):
        assert int(record["delivery_id"]) == row["id"]
        assert (record["campaign"], record["stage"]) == (row["campaign"], row["stage"])
        assert (record["channel"], record["status"]) == (row["channel"], row["status"])
        assert record["error_code"] == (row["error_code"] or "")
        assert record["provider_id"] == (row["provider_id"] or "")
        assert int(record["attempts"]) == row["attempts"]
        assert record["address"] == mask_address(row["address"])
        assert record["fired_at"].endswith("+08:00")
        sent = utc(row["sent_at"])
        if sent is None:
            assert record["sent_at"] == ""
        else:
            shown = datetime.fromisoformat(record["sent_at"])
            assert timedelta(0) <= sent - shown < timedelta(seconds=1)
    for row in expected:
        assert row["address"] not in text
    assert f"{len(expected)} deliveries" in result.stderr


def test_csv_on_stdout_and_jsonl_with_filters(setup: tuple[Path, Path]) -> None:
    config, database = setup
    result = dispatcher("report", str(config), "--format", "csv", database=database)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("\ufeffdelivery_id,")
    assert len(result.stdout.strip().splitlines()) == len(db_rows(database)) + 1

    for args, where, params in (
        (("--stage", "opening-blast"), "WHERE r.stage = ?", ("opening-blast",)),
        (
            ("--stage", f"{CAMPAIGN}/consultation-notice"),
            "WHERE r.stage = ?",
            ("consultation-notice",),
        ),
        (("--campaign", CAMPAIGN), "WHERE r.campaign = ?", (CAMPAIGN,)),
        (
            ("--campaign", CAMPAIGN, "--stage", "partners-kickoff"),
            "WHERE r.stage = ?",
            ("partners-kickoff",),
        ),
    ):
        result = dispatcher("report", str(config), "--format", "jsonl", *args, database=database)
        assert result.returncode == 0, result.stderr
        objects = [json.loads(line) for line in result.stdout.splitlines()]
        expected = db_rows(database, where, params)
        assert expected, args
        assert [o["delivery_id"] for o in objects] == [r["id"] for r in expected]
        assert [o["status"] for o in objects] == [r["status"] for r in expected]
        assert all(
            o["address"] == mask_address(r["address"])
            for o, r in zip(objects, expected, strict=True)
        )
        assert all(o["error_reason"] is None or isinstance(o["error_reason"], str) for o in objects)

    limited = dispatcher(
        "report", str(config), "--format", "jsonl", "--limit", "7", database=database
    )
    assert len(limited.stdout.splitlines()) == 7


def test_unknown_filters_and_formats_are_refused(setup: tuple[Path, Path]) -> None:
    config, database = setup
    for args, message in (
        (("--stage", "opening-blats"), "--stage opening-blats: no such stage"),
        (("--campaign", "quality-month-2011"), "--campaign quality-month-2011: no such campaign"),
        (("--campaign", "x", "--stage", f"{CAMPAIGN}/slogans"), "is not in --campaign x"),
        (("--format", "xlsx"), "Invalid value for '--format'"),
        (("--limit", "-1"), "Invalid value for '--limit'"),
    ):
        result = dispatcher("report", str(config), *args, database=database)
        assert result.returncode == 2, args
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_unmasked_shows_addresses_and_is_audited(setup: tuple[Path, Path]) -> None:
    config, database = setup
    result = dispatcher(
        "report", str(config), "--format", "jsonl", "--stage", "opening-blast", "--unmasked",
        database=database,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    expected = db_rows(database, "WHERE r.stage = ?", ("opening-blast",))
    assert [o["address"] for o in objects] == [r["address"] for r in expected]
    assert all(o["address"].startswith("+86") and "*" not in o["address"] for o in objects)
    assert "personal data" in result.stderr

    conn = sqlite3.connect(database)
    try:
        kind, subject, data = conn.execute(
            "SELECT kind, subject, data FROM audit_log ORDER BY seq DESC LIMIT 1"
        ).fetchone()
    finally:
        conn.close()
    assert kind == "report.unmasked" and subject == "stage opening-blast"
    assert json.loads(data)["deliveries"] == len(expected)
    verified = dispatcher("audit", "verify", str(config), database=database)
    assert verified.returncode == 0, verified.stderr


def _table_counts(stdout: str, label: str) -> list[int]:
    match = re.search(rf"^\s*{re.escape(label)}\s*│([\d│ ]+)$", stdout, re.MULTILINE)
    assert match, (label, stdout)
    return [int(cell) for cell in match.group(1).split("│")]


def test_table_summaries_match_the_database(setup: tuple[Path, Path]) -> None:
    config, database = setup
    result = dispatcher("report", str(config), database=database)
    assert result.returncode == 0, result.stderr
    rows = db_rows(database)
    out = result.stdout
    for channel in ("sms", "email"):
        mine = [r for r in rows if r["channel"] == channel]
        assert _table_counts(out, channel) == [
            len(mine),
            sum(was_sent(r) for r in mine),
            sum(r["status"] == "delivered" for r in mine),
            sum(r["status"] == "failed" for r in mine),
            sum(r["status"] == "suppressed" for r in mine),
            sum(r["status"] == "unknown" for r in mine),
            sum(r["status"] in ("pending", "claimed", "sending") for r in mine),
        ]
    assert re.search(rf"materialised\s*│\s*{len(rows)}\s*│\s*100\.0%", out)
    assert re.search(rf"sent \(accepted by provider\)\s*│\s*{sum(map(was_sent, rows))}\s*│", out)
    failures = Counter(r["error_code"] for r in rows if r["status"] == "failed")
    for code, count in failures.items():
        assert re.search(rf"sms\s*│ failed\s*│ {code}\s*│\s*{count}\s*│", out), code
    assert f"showing 100 of {len(rows)} deliveries" in out
    assert "--format csv --out deliveries.csv" in out
    for row in rows:
        assert row["address"] not in out
    assert mask_address(rows[0]["address"]) in out


def test_an_empty_database_says_so(tmp_path: Path) -> None:
    config = copy_example(tmp_path)
    missing = dispatcher("report", str(config))
    assert missing.returncode == 2
    assert "no database at" in missing.stderr and "Traceback" not in missing.stderr

    assert dispatcher("db", "upgrade", str(config)).returncode == 0
    table = dispatcher("report", str(config))
    assert table.returncode == 0, table.stderr
    assert "no deliveries recorded yet for all campaigns" in table.stderr
    out = tmp_path / "empty.csv"
    as_csv = dispatcher("report", str(config), "--format", "csv", "--out", str(out))
    assert as_csv.returncode == 0
    assert out.read_text(encoding="utf-8-sig").strip() == ",".join(COLUMNS)
    page = tmp_path / "empty.html"
    as_html = dispatcher("report", str(config), "--format", "html", "--out", str(page))
    assert as_html.returncode == 0, as_html.stderr
    assert 'id="empty-notice"' in page.read_text(encoding="utf-8")
    # A stage the config knows but that never ran is no error, only nothing to report.
    stage = dispatcher("report", str(config), "--stage", "slogans", "--format", "jsonl")
    assert stage.returncode == 0 and stage.stdout == ""
    assert "no deliveries recorded yet for stage slogans" in stage.stderr


def test_html_is_self_contained_masked_and_escaped(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    config, database = setup
    conn = sqlite3.connect(database)
    try:  # a provider's error text is data, never markup
        conn.execute(
            "UPDATE deliveries SET error_reason = ? WHERE error_code = '21211'",
            ('<script>alert("x")</script> & <b>bold</b>',),
        )
        conn.commit()
    finally:
        conn.close()
    out = tmp_path / "report.html"
    result = dispatcher(
        "report", str(config), "--format", "html", "--out", str(out), "--limit", "10",
        database=database,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    page = out.read_text(encoding="utf-8")
    rows = db_rows(database)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "<script>alert" not in page
    assert (
        f'data-metric="materialised"><div class="label">生成 Materialised</div><div class="value">{len(rows):,}<'
        in page
    )
    assert page.count('<tr data-status="') == 10
    assert f"Showing the first 10 of {len(rows):,} recipients" in page
    for row in rows:
        assert row["address"] not in page


async def test_summary_queries_agree_with_the_rows(rehearsed: tuple[Path, Path]) -> None:
    database = rehearsed[1]
    db = Database.open(f"sqlite:///{database}")
    try:
        for where in (queries.ReportFilter(), queries.ReportFilter(CAMPAIGN, "opening-blast")):
            summary = await queries.summary(db.engine, where, now=datetime.now(UTC))
            rows = db_rows(
                database, *(("WHERE r.stage = ?", (where.stage,)) if where.stage else ())
            )
            assert summary.totals.total == len(rows) == sum(summary.totals.by_status.values())
            assert summary.totals.sent == sum(map(was_sent, rows))

            regions: dict[str, Counter[str]] = {}
            for row in rows:
                regions.setdefault(queries.region_of(row["address"]), Counter())[row["status"]] += 1
            assert {r.region: r.counts.total for r in summary.regions} == {
                k: sum(v.values()) for k, v in regions.items()
            }
            assert {r.region: r.counts.delivered for r in summary.regions} == {
                k: v["delivered"] for k, v in regions.items()
            }
            assert all(re.fullmatch(r"\+86\d{3}|[a-z0-9.-]+\.[a-z]+", r) for r in regions)

            errors = Counter(
                (r["channel"], r["status"], r["error_code"]) for r in rows if r["error_code"]
            )
            assert {(e.channel, e.status, e.code): e.count for e in summary.errors} == errors

            sent_times = [utc(r["sent_at"]) for r in rows if r["sent_at"]]
            timeline = summary.timeline
            span = max(sent_times) - min(sent_times)  # type: ignore[operator,type-var]
            assert timeline.unit == ("minute" if span <= timedelta(hours=6) else "hour")
            starts = [t.replace(second=0, microsecond=0) for t in sent_times if t is not None]
            if timeline.unit == "hour":
                starts = [t.replace(minute=0) for t in starts]
            buckets = Counter(starts)
            assert dict(timeline.buckets) == buckets
        assert summary.timeline.unit == "minute"  # one stage's sends span under 6 hours
    finally:
        await db.close()


@pytest.mark.postgres
async def test_postgresql_gives_the_same_report_and_chain(
    rehearsed: tuple[Path, Path], pg_url: str
) -> None:
    """The dialect-specific SQL (domains, time buckets) agrees with SQLite's on the same rows."""
    lite = Database.open(f"sqlite:///{rehearsed[1]}")
    pg = Database.open(pg_url)
    await pg.upgrade()
    try:
        async with lite.engine.connect() as source, pg.engine.begin() as target:
            for table in (StageRun.__table__, Delivery.__table__, AuditEntry.__table__):  # type: ignore[attr-defined]
                rows = (await source.execute(select(table))).mappings().all()
                await target.execute(insert(table), [dict(r) for r in rows])
        now = datetime.now(UTC)
        for where in (queries.ReportFilter(), queries.ReportFilter(CAMPAIGN, "opening-blast")):
            on_sqlite = await queries.summary(lite.engine, where, now=now)
            on_pg = await queries.summary(pg.engine, where, now=now)
            assert on_pg == on_sqlite
            assert any("." in r.region for r in on_pg.regions) or where.stage
            rows_lite = [r async for batch in queries.iter_rows(lite.engine, where) for r in batch]
            rows_pg = [
                r async for batch in queries.iter_rows(pg.engine, where, batch=17) for r in batch
            ]
            assert rows_pg == rows_lite
        chain_lite, chain_pg = await audit.verify(lite.engine), await audit.verify(pg.engine)
        assert chain_pg.ok and chain_pg == chain_lite
    finally:
        await lite.close()
        await pg.close()


async def test_rows_stream_in_constant_memory(tmp_path: Path) -> None:
    """40,000 recipients go to CSV batch by batch; regions fold country codes of any length."""
    db = Database.open(f"sqlite:///{tmp_path / 'big.db'}")
    await db.upgrade()
    fired = datetime(2010, 9, 1, 2, tzinfo=UTC)
    async with db.engine.begin() as conn:
        run = await conn.execute(
            insert(StageRun.__table__).values(  # type: ignore[attr-defined]
                campaign=CAMPAIGN, stage="big", fire_time=fired, channel="sms", trigger="manual",
                status="ready", created_at=fired, rows_read=40_000, deliveries=40_000,
            ).returning(StageRun.__table__.c.id)  # type: ignore[attr-defined]
        )  # fmt: skip
        run_id = run.scalar_one()
        numbers = [f"+86138{i:08d}" for i in range(30_000)] + [
            f"+1415555{i:04d}" for i in range(10_000)
        ]
        await conn.execute(
            insert(Delivery.__table__),  # type: ignore[attr-defined]
            [
                {"stage_run_id": run_id, "channel": "sms", "address": number, "line": n,
                 "body": "质量月" * 20, "status": "delivered", "attempts": 1, "created_at": fired,
                 "sent_at": fired + timedelta(seconds=n // 50), "final_at": fired + timedelta(seconds=n // 50 + 5)}
                for n, number in enumerate(numbers)
            ],
        )  # fmt: skip
    where = queries.ReportFilter(CAMPAIGN, "big")
    try:
        summary = await queries.summary(db.engine, where, now=datetime.now(UTC))
        assert {r.region: r.counts.total for r in summary.regions} == {
            "+86138": 30_000,
            "+1415": 10_000,
        }
        assert summary.timeline.unit == "minute"
        assert sum(n for _, n in summary.timeline.buckets) == 40_000
        out = tmp_path / "big.csv"
        tracemalloc.start()
        try:
            with out.open("w", encoding="utf-8-sig", newline="") as stream:
                writer = CsvWriter(stream, unmasked=False, tz=ZoneInfo("Asia/Shanghai"))
                async for batch in queries.iter_rows(db.engine, where, batch=1000):
                    writer.write(batch)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        await db.close()
    assert sum(1 for _ in out.open(encoding="utf-8-sig")) == 40_001
    # Holding 40,000 rows at once takes tens of MB; one batch of 1,000 about one.
    assert peak < 8 * 1024 * 1024, peak
