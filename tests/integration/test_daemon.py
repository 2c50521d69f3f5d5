"""`dispatcher run`, `send`, `status`, `retry` and `rehearse` as an operator runs them: subprocesses.

The crash test kills the daemon with SIGKILL in the middle of a blast and checks the promises on
what is left: nobody got the message twice, every recipient is accounted for, and only the
messages that were in flight at the kill are `unknown` until an operator requeues them.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    REPO,
    Daemon,
    database_file,
    local_now,
    read_send_log,
    run_cli,
    wait_for,
    write_config,
)

STATUS_KEYS = {
    "run",
    "campaign",
    "stage",
    "fire_time",
    "trigger",
    "status",
    "channel",
    "rows_read",
    "invalid",
    "duplicates",
    "deliveries",
    "by_status",
    "adds_up",
    "errors",
    "rate_per_s",
    "eta_s",
    "error",
}
ALL_STATUSES = {
    "pending",
    "claimed",
    "sending",
    "sent",
    "delivered",
    "failed",
    "suppressed",
    "unknown",
}
OPEN = ("pending", "claimed", "sending")


def status_json(config: Path) -> list[dict[str, Any]]:
    result = run_cli("status", "--json", str(config), timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def all_settled(config: Path, runs: int = 1) -> bool:
    items = status_json(config)
    return len(items) == runs and all(
        item["status"] in ("ready", "missed") and not any(item["by_status"][s] for s in OPEN)
        for item in items
    )


def query(config: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the daemon's SQLite file directly (a separate, read-only look)."""
    with sqlite3.connect(f"file:{database_file(config)}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute(sql).fetchall()


def test_sigkill_mid_blast_loses_nothing_and_sends_nothing_twice(tmp_path: Path) -> None:
    recipients = 2000
    config = write_config(
        tmp_path,
        recipients=recipients,
        stage={"grace": "1d"},
        channel={
            "rate": 200,
            "burst": 10,
            "concurrency": 40,
            "latency_ms": 50,
            "log": "sends.jsonl",
        },
    )
    send_log = tmp_path / "sends.jsonl"
    first = Daemon(config, "first")
    try:
        first.wait_running()
        wait_for(lambda: len(read_send_log(send_log)[0]) >= 300, 60, "the first sends")
        first.process.send_signal(signal.SIGKILL)
        assert first.process.wait(timeout=30) == -signal.SIGKILL
    finally:
        first.close()
    in_flight = {i for (i,) in query(config, "SELECT id FROM deliveries WHERE status = 'sending'")}
    assert in_flight, "some sends were in flight at the kill"

    second = Daemon(config, "second")
    try:
        second.wait_running()
        wait_for(
            lambda: all_settled(config), 120, "every delivery to settle after the restart", 0.5
        )
        assert second.stop(signal.SIGTERM) == 0, second.output
    finally:
        second.close()

    [item] = status_json(config)
    assert item["adds_up"] and item["rows_read"] == item["deliveries"] == recipients
    counts = {s: n for s, n in item["by_status"].items() if n}
    assert counts == {"sent": recipients - len(in_flight), "unknown": len(in_flight)}
    unknown = {i for (i,) in query(config, "SELECT id FROM deliveries WHERE status = 'unknown'")}
    assert unknown == in_flight
    sent, torn = read_send_log(send_log)
    assert torn <= 1  # at most the line being written at the kill
    assert max(Counter(r["delivery_id"] for r in sent).values()) == 1
    assert max(Counter(r["address"] for r in sent).values()) == 1
    assert "Traceback" not in second.output

    # The operator decides to resend what nobody can vouch for; the next run sends exactly those.
    retry = run_cli("retry", str(config), "--stage", "blast", "--unknown")
    assert retry.returncode == 0, retry.stderr
    assert f"{len(in_flight)} unknown deliveries of drill/blast queued again" in retry.stdout
    before = Counter(r["delivery_id"] for r in read_send_log(send_log)[0])
    third = Daemon(config, "third")
    try:
        third.wait_running()
        wait_for(lambda: all_settled(config), 60, "the requeued deliveries to be sent", 0.5)
        assert third.stop(signal.SIGTERM) == 0, third.output
    finally:
        third.close()
    [item] = status_json(config)
    assert {s: n for s, n in item["by_status"].items() if n} == {"sent": recipients}
    after = Counter(r["delivery_id"] for r in read_send_log(send_log)[0])
    assert set((after - before).elements()) == in_flight
    assert max(after.values()) <= 2 and {i for i, n in after.items() if n == 2} <= in_flight


def test_sigterm_stops_a_busy_daemon_cleanly_and_a_restart_finishes(tmp_path: Path) -> None:
    # A low rate and many concurrent sends: most of them are waiting for a token at any time.
    # Those are not in flight, so SIGTERM hands them back at once instead of sending them
    # one by one for the next ten seconds.
    config = write_config(
        tmp_path,
        recipients=100,
        channel={"rate": 2, "concurrency": 20, "latency_ms": 20, "log": "sends.jsonl"},
        engine={"shutdown_timeout": "30s"},
    )
    daemon = Daemon(config)
    try:
        daemon.wait_running()
        wait_for(
            lambda: len(read_send_log(tmp_path / "sends.jsonl")[0]) >= 3, 60, "the first sends"
        )
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM, timeout=60) == 0, daemon.output
        assert time.monotonic() - started < 5  # well under the 10 s the waiting sends would take
    finally:
        daemon.close()
    assert "stopped" in daemon.output and "Traceback" not in daemon.output
    # Nothing is left half-way: claimed rows went back to the queue, in-flight sends finished.
    states = dict(query(config, "SELECT status, COUNT(*) FROM deliveries GROUP BY status"))
    assert set(states) <= {"pending", "sent"} and states.get("pending", 0) > 0
    kinds = {k for (k,) in query(config, "SELECT DISTINCT kind FROM audit_log")}
    assert {"daemon.start", "daemon.stop", "firing", "firing.materialised", "deliveries"} <= kinds

    # The rest goes out after a restart (faster: the operator raised the rate meanwhile).
    config.write_text(
        config.read_text(encoding="utf-8").replace("rate = 2\n", "rate = 200\n"), encoding="utf-8"
    )
    again = Daemon(config, "again")
    try:
        again.wait_running()
        wait_for(lambda: all_settled(config), 60, "the rest of the blast", 0.5)
        assert again.stop(signal.SIGTERM) == 0
    finally:
        again.close()
    [item] = status_json(config)
    assert item["by_status"]["sent"] == 100 and item["adds_up"]
    sent, _ = read_send_log(tmp_path / "sends.jsonl")
    assert len(sent) == 100 and len({r["delivery_id"] for r in sent}) == 100


