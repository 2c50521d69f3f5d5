"""Migrations: a database made by an earlier revision upgrades with its rows, and the schema they
build is the one the models describe (so a model change without its migration fails here)."""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, event

from dispatcher.store import queue, sqlite_writes
from dispatcher.store.database import MIGRATIONS, Database, upgrade_sync
from dispatcher.store.tables import metadata


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


HEAD = "0003"


def test_a_first_revision_database_upgrades_with_its_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0001")
    conn = sqlite3.connect(tmp_path / "old.db")
    conn.execute(
        "INSERT INTO stage_runs (id, campaign, stage, fire_time, firing_index, channel, trigger,"
        " status, created_at, rows_read, invalid, duplicates, deliveries, checkpoint_line)"
        " VALUES (1, 'c', 's', '2010-08-31 01:00:00.000000', 0, 'sms', 'manual', 'ready',"
        " '2010-08-31 01:00:00.000000', 1, 0, 0, 1, 1)"
    )
    conn.execute(
        "INSERT INTO deliveries (stage_run_id, channel, address, line, body, encoding, segments,"
        " status, attempts, created_at) VALUES (1, 'sms', '+8613800000000', 2, 'x', 'GSM-7', 1,"
        " 'pending', 0, '2010-08-31 01:00:00.000000')"
    )
    conn.commit()
    conn.close()

    upgrade_sync(url)

    conn = sqlite3.connect(tmp_path / "old.db")
    try:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (HEAD,)
        assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (1,)
        # Both claims (see queue.claim) read one range of the due index, in its order.
        for claim in (sqlite_writes._CLAIM_UNTIMED, sqlite_writes._CLAIM_DUE):
            plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + claim, _nulls(claim))]
            assert any("ix_deliveries_due" in step for step in plan), plan
            assert not any("TEMP B-TREE" in step for step in plan), plan
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(deliveries)")}
        assert "ix_deliveries_leased" in indexes
    finally:
        conn.close()


async def test_housekeeping_reads_only_leased_rows_and_sends_update_by_id(tmp_path: Path) -> None:
    """The heartbeat's lease statements go through the leased-rows index (a condition on status
    alone read the whole table, every 5 s), and the index does not draw the sends' updates
    away from the primary key (SQLite has no statistics to choose by)."""
    path = tmp_path / "plans.db"
    upgrade_sync(f"sqlite:///{path}")
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO stage_runs (id, campaign, stage, fire_time, firing_index, channel, trigger,"
        " status, created_at, rows_read, invalid, duplicates, deliveries, checkpoint_line)"
        " VALUES (1, 'c', 's', '2010-08-31 01:00:00.000000', 0, 'sms', 'manual', 'ready',"
        " '2010-08-31 01:00:00.000000', 0, 0, 0, 0, 0)"
    )
    # Due from the firing's time, as the materialiser writes them; the first without a due time,
    # so that a claim runs both its statements.
    conn.executemany(
        "INSERT INTO deliveries (stage_run_id, channel, address, line, body, encoding, segments,"
        " status, attempts, created_at, not_before) VALUES (1, 'sms', ?, ?, 'x', 'GSM-7', 1,"
        " 'pending', 0, '2010-08-31 01:00:00.000000', ?)",
        [(f"+86138{i:08d}", i, "2010-08-31 01:00:00.000000" if i else None) for i in range(2000)],
    )
    conn.commit()

    statements: list[tuple[str, Any]] = []
    db = Database.open(f"sqlite:///{path}")

    @event.listens_for(db.engine.sync_engine, "before_cursor_execute")
    def record(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, many: bool) -> None:
        statements.append((statement, params[0] if many else params))

    now = datetime(2010, 8, 31, 1, 0, tzinfo=UTC)
    later = now + timedelta(minutes=5)
    try:
        async with db.engine.begin() as aconn:
            claimed = await queue.claim(
                aconn, channel="sms", owner="w1", now=now, lease_until=later, limit=4
            )
            ids = [row.id for row in claimed]
            await queue.mark_sending(aconn, ids=ids[:2], owner="w1", now=now, lease_until=later)
            await queue.release(aconn, ids=ids[2:3], owner="w1", not_before=now)
            await queue.record_outcomes(aconn, [queue.Outcome(ids[0], "sent")], [])
            hot = len(statements)
            await queue.renew_leases(aconn, owner="w1", lease_until=later)
            await queue.recover_expired(aconn, now=later, dead_owners=["w9"])
            await queue.recover_expired(aconn, now=later)
    finally:
        await db.close()
    # The fast path's own statements (store/sqlite_writes.py) on SQLite's hot path, too.
    for sql in (
        sqlite_writes._CLAIM_UNTIMED,
        sqlite_writes._CLAIM_DUE,
        sqlite_writes._SUPPRESS_OPTED_OUT,
        sqlite_writes._MARK_SENDING,
        sqlite_writes._RELEASE,
        sqlite_writes._OUTCOME,
    ):
        statements.insert(hot, (sql, _nulls(sql)))
        hot += 1

    def plan(sql: str, params: Any) -> list[str]:
        return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params or ())]

    try:
        updates = [(s, p) for s, p in statements if s.lstrip().startswith("UPDATE")]
        assert len(updates) == 17  # 6 + 6 on the hot path, 1 + 2 + 2 for the leases
        for sql, params in statements[:hot]:
            if sql.lstrip().startswith("UPDATE"):
                steps = plan(sql, params)
                assert "ix_deliveries_leased" not in " ".join(steps), (sql, steps)
                assert "INTEGER PRIMARY KEY" in steps[0], (sql, steps)
                assert not any("TEMP B-TREE" in step for step in steps), (sql, steps)
        for sql, params in statements[hot:]:
            if sql.lstrip().startswith("UPDATE"):
                steps = plan(sql, params)
                assert any("ix_deliveries_leased" in step for step in steps), (sql, steps)
                scans = [s for s in steps if re.match(r"SCAN deliveries$", s)]
                assert not scans, (sql, steps)
    finally:
        conn.close()


def _nulls(sql: str) -> list[None]:
    return [None] * sql.count("?")


def test_the_migrated_schema_is_the_models_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    upgrade_sync(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    assert diff == []
