"""Storage faults under a running blast: the daemon waits them out, resumes, and loses nothing.

Each test runs `dispatcher run` as a subprocess, sending one stage through the `file` channel
at a modest rate (so the blast lasts several seconds), and breaks its storage in the middle:

- SQLite busy: another connection holds `BEGIN EXCLUSIVE` on the database for several times
  the daemon's busy timeout (shortened to 1 s through the URL's `?timeout=1`, so the lock
  really outlasts it), then lets go: once while the audience is being materialised, once in
  the middle of the sends; and in another test, while the stage comes due (the firing waits).
- PostgreSQL restart: a private cluster (initdb + pg_ctl into a temp dir, never the shared
  server other tests use) is stopped in the middle of the blast and started again.
- A full outbox: the file channel's `max_bytes` stands in for a full disk (a real small
  filesystem needs root to mount); the operator moves the full file aside while the daemon
  runs, and later restarts it with a larger limit. The channel reports itself unavailable,
  its sends pause and retry without spending the retry budget: a full disk that lasts far
  longer than `max_attempts` quick retries fails nothing.

What must hold afterwards: the daemon said what was wrong in one log line (no traceback) and
kept running; every recipient is in the outbox(es) exactly once and `sent` in the database,
with one accepted attempt; `status` adds up and `audit verify` passes.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import pytest

from dispatcher.channels.base import OutboundMessage
from dispatcher.channels.outbox import outbox_line
from tests.conftest import (
    Daemon,
    database_file,
    local_now,
    phone_numbers,
    run_cli,
    wait_for,
    write_config,
)

OUTBOX = "outbox/sms.jsonl"
# A log record starts with its time ("2010-08-31 09:00:00,000 WARNING …"): any other line on
# stdout is the tail of a multi-line message or a traceback, which an operator must not get.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL)")
FIRING_WAITS = re.compile(r"WARNING .*firing drill/blast at \S+ waits for the database")
DB_WARNING = re.compile(r"WARNING .*database unavailable, retrying", re.IGNORECASE)


# -- the configuration and what the daemon left behind -------------------------------------------


def outbox_config(
    tmp_path: Path,
    *,
    recipients: int,
    rate: float,
    database: str | None = None,
    max_bytes: int | None = None,
    engine: dict[str, Any] | None = None,
    concurrency: int = 5,
    at: datetime | None = None,
) -> Path:
    """The conftest campaign, sent through a `file` channel at `rate`, on `database`."""
    config = write_config(
        tmp_path,
        recipients=recipients,
        at=at,
        stage={"grace": "1d"},
        channel={
            "type": "file",
            "seed": None,  # simulator-only defaults of write_config, dropped
            "receipts": None,
            "path": OUTBOX,
            "max_bytes": max_bytes,
            "rate": rate,
            "burst": 1,
            "concurrency": concurrency,
        },
        engine=engine,
    )
    if database is not None:
        text = config.read_text(encoding="utf-8")
        default = 'database = "sqlite:///var/dispatcher.db"\n'
        assert default in text
        config.write_text(
            text.replace(default, f"database = {json.dumps(database)}\n"), encoding="utf-8"
        )
    return config


def expected_addresses(recipients: int) -> set[str]:
    """The E.164 addresses write_config's audience normalises to."""
    return {"+86" + number for number in phone_numbers(recipients)}


def outbox_records(tmp_path: Path) -> list[dict[str, Any]]:
    """Every line of the outbox and of the files an operator moved aside (sms.jsonl*)."""
    records = []
    for path in sorted((tmp_path / OUTBOX).parent.glob(Path(OUTBOX).name + "*")):
        records += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return records


def outbox_count(tmp_path: Path) -> int:
    """Lines in the outbox(es) so far (cheap enough to poll)."""
    outbox = tmp_path / OUTBOX
    return sum(path.read_bytes().count(b"\n") for path in outbox.parent.glob(outbox.name + "*"))