def test_sigterm_hands_back_sends_marked_in_flight_but_not_called(tmp_path: Path) -> None:
    # A slow provider and few slots: while two sends are calling, two more have their
    # in-flight mark and wait for a slot. They were never called, so SIGTERM undoes their mark
    # (back to pending, the attempt not counted) instead of leaving them `unknown`.
    config = write_config(
        tmp_path,
        recipients=40,
        channel={"rate": 1000, "concurrency": 2, "latency_ms": 700, "log": "sends.jsonl"},
    )
    daemon = Daemon(config)
    try:
        daemon.wait_running()
        wait_for(
            lambda: len(read_send_log(tmp_path / "sends.jsonl")[0]) >= 2, 60, "the first sends"
        )
        wait_for(
            lambda: (
                query(config, "SELECT COUNT(*) FROM deliveries WHERE status = 'sending'")[0][0] >= 4
            ),
            20,
            "sends marked in flight beyond the two calling",
            0.02,
        )
        assert daemon.stop(signal.SIGTERM, timeout=60) == 0, daemon.output
    finally:
        daemon.close()
    assert "Traceback" not in daemon.output
    rows = query(config, "SELECT status, attempts, COUNT(*) FROM deliveries GROUP BY 1, 2")
    states = {(status, attempts): count for status, attempts, count in rows}
    assert set(states) <= {("pending", 0), ("sent", 1)}, states
    sent, _ = read_send_log(tmp_path / "sends.jsonl")
    assert len(sent) == states[("sent", 1)] and len({r["delivery_id"] for r in sent}) == len(sent)
    assert states.get(("pending", 0), 0) >= 2  # at least the marked ones came back


