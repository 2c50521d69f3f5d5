"""Shared test helpers: a small campaign written into a temp dir, the CLI as a subprocess, polling.

`write_config` lays out a complete configuration (main file, campaign file, a CSV audience of
generated Chinese mobile numbers, a slogan folder) with one simulator channel, so engine and
daemon tests drive exactly what an operator would write. Everything else here waits on
conditions with a deadline instead of sleeping for a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo

import pytest

from dispatcher.config.loader import Config, load_config

REPO = Path(__file__).resolve().parents[1]
CAMPAIGN_ID = "drill"
STAGE_ID = "blast"
CHANNEL = "sms"
TIMEZONE = "Asia/Shanghai"
# The whole day: tests that are not about quiet hours must not depend on the hour they run at.
ALL_DAY = {"start": "00:00", "end": "23:59:59.999999"}


# -- a tiny TOML writer (the values our configurations use) ---------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, datetime):
        return value.replace(microsecond=0).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        items = ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_table(name: str, table: Mapping[str, Any]) -> str:
    lines = [f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


# -- audiences ------------------------------------------------------------------------------------


def phone_numbers(n: int, start: int = 0) -> list[str]:
    """`n` distinct, valid Chinese mobile numbers (national format, 11 digits)."""
    prefixes = ("138", "139", "150", "186", "135")
    return [
        f"{prefixes[i % len(prefixes)]}{i // len(prefixes):08d}" for i in range(start, start + n)
    ]


def write_audience(path: Path, recipients: int, *, invalid: int = 0, duplicates: int = 0) -> None:
    """A UTF-8 CSV (name, mobile): `recipients` valid rows, then some invalid and duplicate ones."""
    rows = ["姓名,手机"]
    numbers = phone_numbers(recipients)
    rows += [f"用户{i},{number}" for i, number in enumerate(numbers)]
    rows += [f"坏号{i},0{i:03d}-123" for i in range(invalid)]
    rows += [f"重复{i},{numbers[i % len(numbers)]}" for i in range(duplicates)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


# -- the configuration ----------------------------------------------------------------------------


def local_now(tz: str = TIMEZONE) -> datetime:
    """Now in the campaign's time zone, naive (as a campaign file writes times)."""
    return datetime.now(ZoneInfo(tz)).replace(tzinfo=None)


def write_config(
    tmp_path: Path,
    *,
    recipients: int = 20,
    invalid: int = 0,
    duplicates: int = 0,
    at: datetime | None = None,
    stage: Mapping[str, Any] | None = None,
    stages: Sequence[Mapping[str, Any]] | None = None,
    channel: Mapping[str, Any] | None = None,
    engine: Mapping[str, Any] | None = None,
    campaign: Mapping[str, Any] | None = None,
    server_enabled: bool = False,
) -> Path:
    """Write a runnable configuration into `tmp_path` and return the main file's path.

    One campaign `drill` (Asia/Shanghai, sending all day by default) with one stage `blast` on
    channel `sms` (a simulator with no latency and no failures unless `channel` says otherwise),
    firing at `at` (local, naive; default one minute ago) for a CSV of `recipients` generated
    mobile numbers plus `invalid` bad and `duplicates` repeated rows. `stage`, `channel`,
    `engine` and `campaign` are merged over the defaults; `stages` replaces the stage list.
    """
    at = (
        at
        if at is not None
        else local_now().replace(second=0, microsecond=0) - timedelta(minutes=1)
    )
    write_audience(
        tmp_path / "campaigns" / "audiences" / "public.csv",
        recipients,
        invalid=invalid,
        duplicates=duplicates,
    )
    (tmp_path / "slogans").mkdir(exist_ok=True)

    info: dict[str, Any] = {
        "id": CAMPAIGN_ID,
        "name": "演练",
        "timezone": TIMEZONE,
        "start": at.date() - timedelta(days=1),
        "end": at.date() + timedelta(days=2),
        "send_window": ALL_DAY,
    }
    info.update(campaign or {})
    blast: dict[str, Any] = {
        "id": STAGE_ID,
        "channel": CHANNEL,
        "audience": "public",
        "at": at,
        "template": "{{ name }}您好！9月是全国“质量月”。",
        "grace": "1h",
        "validity": "12h",
        "max_segments": 3,
    }
    blast.update(stage or {})
    stage_list = list(stages) if stages is not None else [blast]
    text = _toml_table("campaign", info)
    text += _toml_table(
        "audiences.public",
        {
            "file": "audiences/public.csv",
            "kind": "phone",
            "address_column": "手机",
            "region": "CN",
            "columns": {"name": "姓名"},
        },
    )
    for item in stage_list:
        text += "\n[[stages]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in item.items())
    (tmp_path / "campaigns").mkdir(exist_ok=True)
    (tmp_path / "campaigns" / "drill.toml").write_text(text, encoding="utf-8")

    sms: dict[str, Any] = {
        "type": "simulator",
        "rate": 10_000,
        "concurrency": 50,
        "seed": 2010,
        "receipts": False,
    }
    sms.update(channel or {})
    engine_cfg: dict[str, Any] = {
        "heartbeat": "1s",
        "poll_interval": "0.2s",
        "shutdown_timeout": "10s",
    }
    engine_cfg.update(engine or {})
    main = _toml_table(
        "dispatcher",
        {
            "database": "sqlite:///var/dispatcher.db",
            "timezone": TIMEZONE,
            "slogans": "slogans",
            "campaigns": ["campaigns/*.toml"],
        },
    )
    main += _toml_table("server", {"enabled": server_enabled, "listen": "127.0.0.1:0"})
    main += _toml_table("engine", engine_cfg)
    main += _toml_table(f"channels.{CHANNEL}", sms)
    path = tmp_path / "dispatcher.toml"
    path.write_text(main, encoding="utf-8")
    return path