class Store:
    """Read-only SQL on the daemon's database, SQLite file or PostgreSQL URL."""

    def __init__(self, config: Path, pg_url: str | None = None) -> None:
        self.config = config
        self.pg_url = pg_url

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self.pg_url is not None:
            import psycopg

            with psycopg.connect(self.pg_url, connect_timeout=5) as conn:
                return [tuple(r) for r in conn.execute(sql).fetchall()]
        uri = f"file:{database_file(self.config)}?mode=ro"
        with sqlite3.connect(uri, uri=True, timeout=30) as conn:
            return conn.execute(sql).fetchall()

    def settled(self) -> bool:
        """The run is materialised and no delivery is left to send."""
        try:
            runs = self.rows("SELECT status FROM stage_runs")
            [(busy,)] = self.rows(
                "SELECT COUNT(*) FROM deliveries WHERE status IN ('pending', 'claimed', 'sending')"
            )
        except Exception:  # tables not there yet, or the database is down: not settled
            return False
        return runs == [("ready",)] and busy == 0


def assert_clean_output(daemon: Daemon) -> None:
    """One line per log record, no traceback anywhere, nothing on stderr."""
    stdout = daemon.stdout_path.read_text(encoding="utf-8", errors="replace")
    stderr = daemon.stderr_path.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in stdout + stderr, daemon.output
    assert not stderr.strip(), stderr
    strays = [line for line in stdout.splitlines() if not LOG_LINE.match(line)]
    assert not strays, "log records spread over several lines:\n" + "\n".join(strays[:20])