def test_send_wait_fires_a_stage_now_and_status_reports_it(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        recipients=25,
        invalid=2,
        duplicates=1,
        at=local_now().replace(microsecond=0) + timedelta(hours=2),
    )
    result = run_cli("send", str(config), "--stage", "blast", "--wait")
    assert result.returncode == 0, result.stderr
    assert "run 1: 28 rows, 25 deliveries, 2 invalid, 1 duplicates" in result.stdout
    assert "sending: 25/25 settled" in result.stdout
    assert "adds up" in result.stdout

    [item] = status_json(config)
    assert set(item) == STATUS_KEYS
    assert set(item["by_status"]) == ALL_STATUSES
    assert (item["campaign"], item["stage"], item["trigger"], item["status"]) == (
        "drill",
        "blast",
        "manual",
        "ready",
    )
    assert (item["rows_read"], item["deliveries"], item["invalid"], item["duplicates"]) == (
        28,
        25,
        2,
        1,
    )
    assert item["by_status"]["sent"] == 25 and sum(item["by_status"].values()) == 25
    assert item["adds_up"] is True and item["error"] is None and item["errors"] == []

    table = run_cli("status", str(config))
    assert (
        table.returncode == 0
        and "1 stage runs, 25 deliveries, 25 accounted for (adds up)" in table.stdout
    )
    assert "13800000000" not in table.stdout + result.stdout


def test_send_without_wait_leaves_the_sending_to_the_daemon(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        recipients=30,
        channel={"log": "sends.jsonl"},
        at=local_now().replace(microsecond=0) + timedelta(hours=2),
    )
    queued = run_cli("send", str(config), "--stage", "drill/blast")
    assert queued.returncode == 0, queued.stderr
    [item] = status_json(config)
    assert item["by_status"]["pending"] == 30
    daemon = Daemon(config)
    try:
        daemon.wait_running()
        wait_for(lambda: all_settled(config), 60, "the daemon to send the manual run", 0.5)
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.close()
    [item] = status_json(config)  # the scheduled firing is two hours away: still one run
    assert item["by_status"]["sent"] == 30
    assert len(read_send_log(tmp_path / "sends.jsonl")[0]) == 30