def load(path: Path) -> Config:
    """Load a test configuration, ignoring the caller's DISPATCHER_* environment."""
    return load_config(path, env={})


def database_file(config_path: Path) -> Path:
    return config_path.parent / "var" / "dispatcher.db"


# -- the CLI as an operator runs it ---------------------------------------------------------------


def cli_env() -> dict[str, str]:
    """The environment for CLI subprocesses: ours, minus anything that would redirect them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `dispatcher ARGS` to completion (bounded by `timeout`) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli.main", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Daemon:
    """`dispatcher run CONFIG` as a subprocess, its output in files (no pipe can fill up)."""

    def __init__(self, config: Path, name: str = "daemon") -> None:
        self.config = config
        self.stdout_path = config.parent / f"{name}.out"
        self.stderr_path = config.parent / f"{name}.err"
        self._out: IO[bytes] = self.stdout_path.open("wb")
        self._err: IO[bytes] = self.stderr_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli.main", "run", str(config)],
            cwd=config.parent,
            env=cli_env(),
            stdout=self._out,
            stderr=self._err,
        )

    @property
    def output(self) -> str:
        """Everything it printed so far: its log (stdout), then stderr."""
        return self.stdout_path.read_text(
            encoding="utf-8", errors="replace"
        ) + self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def wait_running(self, timeout: float = 30) -> None:
        """Wait until the daemon says it runs (signal handlers are installed by then)."""
        wait_for(
            lambda: "dispatcher running" in self.output or self.process.poll() is not None,
            timeout,
            "the daemon to start",
        )
        assert self.process.poll() is None, f"the daemon exited early:\n{self.output}"

    def stop(self, sig: int, timeout: float = 30) -> int:
        """Send `sig` and wait for the exit status."""
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._out.close()
        self._err.close()


# -- waiting on conditions ------------------------------------------------------------------------


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


async def wait_until(
    condition: Callable[[], Awaitable[bool]], limit_s: float, what: str, interval: float = 0.02
) -> None:
    """The async twin of `wait_for`: poll an async condition until it holds, or fail."""
    deadline = time.monotonic() + limit_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit_s:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


def sliding_max(times: list[float], width: float = 1.0) -> int:
    """The largest number of events in any window [t, t + width) starting at an event."""
    times = sorted(times)
    best, j = 0, 0
    for i, start in enumerate(times):
        j = max(j, i)
        while j < len(times) and times[j] < start + width:
            j += 1
        best = max(best, j - i)
    return best


def read_send_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The simulator's send log: (records, number of torn lines, e.g. from a SIGKILL mid-write)."""
    if not path.exists():
        return [], 0
    records, torn = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    return records, torn


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards.

    Skips with a reason without DISPATCHER_TEST_PG_URL; DISPATCHER_REQUIRE_PG=1 (set by
    .ci/run) turns the skip into a failure.
    """
    base = os.environ.get("DISPATCHER_TEST_PG_URL")
    if not base:
        if os.environ.get("DISPATCHER_REQUIRE_PG") == "1":
            pytest.fail("DISPATCHER_REQUIRE_PG=1 but DISPATCHER_TEST_PG_URL is not set")
        pytest.skip("no PostgreSQL server: set DISPATCHER_TEST_PG_URL to run these tests")
    import psycopg

    name = f"dispatcher_t_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(base, autocommit=True)
    except psycopg.OperationalError as exc:
        if os.environ.get("DISPATCHER_REQUIRE_PG") == "1":
            pytest.fail(f"PostgreSQL at DISPATCHER_TEST_PG_URL is unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = base.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
