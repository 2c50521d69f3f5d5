"""Migrations: a database made by an earlier revision upgrades with its rows, and the schema they
build is the one the models describe (so a model change without its migration fails here)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from dispatcher.store.database import MIGRATIONS, upgrade_sync
from dispatcher.store.tables import metadata


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


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
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0002",)
        assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (1,)
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM deliveries WHERE channel = 'sms'"
            " AND status = 'pending' ORDER BY id LIMIT 10"
        ).fetchall()
        assert any("ix_deliveries_claim" in row[3] for row in plan), plan
        assert not any("TEMP B-TREE" in row[3] for row in plan), plan
    finally:
        conn.close()


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
