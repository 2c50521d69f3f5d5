"""Scale-out on PostgreSQL: three daemons share one stage run, one is killed half-way.

Three `dispatcher run --no-server` processes on one PostgreSQL database send one stage through
the `twilio` channel to the Twilio-compatible fake (a subprocess that records every message it
accepts, with its receive time). When the fake has about half the messages, one daemon gets
SIGKILL. The survivors settle its leases (claimed rows back to the queue, rows in flight to
`unknown`), reconcile the unknown ones through Twilio's Messages list, and finish the run. At
the provider: no recipient twice, every delivery accounted for, and no 1 s window above the
channel's rate cap, although three processes shared it and then two.

Skipped with a reason when no server is configured (DISPATCHER_TEST_PG_URL), unless
DISPATCHER_REQUIRE_PG=1, which turns the skip into a failure. The default run sends 6,000
messages, the other 20,000. Both are marked slow (`make soak`), outside CI for now: on a
2-core machine saturated by three daemons, PostgreSQL and the fake, the busiest provider-side
second around the kill still holds 1-5 messages over the cap (e.g. 405 at 400/s); no duplicates
and full accounting held in every run. Open in the scale-out issue.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import pytest

from tests.conftest import REPO, local_now, sliding_max, wait_for, write_config

pytestmark = pytest.mark.postgres

SID = "AC" + "5c" * 16
TOKEN = "scale-out-token"
SENDER = "+15005550006"
RATE = 400  # messages per second for the whole channel, across every daemon
DAEMONS = 3


def _env(database_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "TWILIO_"))}
    env["PYTHONUNBUFFERED"] = "1"
    if database_url is not None:
        env["DISPATCHER_DATABASE_URL"] = database_url
    return env


class Process:
    """A subprocess with its output in files (no pipe can fill up), stopped on close."""

    def __init__(
        self, args: list[str], cwd: Path, name: str, env: dict[str, str], logs: Path
    ) -> None:
        self.name = name
        self.stdout_path = logs / f"{name}.out"
        self.stderr_path = logs / f"{name}.err"
        self._out: IO[bytes] = self.stdout_path.open("wb")
        self._err: IO[bytes] = self.stderr_path.open("wb")
        self.process = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._out, stderr=self._err)

    @property
    def output(self) -> str:
        return self.stdout_path.read_text(
            encoding="utf-8", errors="replace"
        ) + self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int, timeout: float = 60) -> int:
        """Send `sig` and wait for the exit status."""
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._out.close()
        self._err.close()


def start_twilio(tmp_path: Path, record: Path) -> tuple[Process, int]:
    """The Twilio-compatible fake as a subprocess; returns it and its port."""
    fake = Process(
        [
            sys.executable,
            "-m",
            "tests.peers.twilio_server",
            "--port",
            "0",
            "--print-port",
            "--account",
            f"{SID}:{TOKEN}",
            "--record",
            str(record),
        ],
        cwd=REPO,  # so that `tests.peers` imports
        name="twilio",
        env=_env(),
        logs=tmp_path,
    )
    wait_for(
        lambda: fake.stdout_path.read_text().strip() != "" or not fake.alive(),
        30,
        "the Twilio fake to print its port",
    )
    assert fake.alive(), f"the Twilio fake exited early:\n{fake.output}"
    return fake, int(fake.stdout_path.read_text().split()[0])


def write_scale_config(tmp_path: Path, *, recipients: int, api_base: str) -> Path:
    """One stage fired a few minutes ago (well within grace) to `recipients` numbers."""
    config = write_config(
        tmp_path,
        recipients=1,
        at=local_now().replace(second=0, microsecond=0) - timedelta(minutes=3),
        stage={"grace": "2h", "template": "{{ name }}您好！9月是全国“质量月”。"},
        channel={
            "type": "twilio",
            "rate": RATE,
            "concurrency": 20,
            "account_sid": SID,
            "auth_token": TOKEN,
            "from": SENDER,
            "api_base": api_base,
            "status_callback": False,
            "seed": None,
            "receipts": None,
        },
        engine={"heartbeat": "1s", "lease": "5s", "poll_interval": "200ms"},
    )
    # E.164 numbers, one per recipient: +8613900000000 + i.
    rows = ["姓名,手机"] + [f"用户{i},+{8613900000000 + i}" for i in range(recipients)]
    audience = tmp_path / "campaigns" / "audiences" / "public.csv"
    audience.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return config


def read_records(path: Path) -> list[dict[str, Any]]:
    """The fake's complete record lines (a line still being written is left out)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def count_records(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def status(config: Path, database_url: str) -> list[dict[str, Any]]:
    """`dispatcher status CONFIG --json`: one object per stage run."""
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli.main", "status", str(config), "--json"],
        cwd=config.parent,
        env=_env(database_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def settled(runs: list[dict[str, Any]], recipients: int) -> bool:
    """Every delivery materialised and final, or left `unknown` after a failed reconcile."""
    if len(runs) != 1 or runs[0]["deliveries"] != recipients:
        return False
    by_status: dict[str, int] = runs[0]["by_status"]
    if any(by_status[s] for s in ("pending", "claimed", "sending")):
        return False
    unreconciled: int = sum(e["count"] for e in runs[0]["errors"] if e["code"] == "unreconciled")
    return by_status["unknown"] <= unreconciled


def scale_out(tmp_path: Path, database_url: str, recipients: int) -> None:
    record = tmp_path / "received.jsonl"
    processes: list[Process] = []
    try:
        fake, port = start_twilio(tmp_path, record)
        processes.append(fake)
        config = write_scale_config(
            tmp_path, recipients=recipients, api_base=f"http://127.0.0.1:{port}"
        )
        daemons = [
            Process(
                [sys.executable, "-m", "dispatcher.cli.main", "run", str(config), "--no-server"],
                cwd=tmp_path,
                name=f"daemon{i}",
                env=_env(database_url),
                logs=tmp_path,
            )
            for i in range(DAEMONS)
        ]
        processes += daemons
        for daemon in daemons:
            wait_for(
                lambda d=daemon: "dispatcher running" in d.output or not d.alive(),  # type: ignore[misc]
                60,
                f"{daemon.name} to start",
            )
            assert daemon.alive(), f"{daemon.name} exited early:\n{daemon.output}"

        # Up to here every daemon sends; about half-way, one dies without a word.
        wait_for(
            lambda: count_records(record) >= recipients // 2 or not all(d.alive() for d in daemons),
            recipients / RATE * 4 + 60,
            "the provider to receive half the messages",
        )
        assert all(d.alive() for d in daemons), "\n".join(d.output for d in daemons)
        victim, survivors = daemons[0], daemons[1:]
        victim.process.kill()
        victim.process.wait(timeout=30)

        wait_for(
            lambda: settled(status(config, database_url), recipients),
            recipients / RATE * 4 + 90,
            "every delivery to be settled",
            interval=1.0,
        )
        runs = status(config, database_url)
        for daemon in survivors:
            assert daemon.stop(signal.SIGTERM) == 0, daemon.output
        fake.stop(signal.SIGTERM)
    finally:
        for process in processes:
            process.close()

    (run,) = runs
    by_status = run["by_status"]
    assert by_status["unknown"] == 0, f"unreconciled deliveries left: {run['errors']}"
    assert sum(by_status.values()) == recipients
    assert run["adds_up"], run

    received = read_records(record)
    to_counts = Counter(r["to"] for r in received)
    twice = {to: n for to, n in to_counts.items() if n > 1}
    assert not twice, f"{len(twice)} recipients got the message more than once"
    assert by_status["sent"] == len(received), (by_status, len(received))
    assert set(to_counts) == {f"+{8613900000000 + i}" for i in range(recipients)}
    busiest = sliding_max([r["received_at"] for r in received], width=1.0)
    assert busiest <= RATE, f"{busiest} messages reached the provider within one second"


@pytest.mark.slow  # not in CI yet: see the module docstring
def test_three_daemons_one_killed(tmp_path: Path, pg_url: str) -> None:
    scale_out(tmp_path, pg_url, recipients=6_000)


@pytest.mark.slow
def test_three_daemons_one_killed_20000(tmp_path: Path, pg_url: str) -> None:
    scale_out(tmp_path, pg_url, recipients=20_000)
