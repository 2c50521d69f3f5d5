"""SIGKILL of `dispatcher run` at ten random moments of one blast, restarted after each.

One SQLite database, one stage of N recipients through the `twilio` channel (the official SDK,
in the daemon) to the Twilio-compatible fake, a subprocess on 127.0.0.1 that records every
message it accepts. `dispatcher run --no-server` is killed without warning ten times: first
in the middle of the materialisation (its first batch of deliveries committed), then at nine
moments drawn by a seeded `random.Random`, one in each ninth of the blast, measured in
messages the provider has received. After each kill a new process starts on the same
database; after the tenth it runs to the end, and settles by itself what the kills left
behind: claimed rows go back to the queue, rows in flight become `unknown` and are reconciled
through Twilio's Messages list (sent if the provider has them, sent again if it certainly
does not).

What must hold afterwards: the provider got every recipient exactly once; every recipient has
exactly one delivery, in a final state (sent, or failed / suppressed with a reason), nothing
open or unknown; the provider's count equals the deliveries recorded as sent, each with the
provider's own sid for that recipient; `audit verify` passes and `status --json` agrees.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    cli_env,
    database_file,
    phone_numbers,
    run_cli,
    wait_for,
    write_config,
)
from tests.peers.processes import Process, count_records, read_records, start_twilio

SID = "AC" + "9d" * 16
TOKEN = "sigkill-token"
SENDER = "+15005550006"
RATE = 400  # messages per second: a 3,000 blast takes long enough to be hit ten times
KILLS = 10
# The nine random moments fall between these fractions of the audience, one per ninth.
SPREAD = (0.02, 0.92)
OPEN = ("pending", "claimed", "sending")
FINAL = ("sent", "delivered", "failed", "suppressed")


@dataclass(frozen=True, slots=True)
class Kill:
    """One SIGKILL: the provider's count it waited for, the count and run status at the kill."""

    threshold: int
    received: int
    run_status: str | None


def kill_moments(rng: random.Random, recipients: int) -> list[int]:
    """Provider counts to kill at: 0 (as early as possible), then one random point per ninth."""
    low, high = SPREAD
    width = (high - low) / (KILLS - 1)
    return [0] + [int(recipients * (low + width * (i + rng.random()))) for i in range(KILLS - 1)]


def daemon_env() -> dict[str, str]:
    """The CLI's environment, without TWILIO_* variables the SDK would read."""
    return {k: v for k, v in cli_env().items() if not k.startswith("TWILIO_")}


def start_daemon(config: Path, name: str) -> Process:
    """`dispatcher run --no-server CONFIG`, started and past its start-up."""
    daemon = Process(
        [sys.executable, "-m", "dispatcher.cli.main", "run", "--no-server", str(config)],
        cwd=config.parent,
        name=name,
        env=daemon_env(),
        logs=config.parent,
    )
    wait_for(
        lambda: "dispatcher running" in daemon.output or not daemon.alive(),
        60,
        f"{name} to start",
    )
    assert daemon.alive(), f"{name} exited early:\n{daemon.output}"
    return daemon


