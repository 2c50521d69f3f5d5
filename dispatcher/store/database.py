"""Database set-up: the async engine (SQLite in WAL mode, or PostgreSQL) and schema migrations."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from dispatcher.errors import StorageError

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def _driver_urls(url: str) -> tuple[str, str]:
    """(async URL, sync URL) for a user-facing `sqlite:///…` or `postgresql://…` URL."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return (
            parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False),
            parsed.set(drivername="sqlite").render_as_string(hide_password=False),
        )
    if backend in ("postgresql", "postgres"):
        psycopg = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        return psycopg, psycopg
    raise StorageError(
        f"unsupported database URL scheme {parsed.drivername!r}: use sqlite:/// or postgresql://"
    )


def _busy_timeout_ms(url: URL) -> int:
    """SQLite's busy timeout in ms: the URL's `timeout` (seconds, as SQLAlchemy has it), or 30 s."""
    raw = url.query.get("timeout")
    if raw is None:
        return SQLITE_BUSY_TIMEOUT_MS
    text = raw if isinstance(raw, str) else raw[-1]
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise StorageError(
            f"database URL: timeout={text!r} must be a number of seconds, e.g. ?timeout=30"
        )
    return round(seconds * 1000)


def _sqlite_pragmas(busy_timeout_ms: int) -> Callable[[Any, Any], None]:
    """The connect hook that sets up each SQLite connection, waiting `busy_timeout_ms` for locks."""

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets readers run beside the writer; the busy timeout makes a second process wait
        # for the lock instead of failing; autocommit mode lets us issue BEGIN IMMEDIATE
        # ourselves.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect


def _sqlite_begin(conn: Any) -> None:
    # A deferred transaction that reads then writes can fail at once with SQLITE_BUSY when
    # another process wrote in between; taking the write lock up front waits instead.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_reset(dbapi_connection: Any, _record: Any, _state: Any) -> None:
    # A connection going back to the pool is rolled back only if a transaction is open: the
    # engine's hot writes (see sqlite_writes) commit their own, and the unconditional rollback
    # cost a hand-off to SQLite's thread, a loop turn or two, on every commit. Reading the flag
    # from this thread is safe: nothing else uses the connection while it is being returned.
    if dbapi_connection.driver_connection._conn.in_transaction:
        dbapi_connection.rollback()


class Database:
    """One database: its async engine and dialect. Create with `Database.open(url)`."""

    def __init__(self, url: str, engine: AsyncEngine, sync_url: str) -> None:
        self.url = url
        self.engine = engine
        self.sync_url = sync_url

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @classmethod
    def open(cls, url: str, *, pool_size: int = 5) -> Database:
        """Create the engine (no connection yet); SQLite files get their folder created."""
        async_url, sync_url = _driver_urls(url)
        parsed = make_url(async_url)
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # One connection per process: SQLite has a single writer anyway, and one connection
            # turns in-process lock contention into an orderly queue.
            engine = create_async_engine(
                async_url,
                pool_size=1,
                max_overflow=0,
                pool_timeout=300,
                pool_reset_on_return=None,  # see _sqlite_reset
            )
            pragmas = _sqlite_pragmas(_busy_timeout_ms(parsed))
            event.listen(engine.sync_engine, "connect", pragmas)
            event.listen(engine.sync_engine, "begin", _sqlite_begin)
            event.listen(engine.sync_engine, "reset", _sqlite_reset)
        else:
            engine = create_async_engine(
                async_url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
            )
        return cls(url, engine, sync_url)

    async def upgrade(self) -> None:
        """Apply every pending Alembic migration (run off the event loop)."""
        try:
            await asyncio.to_thread(upgrade_sync, self.sync_url)
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot migrate the database: {_reason(exc)}") from exc

    async def ping(self) -> None:
        """Raise StorageError unless the database answers."""
        from sqlalchemy import text

        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except (SQLAlchemyError, OSError) as exc:
            raise StorageError(f"database unreachable: {_reason(exc)}") from exc

    async def close(self) -> None:
        await self.engine.dispose()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OperationalError) and exc.orig is not None:
        return str(exc.orig).strip().splitlines()[0]
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# An arbitrary, fixed key for PostgreSQL's advisory lock around migrations ("dispatch" in ASCII).
_LOCK = 0x6469737061746368


def upgrade_sync(sync_url: str) -> None:
    """Run Alembic's `upgrade head` against `sync_url` (blocking)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from sqlalchemy import create_engine, text

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", sync_url.replace("%", "%%"))
    engine = create_engine(sync_url, poolclass=NullPool)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas(_busy_timeout_ms(engine.url)))
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                # Daemons started together on a new database would all create the same tables
                # (and fail on PostgreSQL's catalog): one migrates, the others wait for its
                # commit and then find nothing left to do. The lock ends with the transaction.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()
