"""Provider faults under load: a blast through the real engine and the `twilio` channel.

The daemon (`dispatcher run` as a subprocess) sends one stage to N recipients through a
Twilio-compatible server on 127.0.0.1 that answers, by seeded draw, 10 % of its requests with
HTTP 500, 5 % with 429 and a Retry-After, resets 1 % of the connections before it takes the
message, and takes 1 % of the messages but holds the answer past the client's timeout.

What must hold afterwards: every recipient is accounted for and nothing is left to do; the
provider got every recipient, each exactly once unless an answer was lost (and then only
behind an `ambiguous` attempt); each held answer ended as an `unknown` delivery that the engine
reconciled through Twilio's Messages list (sent, with the provider's own sid), never a blind
resend; and every POST the provider saw is one attempt in the database.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, database_file, run_cli, wait_for, write_config
from tests.peers.twilio_server import FaultRates, StoredMessage, TwilioServer

SID = "AC" + "0123456789abcdef" * 2
TOKEN = "provider-faults-token-5e1f"
SENDER = "+15005550006"
OPEN = ("pending", "claimed", "sending")
RATES = FaultRates(server_error=0.10, throttle=0.05, reset=0.01, hang=0.01)


@contextmanager
def twilio_in_thread(seed: int) -> Iterator[TwilioServer]:
    """A faulty TwilioServer on its own event loop thread (the test itself stays synchronous)."""
    server = TwilioServer({SID: TOKEN}, rates=RATES, retry_after="1", hang_s=30.0, seed=seed)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="twilio-fake", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=10)
        yield server
    finally:
        # Stopping also aborts the answers still being held.
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def query(config: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the daemon's SQLite file directly (a separate, read-only look)."""
    with sqlite3.connect(f"file:{database_file(config)}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute(sql).fetchall()


def engine_idle(config: Path) -> bool:
    """Nothing left for the engine: no open delivery, no `unknown` it would still reconcile."""
    if not database_file(config).exists():
        return False
    try:
        runs = query(config, "SELECT status FROM stage_runs")
        [(busy,)] = query(
            config,
            "SELECT COUNT(*) FROM deliveries WHERE status IN ('pending', 'claimed', 'sending') "
            "OR (status = 'unknown' AND COALESCE(error_code, '') != 'unreconciled')",
        )
    except sqlite3.OperationalError:  # tables not created yet
        return False
    return len(runs) == 1 and runs[0][0] == "ready" and busy == 0


@pytest.mark.parametrize(
    ("recipients", "limit_s"),
    [
        pytest.param(2_000, 50, id="2k"),
        pytest.param(20_000, 300, id="20k", marks=pytest.mark.slow),
    ],
)
def test_provider_faults_lose_nothing_and_never_resend_blindly(
    tmp_path: Path, recipients: int, limit_s: float
) -> None:
    with twilio_in_thread(seed=2010) as server:
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
                "api_base": server.base_url,
                "status_callback": False,
                "timeout_s": 1,
                "rate": 10_000,
                "concurrency": 50,
            },
            engine={
                "backoff_base": "50ms",
                "backoff_max": "500ms",
                "max_attempts": 10,
                "poll_interval": "100ms",
                "heartbeat": "1s",
            },
        )
        daemon = Daemon(config)
        try:
            daemon.wait_running()
            wait_for(lambda: engine_idle(config), limit_s, "every delivery to settle", 0.25)
            assert daemon.stop(signal.SIGTERM) == 0, daemon.output
        finally:
            daemon.close()
        # What the provider got, read after the daemon stopped: no request is in flight now.
        messages: list[StoredMessage] = list(server.messages)
        stats = Counter(server.stats)

    assert "Traceback" not in daemon.output, daemon.output

    # The faults really happened, each kind more than once.
    for kind in ("server_error", "throttle", "reset", "hang"):
        assert stats[kind] > 0, f"no {kind} injected: {dict(stats)}"

    # Every recipient accounted for, by the operator's own report.
    result = run_cli("status", "--json", str(config), timeout=60)
    assert result.returncode == 0, result.stderr
    [item] = [json.loads(line) for line in result.stdout.splitlines()]
    by_status = {s: n for s, n in item["by_status"].items() if n}
    assert item["adds_up"] and item["deliveries"] == recipients, item
    assert sum(by_status.values()) == recipients
    assert not any(by_status.get(s) for s in OPEN), by_status
    # The fake's Messages list never fails, so every lost answer is reconciled and the ten
    # attempts outlast the 17 % of faulty answers: all of them end as sent.
    assert by_status == {"sent": recipients}, (by_status, item["errors"])

    deliveries = {
        address: (delivery_id, provider_id)
        for delivery_id, address, provider_id in query(
            config, "SELECT id, address, provider_id FROM deliveries"
        )
    }
    outcomes: dict[int, Counter[str]] = defaultdict(Counter)
    for delivery_id, outcome, n in query(
        config, "SELECT delivery_id, outcome, COUNT(*) FROM attempts GROUP BY 1, 2"
    ):
        outcomes[delivery_id][outcome] = n

    # Every POST the provider saw is one attempt on record (reconcile only reads the list).
    attempts = Counter[str]()
    for per_delivery in outcomes.values():
        attempts.update(per_delivery)
    assert attempts.total() == stats["requests"], (dict(attempts), dict(stats))
    # 500 and 429 are retried; a reset or a held answer is ambiguous, never a plain retry.
    assert attempts["retry"] == stats["server_error"] + stats["throttle"], dict(attempts)
    assert attempts["ambiguous"] == stats["reset"] + stats["hang"], dict(attempts)

    # The provider got every recipient, and nobody else.
    at_provider = Counter(m.to for m in messages)
    assert set(at_provider) == set(deliveries)

    # No duplicate unless the provider took a message whose answer was lost, and then only
    # for a delivery with an ambiguous attempt: anything else is a blind resend.
    duplicates = {a: n for a, n in at_provider.items() if n > 1}
    blind = {
        a: (n, dict(outcomes[deliveries[a][0]]))
        for a, n in duplicates.items()
        if not outcomes[deliveries[a][0]]["ambiguous"]
    }
    assert not blind, f"sent twice without an ambiguous attempt: {blind}"
    assert sum(n - 1 for n in duplicates.values()) <= stats["hang"], duplicates

    # Each delivery's provider id is a sid the provider issued for that very address: the
    # reconciled ones carry the sid of the message whose answer was held.
    sids: dict[str, set[str]] = defaultdict(set)
    for m in messages:
        sids[m.to].add(m.sid)
    wrong = {a: pid for a, (_, pid) in deliveries.items() if pid not in sids[a]}
    assert not wrong, f"provider ids not issued for their address: {wrong}"

    # Each held answer went unknown and was reconciled (sent without an accepted attempt),
    # never resent: exactly as many reconciled deliveries as held answers.
    reconciled = [a for a, (d, _) in deliveries.items() if outcomes[d]["accepted"] == 0]
    assert len(reconciled) == stats["hang"], (len(reconciled), dict(stats))
    assert all(outcomes[deliveries[a][0]]["ambiguous"] for a in reconciled)
    assert not duplicates, f"duplicates at the provider despite reconcile: {duplicates}"