def test_rehearse_the_example_campaign() -> None:
    result = run_cli("rehearse", "config.example.toml", cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "firing quality-month-2010/opening-blast" in result.stdout
    assert "13 stage runs, 658 deliveries, 658 accounted for (adds up)" in result.stdout
    assert "rehearsed 13 firings" in result.stdout
    assert "Traceback" not in result.stderr


def test_operator_errors_exit_2_without_a_traceback(tmp_path: Path) -> None:
    config = write_config(tmp_path, recipients=5)
    for args in (
        ("send", str(config), "--stage", "nope", "--wait"),
        ("retry", str(config), "--stage", "nope", "--unknown"),
    ):
        result = run_cli(*args)
        assert result.returncode == 2, result
        assert "no stage 'nope'" in result.stderr and "Traceback" not in result.stderr


def test_sigkill_mid_materialisation_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    recipients = 30_000
    config = write_config(
        tmp_path,
        recipients=recipients,
        invalid=7,
        duplicates=11,
        stage={"grace": "1d"},
        channel={"rate": 20, "log": "sends.jsonl"},
    )

    def materialising() -> bool:
        try:
            rows = query(config, "SELECT status, deliveries FROM stage_runs")
        except sqlite3.OperationalError:  # the schema is not there yet
            return False
        return bool(rows) and rows[0][0] == "materialising" and rows[0][1] > 0

    first = Daemon(config, "first")
    try:
        first.wait_running()
        wait_for(materialising, 60, "the first committed batch of deliveries")
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
    finally:
        first.close()
    [(status, checkpoint)] = query(config, "SELECT status, checkpoint_line FROM stage_runs")
    if status != "materialising":
        pytest.skip("this machine materialised 30,000 rows before the kill landed")
    assert 0 < checkpoint < recipients

    second = Daemon(config, "second")
    try:
        second.wait_running()
        wait_for(
            lambda: query(config, "SELECT status FROM stage_runs") == [("ready",)],
            120,
            "the materialisation to be resumed and finished",
        )
        assert second.stop(signal.SIGTERM) == 0, second.output
    finally:
        second.close()
    [item] = status_json(config)
    assert item["adds_up"]
    assert (item["rows_read"], item["deliveries"], item["invalid"], item["duplicates"]) == (
        recipients + 18,
        recipients,
        7,
        11,
    )
    assert query(config, "SELECT COUNT(DISTINCT address) FROM deliveries") == [(recipients,)]
    kinds = Counter(k for (k,) in query(config, "SELECT kind FROM audit_log"))
    assert kinds["firing"] == 1 and kinds["firing.materialised"] == 1


def test_a_shutdown_cut_short_settles_what_it_held_at_once(tmp_path: Path) -> None:
    # Sends that take longer than the shutdown timeout are cut off, and a materialisation still
    # under way stops at its next batch. What the stopping daemon held must not wait for its
    # lease (60 s) to run out: in-flight sends are `unknown` at once, and the next start resumes
    # the run at once.
    recipients = 30_000
    config = write_config(
        tmp_path,
        recipients=recipients,
        stage={"grace": "1d"},
        channel={"rate": 100, "concurrency": 5, "latency_ms": 5000},
        engine={"shutdown_timeout": "1s"},
    )

    def sending_while_materialising() -> bool:
        try:
            run = query(config, "SELECT status FROM stage_runs")
            busy = query(config, "SELECT COUNT(*) FROM deliveries WHERE status = 'sending'")
        except sqlite3.OperationalError:  # the schema is not there yet
            return False
        return run == [("materialising",)] and busy[0][0] > 0

    daemon = Daemon(config)
    try:
        daemon.wait_running()
        wait_for(sending_while_materialising, 60, "sends in flight during the materialisation")
        assert daemon.stop(signal.SIGTERM, timeout=60) == 0, daemon.output
    finally:
        daemon.close()
    states = dict(query(config, "SELECT status, COUNT(*) FROM deliveries GROUP BY status"))
    # Nothing is left claimed or in flight: sends cut off by the timeout are unknown already
    # (a send that was about to finish may have made it in time).
    assert set(states) <= {"pending", "unknown", "sent"} and states["pending"] > 0, states
    assert query(config, "SELECT status FROM stage_runs") == [("materialising",)]
    [(recovery,)] = query(config, "SELECT data FROM audit_log WHERE kind = 'recovery'")
    assert json.loads(recovery)["runs"] == [1]
    assert len(json.loads(recovery)["unknown"]) == states.get("unknown", 0)

    config.write_text(
        config.read_text(encoding="utf-8").replace("latency_ms = 5000", "latency_ms = 0"),
        encoding="utf-8",
    )
    again = Daemon(config, "again")
    try:
        again.wait_running()
        wait_for(
            lambda: query(config, "SELECT status FROM stage_runs") == [("ready",)],
            30,
            "the materialisation to resume (well before the 60 s lease runs out)",
        )
        assert again.stop(signal.SIGTERM, timeout=60) == 0
    finally:
        again.close()
    [item] = status_json(config)
    assert item["adds_up"] and item["deliveries"] == recipients
    assert item["by_status"]["unknown"] == states.get("unknown", 0)