def assert_each_recipient_once(tmp_path: Path, config: Path, store: Store, recipients: int) -> None:
    """Outbox, database, `status` and `audit verify` agree: everyone sent, exactly once."""
    records = outbox_records(tmp_path)
    by_address = Counter(r["address"] for r in records)
    assert set(by_address) == expected_addresses(recipients)
    assert max(by_address.values()) == 1, [a for a, n in by_address.items() if n > 1][:5]
    assert len({r["delivery_id"] for r in records}) == recipients

    assert dict(store.rows("SELECT status, COUNT(*) FROM deliveries GROUP BY status")) == {
        "sent": recipients
    }
    accepted = store.rows(
        "SELECT delivery_id, COUNT(*) FROM attempts WHERE outcome = 'accepted' GROUP BY delivery_id"
    )
    assert len(accepted) == recipients and all(n == 1 for _, n in accepted)

    result = run_cli("status", "--json", str(config), timeout=60)
    assert result.returncode == 0, result.stderr
    [item] = [json.loads(line) for line in result.stdout.splitlines()]
    assert item["adds_up"] and item["deliveries"] == recipients, item
    verify = run_cli("audit", "verify", str(config), timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "audit chain intact" in verify.stdout


def db_warnings(daemon: Daemon) -> list[str]:
    return [line for line in daemon.output.splitlines() if DB_WARNING.search(line)]


# -- 1. SQLite busy ------------------------------------------------------------------------------


@contextlib.contextmanager
def exclusive_lock(config: Path) -> Iterator[sqlite3.Connection]:
    """Another process's view: hold SQLite's write lock (`BEGIN EXCLUSIVE`) until the block ends."""
    locker = sqlite3.connect(database_file(config), timeout=30, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        yield locker
    finally:
        locker.execute("ROLLBACK")
        locker.close()


def hold(seconds: float) -> None:
    """Keep a fault in place for `seconds` (how long it lasts is the fault, not a wait)."""
    started = time.monotonic()
    wait_for(lambda: time.monotonic() - started >= seconds, seconds + 5, "the fault to last")


def test_sqlite_locked_mid_blast_is_waited_out(tmp_path: Path) -> None:
    # Big enough that materialising takes a second or two (the first lock lands in it), sent
    # as fast as the file channel goes so that the blast still lasts only several seconds.
    recipients = 20_000
    busy_timeout_s = 1.0
    config = outbox_config(
        tmp_path,
        recipients=recipients,
        rate=10_000,
        concurrency=200,
        database=f"sqlite:///var/dispatcher.db?timeout={busy_timeout_s:g}",
    )
    store = Store(config)

    def materialising() -> bool:
        # Still materialising, and past the first claimed batch (200 rows): a lock while that
        # batch looks up its stage run strands it in `claimed` (a worker bug, reported apart).
        try:
            runs = store.rows("SELECT status, deliveries FROM stage_runs")
        except sqlite3.OperationalError:  # tables not created yet
            return False
        return (
            bool(runs)
            and runs[0][0] == "materialising"
            and runs[0][1] >= 1000
            and outbox_count(tmp_path) >= 250
        )

    daemon = Daemon(config)
    try:
        daemon.wait_running()
        # First lock: while the audience is being turned into deliveries.
        wait_for(materialising, 20, "the first batches of deliveries and of sends", 0.02)
        with exclusive_lock(config) as locker:
            [(status, done)] = locker.execute(
                "SELECT status, deliveries FROM stage_runs"
            ).fetchall()
            assert (status, done < recipients) == ("materialising", True), (
                f"materialisation ended ({status}, {done} rows) before the lock: make it bigger"
            )
            wait_for(
                lambda: "materialisation of run 1 interrupted" in daemon.output,
                20,
                "the daemon to report the interrupted materialisation",
            )
            hold(4 * busy_timeout_s)
            assert daemon.process.poll() is None, daemon.output

        # Second lock: in the middle of the sends.
        wait_for(lambda: outbox_count(tmp_path) >= recipients // 3, 30, "a third of the sends")
        warned = len(db_warnings(daemon))
        with exclusive_lock(config):
            wait_for(lambda: len(db_warnings(daemon)) > warned, 20, "the daemon to report the lock")
            hold(4 * busy_timeout_s)
            assert daemon.process.poll() is None, daemon.output
            assert outbox_count(tmp_path) < recipients

        wait_for(store.settled, 40, "the rest of the blast after the locks", 0.25)
        assert daemon.stop(signal.SIGTERM) == 0, daemon.output
    finally:
        daemon.close()

    assert_each_recipient_once(tmp_path, config, store, recipients)
    assert store.rows("SELECT rows_read, deliveries, status FROM stage_runs") == [
        (recipients, recipients, "ready")
    ]
    assert "database is locked" in db_warnings(daemon)[0]
    assert_clean_output(daemon)


def test_sqlite_locked_when_a_firing_comes_due_is_waited_out(tmp_path: Path) -> None:
    # The stage comes due while another process holds the database: the daemon cannot record
    # the firing, says so, and fires it once the lock is gone (within the stage's grace).
    recipients = 300
    at = (local_now() + timedelta(seconds=20)).replace(microsecond=0)
    config = outbox_config(
        tmp_path,
        recipients=recipients,
        rate=1000,
        concurrency=20,
        database="sqlite:///var/dispatcher.db?timeout=1",
        at=at,
    )
    store = Store(config)
    daemon = Daemon(config)
    try:
        daemon.wait_running()
        with exclusive_lock(config) as locker:
            assert locker.execute("SELECT COUNT(*) FROM stage_runs").fetchall() == [(0,)], (
                "the daemon took longer to start than the stage's lead: make the lead longer"
            )
            try:
                wait_for(
                    lambda: FIRING_WAITS.search(daemon.output) is not None,
                    30,
                    "the firing to come due and wait",
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the daemon said:\n{daemon.output[-3000:]}") from exc
            hold(3)
            assert daemon.process.poll() is None, daemon.output
            assert outbox_count(tmp_path) == 0
        wait_for(store.settled, 40, "the firing and its sends after the lock", 0.25)
        assert daemon.stop(signal.SIGTERM) == 0, daemon.output
    finally:
        daemon.close()

    assert_each_recipient_once(tmp_path, config, store, recipients)
    assert store.rows("SELECT COUNT(*) FROM stage_runs") == [(1,)]
    assert_clean_output(daemon)


def test_daemon_started_on_a_locked_database_stops_with_a_clear_message(tmp_path: Path) -> None:
    config = outbox_config(
        tmp_path, recipients=10, rate=10, database="sqlite:///var/dispatcher.db?timeout=1"
    )
    assert run_cli("db", "upgrade", str(config)).returncode == 0
    with exclusive_lock(config):
        done = run_cli("run", "--no-server", str(config), timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: database unavailable: database is locked"
    assert "Traceback" not in done.stdout + done.stderr


# -- 2. PostgreSQL restart -----------------------------------------------------------------------


def _skip_or_fail(reason: str) -> NoReturn:
    if os.environ.get("DISPATCHER_REQUIRE_PG") == "1":
        pytest.fail(f"DISPATCHER_REQUIRE_PG=1 but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PrivateCluster:
    """A PostgreSQL cluster of our own in a temp dir, on 127.0.0.1:port, trust auth."""

    bindir: Path
    home: Path
    port: int
    run_as: list[str]
    user: str

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/dispatcher"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        result = subprocess.run(
            [*self.run_as, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed:\n{result.stdout}{result.stderr}")

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            self.user,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.home / "server.log")
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "30", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def create_database(self) -> None:
        import psycopg

        admin = f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute("CREATE DATABASE dispatcher")


def _postgres_bindir() -> Path | None:
    """The newest PostgreSQL bin folder with initdb and pg_ctl: Debian's layout, else PATH."""
    found = [
        pg_ctl.parent
        for pg_ctl in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")
        if (pg_ctl.parent / "initdb").exists()
    ]
    if found:
        return max(found, key=lambda b: int(b.parent.name) if b.parent.name.isdigit() else -1)
    pg_ctl, initdb = shutil.which("pg_ctl"), shutil.which("initdb")
    if pg_ctl and initdb and Path(pg_ctl).parent == Path(initdb).parent:
        return Path(pg_ctl).parent
    return None


@pytest.fixture
def private_pg() -> Iterator[PrivateCluster]:
    """A private, running PostgreSQL cluster with an empty `dispatcher` database; always stopped."""
    bindir = _postgres_bindir()
    if bindir is None:
        _skip_or_fail("no PostgreSQL binaries (initdb, pg_ctl) under /usr/lib/postgresql or PATH")
    run_as: list[str] = []
    user = getpass.getuser()
    # initdb refuses to run as root: the cluster then belongs to the `postgres` system user.
    home = Path(tempfile.mkdtemp(prefix="dispatcher-pg-"))
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            shutil.chown(home, "postgres", "postgres")
        except (LookupError, OSError) as exc:
            shutil.rmtree(home, ignore_errors=True)
            _skip_or_fail(f"running as root and cannot hand a temp dir to user postgres: {exc}")
        if runuser is None:
            shutil.rmtree(home, ignore_errors=True)
            _skip_or_fail("running as root and no `runuser` to run initdb as user postgres")
        run_as = [str(runuser), "-u", "postgres", "--"]
        user = "postgres"
    cluster = PrivateCluster(bindir, home, _free_port(), run_as, user)
    try:
        cluster.init()
        cluster.start()
        cluster.create_database()
        yield cluster
    finally:
        # Whatever happened above: a cluster left running would outlive the test run.
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            cluster.stop("immediate")
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.postgres
def test_postgres_restart_mid_blast_is_waited_out(
    tmp_path: Path, private_pg: PrivateCluster
) -> None:
    recipients = 200
    config = outbox_config(tmp_path, recipients=recipients, rate=20, database=private_pg.url)
    store = Store(config, pg_url=private_pg.url)
    daemon = Daemon(config)
    try:
        daemon.wait_running()
        wait_for(lambda: outbox_count(tmp_path) >= 40, 30, "the first sends")
        private_pg.stop("fast")
        # Down long enough for every part of the daemon to notice: the writer's commits and
        # the housekeeping heartbeat (every second) both fail and say so.
        wait_for(lambda: bool(db_warnings(daemon)), 20, "the daemon to report the outage")
        wait_for(
            lambda: "housekeeping failed, will try again" in daemon.output,
            20,
            "the heartbeat to fail while the server is down",
        )
        assert daemon.process.poll() is None, daemon.output
        private_pg.start()

        wait_for(store.settled, 30, "the rest of the blast after the restart", 0.25)
        assert daemon.stop(signal.SIGTERM) == 0, daemon.output
    finally:
        daemon.close()

    assert_each_recipient_once(tmp_path, config, store, recipients)
    assert_clean_output(daemon)


# -- 3. A full outbox -----------------------------------------------------------------------------

FULL = "would grow beyond max_bytes"


def line_bytes() -> int:
    """About how long one outbox line of this campaign is (names and ids vary by a few bytes)."""
    message = OutboundMessage(
        delivery_id=100,
        address="+8613800000020",
        body="用户100您好！9月是全国“质量月”。",
        campaign="drill",
        stage="blast",
        encoding="UCS-2",
        segments=1,
        valid_until=datetime.now(UTC),
    )
    return len(outbox_line(message, datetime.now(UTC)))


def full_reports(daemon: Daemon) -> list[str]:
    return [line for line in daemon.output.splitlines() if FULL in line]


def test_full_outbox_waits_until_the_operator_makes_room(tmp_path: Path) -> None:
    # `max_bytes` plays the full disk; what happens when it outlasts the retry budget is the
    # next test.
    recipients = 150
    per_file = 60
    max_bytes = per_file * line_bytes()
    config = outbox_config(
        tmp_path,
        recipients=recipients,
        rate=30,
        max_bytes=max_bytes,
        engine={"max_attempts": 50, "backoff_base": "500ms", "backoff_max": "2s"},
    )
    store = Store(config)
    outbox = tmp_path / OUTBOX
    daemon = Daemon(config)
    try:
        daemon.wait_running()
        wait_for(lambda: bool(full_reports(daemon)), 30, "the outbox to fill up")
        # The daemon waits: the deliveries that did not fit are pending again, none failed.
        wait_for(
            lambda: (
                store.rows("SELECT COUNT(*) FROM deliveries WHERE error_code = 'ENOSPC'")[0][0] > 0
            ),
            10,
            "deliveries to wait for room",
        )
        assert store.rows("SELECT COUNT(*) FROM deliveries WHERE status = 'failed'") == [(0,)]
        first = len(outbox_records(tmp_path))
        assert 0 < first < recipients and outbox.stat().st_size <= max_bytes

        # The operator moves the full outbox aside; the running daemon starts a new one.
        outbox.rename(outbox.with_name(outbox.name + ".1"))
        reported = len(full_reports(daemon))
        wait_for(lambda: outbox.exists() and outbox.stat().st_size > 0, 20, "a new outbox")
        wait_for(
            lambda: (
                len(full_reports(daemon)) > reported
                and outbox.stat().st_size > max_bytes - 2 * line_bytes()
            ),
            30,
            "the new outbox to fill up too",
        )
        assert daemon.process.poll() is None, daemon.output
        # This time the operator gives the channel more room, which takes a restart.
        assert daemon.stop(signal.SIGTERM) == 0, daemon.output
    finally:
        daemon.close()
    assert len(outbox_records(tmp_path)) < recipients
    assert store.rows("SELECT COUNT(*) FROM deliveries WHERE status = 'failed'") == [(0,)]
    text = config.read_text(encoding="utf-8")
    assert f"max_bytes = {max_bytes}\n" in text
    config.write_text(
        text.replace(f"max_bytes = {max_bytes}\n", f"max_bytes = {100 * max_bytes}\n")
    )

    again = Daemon(config, "again")
    try:
        again.wait_running()
        wait_for(store.settled, 30, "the rest of the blast after the restart", 0.25)
        assert again.stop(signal.SIGTERM) == 0, again.output
    finally:
        again.close()

    assert_each_recipient_once(tmp_path, config, store, recipients)
    [(waited,)] = store.rows(
        "SELECT COUNT(DISTINCT delivery_id) FROM attempts WHERE error_code = 'ENOSPC'"
    )
    assert waited > 0
    report = full_reports(daemon)[0]
    assert "ERROR" in report and "sends wait until there is room" in report, report
    assert not full_reports(again)
    assert_clean_output(daemon)
    assert_clean_output(again)


def test_full_outbox_past_the_retry_budget_still_loses_nothing(tmp_path: Path) -> None:
    recipients = 40
    max_bytes = 10 * line_bytes()
    config = outbox_config(
        tmp_path,
        recipients=recipients,
        rate=200,
        max_bytes=max_bytes,
        engine={"max_attempts": 3, "backoff_base": "100ms", "backoff_max": "200ms"},
    )
    store = Store(config)
    daemon = Daemon(config)
    try:
        daemon.wait_running()
        wait_for(lambda: bool(full_reports(daemon)), 30, "the outbox to fill up")
        hold(3.0)  # the disk stays full far longer than three quick retries take
        assert daemon.stop(signal.SIGTERM) == 0, daemon.output
    finally:
        daemon.close()
    text = config.read_text(encoding="utf-8")
    config.write_text(
        text.replace(f"max_bytes = {max_bytes}\n", f"max_bytes = {100 * max_bytes}\n")
    )
    again = Daemon(config, "again")
    try:
        again.wait_running()
        wait_for(store.settled, 30, "the rest of the blast after the restart", 0.25)
        assert again.stop(signal.SIGTERM) == 0, again.output
    finally:
        again.close()

    failed = store.rows("SELECT error_reason FROM deliveries WHERE status = 'failed'")
    assert not failed, f"{len(failed)} deliveries failed for good, e.g. {failed[0][0]}"
    assert_each_recipient_once(tmp_path, config, store, recipients)