def query(config: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the daemon's SQLite file directly (a separate, read-only look)."""
    with sqlite3.connect(f"file:{database_file(config)}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute(sql).fetchall()


def run_progress(config: Path) -> tuple[str, int] | None:
    """The stage run's status and deliveries made so far, or None while it does not exist."""
    if not database_file(config).exists():
        return None
    try:
        rows = query(config, "SELECT status, deliveries FROM stage_runs")
    except sqlite3.OperationalError:  # the schema is not there yet
        return None
    return (str(rows[0][0]), int(rows[0][1])) if rows else None


def run_status(config: Path) -> str | None:
    """The stage run's status, or None while it does not exist yet."""
    progress = run_progress(config)
    return progress[0] if progress else None


def first_batch_made(config: Path) -> bool:
    """The materialisation committed its first deliveries (or is over already)."""
    progress = run_progress(config)
    return progress is not None and (progress[0] != "materialising" or progress[1] > 0)


def moment_reached(record: Path, threshold: int, floor: int) -> bool:
    """The provider has `threshold` messages, and more than the `floor` it had at the restart."""
    count = count_records(record)
    return count >= threshold and count > floor


def settled(config: Path) -> bool:
    """Nothing left for the engine: materialised, none open, no `unknown` it would reconcile."""
    if run_status(config) != "ready":
        return False
    [(busy,)] = query(
        config,
        "SELECT COUNT(*) FROM deliveries WHERE status IN ('pending', 'claimed', 'sending') "
        "OR (status = 'unknown' AND COALESCE(error_code, '') != 'unreconciled')",
    )
    return bool(busy == 0)


def kill_at(daemon: Process, config: Path, record: Path, threshold: int, recipients: int) -> Kill:
    """SIGKILL `daemon` once the provider has `threshold` messages (0: mid-materialisation)."""
    if threshold == 0:
        # As early as possible: in the middle of the materialisation, once its first batch of
        # deliveries is committed (a machine fast enough to finish first gets a kill just after).
        wait_for(
            lambda: first_batch_made(config) or not daemon.alive(),
            60,
            "the first batch of deliveries",
            interval=0.01,
        )
    else:
        # A moment when this process is sending: the provider's count passed the threshold,
        # and this process added to it.
        floor = count_records(record)
        wait_for(
            lambda: moment_reached(record, threshold, floor) or not daemon.alive(),
            recipients / RATE * 4 + 60,
            f"the provider to receive {threshold} messages ({daemon.name})",
            interval=0.01,
        )
    assert daemon.alive(), f"{daemon.name} exited by itself:\n{daemon.output}"
    daemon.process.send_signal(signal.SIGKILL)
    assert daemon.process.wait(timeout=30) == -signal.SIGKILL
    daemon.close()
    return Kill(threshold, count_records(record), run_status(config))


def blast_with_kills(tmp_path: Path, recipients: int, seed: int) -> None:
    """Blast `recipients` through ten SIGKILLs at `seed`'s moments, then check every promise."""
    rng = random.Random(seed)
    moments = kill_moments(rng, recipients)
    record = tmp_path / "received.jsonl"
    kills: list[Kill] = []
    daemons: list[Process] = []
    fake, port = start_twilio(tmp_path, record, sid=SID, token=TOKEN)
    try:
        config = write_config(
            tmp_path,
            recipients=recipients,
            stage={"grace": "1d"},
            channel={
                "type": "twilio",
                "seed": None,  # simulator-only defaults of write_config, dropped
                "receipts": None,
                "account_sid": SID,
                "auth_token": TOKEN,
                "from": SENDER,
                "api_base": f"http://127.0.0.1:{port}",
                "status_callback": False,
                "rate": RATE,
                "concurrency": 20,
            },
            # A restarted daemon settles a killed predecessor on this host at once (its pid is
            # gone); the short lease only bounds the wait should that check ever miss.
            engine={"heartbeat": "500ms", "lease": "5s", "poll_interval": "200ms"},
        )
        for number, threshold in enumerate(moments):
            daemon = start_daemon(config, f"daemon{number}")
            daemons.append(daemon)
            kills.append(kill_at(daemon, config, record, threshold, recipients))

        last = start_daemon(config, "daemon-final")
        daemons.append(last)
        try:
            wait_for(
                lambda: settled(config) or not last.alive(),
                recipients / RATE * 4 + 90,
                "every delivery to settle after the last restart",
                interval=0.25,
            )
        except AssertionError as exc:
            left = query(
                config,
                "SELECT status, error_code, COUNT(*) FROM deliveries GROUP BY status, error_code",
            )
            raise AssertionError(
                f"{exc}: {left}, run {run_status(config)}, seed {seed}, {kills}"
            ) from None
        assert last.alive(), f"the last daemon exited by itself:\n{last.output}"
        assert last.stop(signal.SIGTERM) == 0, last.output
        # Stopped, the fake has flushed and closed its record of every message it took.
        fake.stop(signal.SIGTERM)
    finally:
        for process in [*daemons, fake]:
            process.close()

    where = f"seed {seed}, kills {kills}"
    for daemon in daemons:
        assert "Traceback" not in daemon.output, f"{daemon.name}: {daemon.output}"

    # At the provider: every recipient, each exactly once.
    received = read_records(record)
    audience = {"+86" + number for number in phone_numbers(recipients)}
    to_counts = Counter(r["to"] for r in received)
    twice = {to: n for to, n in to_counts.items() if n > 1}
    assert not twice, f"{len(twice)} recipients got the message more than once ({where})"

    # In the database: one delivery per recipient, each final, every failure explained.
    rows = query(
        config, "SELECT id, address, status, reason, error_code, provider_id FROM deliveries"
    )
    per_address = Counter(address for _, address, *_ in rows)
    assert set(per_address) == audience, where
    assert max(per_address.values()) == 1, where
    by_status = Counter(status for _, _, status, *_ in rows)
    assert set(by_status) <= set(FINAL), f"left open or unknown: {dict(by_status)} ({where})"
    unexplained = [r for r in rows if r[2] in ("failed", "suppressed") and not (r[3] or r[4])]
    assert not unexplained, f"failed or suppressed without a reason: {unexplained[:5]}"

    # The provider's record and ours agree, message by message.
    sent = {
        address: provider_id
        for _, address, status, _, _, provider_id in rows
        if status in ("sent", "delivered")
    }
    assert len(received) == len(sent), (len(received), dict(by_status), where)
    assert sent == {r["to"]: r["sid"] for r in received}, where

    verify = run_cli("audit", "verify", str(config), timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    status = run_cli("status", "--json", str(config), timeout=60)
    assert status.returncode == 0, status.stderr
    [item] = [json.loads(line) for line in status.stdout.splitlines() if line.strip()]
    assert item["adds_up"] and item["deliveries"] == recipients, item
    assert {s: n for s, n in item["by_status"].items() if n} == dict(by_status), item
    assert not any(item["by_status"][s] for s in (*OPEN, "unknown")), item


@pytest.mark.parametrize(
    ("recipients", "seed"),
    [
        pytest.param(3_000, 7, id="3k"),
        pytest.param(20_000, 2010, id="20k", marks=pytest.mark.slow),
    ],
)
def test_sigkill_ten_times_mid_blast_sends_once_and_loses_nothing(
    tmp_path: Path, recipients: int, seed: int
) -> None:
    blast_with_kills(tmp_path, recipients, seed)
