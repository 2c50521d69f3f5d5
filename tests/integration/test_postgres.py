"""The same engine on a real PostgreSQL: firing once, SKIP LOCKED claims, the audit chain.

Skipped with a reason when no server is configured (DISPATCHER_TEST_PG_URL), unless
DISPATCHER_REQUIRE_PG=1 (set by .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import asyncio
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from dispatcher import audit
from dispatcher.config import load_config
from dispatcher.engine.clock import SystemClock
from dispatcher.engine.engine import Engine
from dispatcher.plan import Firing
from dispatcher.store.database import Database
from dispatcher.store.tables import Attempt, Delivery, StageRun

REPO = Path(__file__).resolve().parents[2]
D = Delivery.__table__  # type: ignore[attr-defined]
A = Attempt.__table__  # type: ignore[attr-defined]
R = StageRun.__table__  # type: ignore[attr-defined]
pytestmark = pytest.mark.postgres


def write_config(tmp_path: Path, recipients: int) -> Path:
    shutil.copytree(REPO / "slogans", tmp_path / "slogans")
    lines = ["name,phone"] + [f"用户{i},+86139{i:08d}" for i in range(recipients)]
    lines.append("重复,+8613900000000")  # a duplicate of the first row
    (tmp_path / "people.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "config.toml").write_text(
        """
[dispatcher]
campaigns = []

[engine]
heartbeat = "1s"

[channels.sms]
type = "simulator"
rate = 5000
concurrency = 50
seed = 7
receipts = true

[[campaign]]
campaign = { id = "pg", name = "PG", start = 2010-08-31, end = 2010-09-30, send_window = { start = "00:00", end = "23:59" } }
audiences.people = { file = "people.csv", address_column = "phone" }
stages = [ { id = "blast", channel = "sms", audience = "people", at = 2010-08-31T09:00:00, template = "{{ name }}：{{ slogan }}", slogans = { set = "quality-month-2010", id = "qm2010-01" }, validity = "100000d" } ]
""",
        encoding="utf-8",
    )
    return tmp_path / "config.toml"


async def _open(url: str) -> Database:
    db = Database.open(url)
    await db.upgrade()
    return db


async def test_two_engines_fire_once_and_send_each_recipient_once(
    tmp_path: Path, pg_url: str
) -> None:
    config = load_config(write_config(tmp_path, 600), env={"DISPATCHER_DATABASE_URL": pg_url})
    assert config.database_url == pg_url
    db_a, db_b = await _open(pg_url), await _open(pg_url)
    clock = SystemClock()
    engine_a = Engine(config, db_a, clock, worker_id="host-a:1")
    engine_b = Engine(config, db_b, clock, worker_id="host-b:1")
    campaign = config.campaigns[0]
    stage = campaign.stages[0]
    firing = Firing(campaign.id, stage.id, datetime(2010, 8, 31, 1, 0, tzinfo=UTC), 0)
    await engine_a.start()
    await engine_b.start()
    try:
        first, second = await asyncio.gather(
            engine_a.fire(campaign, stage, firing), engine_b.fire(campaign, stage, firing)
        )
        assert sorted([first.created, second.created]) == [False, True]
        assert first.run_id == second.run_id
        for _ in range(600):
            if await engine_a.open_deliveries() == 0:
                break
            await asyncio.sleep(0.05)
        assert await engine_a.open_deliveries() == 0
    finally:
        await engine_a.stop(timeout=10)
        await engine_b.stop(timeout=10)
    async with db_a.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(R))).scalar_one() == 1
        run = (await conn.execute(select(R))).mappings().one()
        assert (run["rows_read"], run["deliveries"], run["duplicates"]) == (601, 600, 1)
        accepted = (
            await conn.execute(
                select(A.c.delivery_id, func.count())
                .where(A.c.outcome == "accepted")
                .group_by(A.c.delivery_id)
            )
        ).all()
        assert len(accepted) == 600 and all(n == 1 for _, n in accepted)  # never twice
        by_worker = dict(
            (await conn.execute(select(A.c.worker, func.count()).group_by(A.c.worker))).all()
        )
        assert set(by_worker) <= {"host-a:1", "host-b:1"}
        statuses = dict(
            (await conn.execute(select(D.c.status, func.count()).group_by(D.c.status))).all()
        )
        assert sum(statuses.values()) == 600
        assert set(statuses) <= {"delivered", "sent"}
        result = await audit.verify(conn)
        assert result.ok, result.problem
        assert result.entries > 2
        # The chain's appends were serialised across both processes.
        seqs = [
            r[0] for r in (await conn.execute(text("SELECT seq FROM audit_log ORDER BY seq"))).all()
        ]
        assert seqs == list(range(1, len(seqs) + 1))
    await db_a.close()
    await db_b.close()


async def test_migrations_are_idempotent(pg_url: str) -> None:
    db = await _open(pg_url)
    await db.upgrade()
    await db.ping()
    async with db.engine.connect() as conn:
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
    assert version == "0003"
    await db.close()
