"""`dispatcher audit verify` and `audit export` against a chain built by real work.

A rehearsal of the Quality Month campaign writes the chain; each test tampers with a copy of
that database directly with sqlite3 (as someone with file access would) and runs the CLI as an
operator does, in a subprocess, checking the exit status and the entry it names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dispatcher import audit
from dispatcher.store.database import Database

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ("at", "actor", "kind", "subject", "data", "prev_hash", "hash")


def dispatcher(*args: str, database: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    if database is not None:
        env["DISPATCHER_DATABASE_URL"] = f"sqlite:///{database}"
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, database) after rehearsing the campaign's first days: a chain of real entries."""
    root = tmp_path_factory.mktemp("rehearsal")
    for name in ("campaigns", "slogans"):
        shutil.copytree(REPO / name, root / name)
    shutil.copy(REPO / "config.example.toml", root / "config.toml")
    database = root / "rehearsal.db"
    result = dispatcher(
        "rehearse", str(root / "config.toml"), "--keep", str(database), "--to", "2010-09-03"
    )
    assert result.returncode == 0, result.stderr
    return root / "config.toml", database


@pytest.fixture
def chain(rehearsed: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """(config, a private copy of the rehearsal database) to tamper with."""
    config, database = rehearsed
    copy = tmp_path / "chain.db"
    shutil.copy(database, copy)
    return config, copy


@pytest.fixture
def db(chain: tuple[Path, Path]) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(chain[1], isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def entry_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM audit_log").fetchone()[0])


def middle_seq(conn: sqlite3.Connection) -> int:
    """A 'deliveries' entry well inside the chain (neither first nor last)."""
    total = entry_count(conn)
    row = conn.execute(
        "SELECT seq FROM audit_log WHERE kind = 'deliveries' AND seq > ? ORDER BY seq LIMIT 1",
        (total // 2,),
    ).fetchone()
    assert row is not None and 1 < row[0] < total
    return int(row[0])


def stored(conn: sqlite3.Connection, seq: int) -> dict[str, str | None]:
    row = conn.execute(
        f"SELECT {', '.join(COLUMNS)} FROM audit_log WHERE seq = ?", (seq,)
    ).fetchone()
    return dict(zip(COLUMNS, row, strict=True))


def forged_hash(prev_hash: str, seq: int, entry: dict[str, str | None]) -> str:
    """What a forger who knows the scheme computes for an entry (it is public, not a secret)."""
    at = datetime.fromisoformat(str(entry["at"])).replace(tzinfo=UTC)
    payload = audit.canonical(
        seq, at, str(entry["actor"]), str(entry["kind"]), entry["subject"], str(entry["data"])
    )
    return audit.entry_hash(prev_hash, payload)


def shift_seqs(conn: sqlite3.Connection, from_seq: int, by: int) -> None:
    # Two steps, since seq is the primary key and an in-place +1 collides with the next row.
    conn.execute("UPDATE audit_log SET seq = -(seq + ?) WHERE seq >= ?", (by, from_seq))
    conn.execute("UPDATE audit_log SET seq = -seq WHERE seq < 0")


def assert_broken_at(chain: tuple[Path, Path], seq: int, words: str) -> str:
    config, database = chain
    result = dispatcher("audit", "verify", str(config), database=database)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert f"broken at entry {seq}:" in result.stderr, result.stderr
    assert words in result.stderr, result.stderr
    assert "intact: " not in result.stdout
    return result.stderr


def test_the_untouched_chain_verifies(chain: tuple[Path, Path], db: sqlite3.Connection) -> None:
    # Every firing has its 'firing' and 'firing.materialised' entries, and its deliveries'
    # changes are in 'deliveries' batches: how many depends on how commits group (one commit
    # can carry several firings' changes), so only a floor.
    kinds = dict(db.execute("SELECT kind, count(*) FROM audit_log GROUP BY kind").fetchall())
    runs = int(db.execute("SELECT count(*) FROM stage_runs").fetchone()[0])
    assert runs >= 4
    assert kinds["firing"] == kinds["firing.materialised"] == runs
    assert kinds["deliveries"] >= 2
    total = entry_count(db)
    result = dispatcher("audit", "verify", str(chain[0]), database=chain[1])
    assert result.returncode == 0, result.stderr
    assert f"audit chain intact: {total} entries" in result.stdout
    head = db.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    assert f"head: entry {head[0]}, hash {head[1]}" in result.stdout


def test_an_edited_entry_is_found(chain: tuple[Path, Path], db: sqlite3.Connection) -> None:
    seq = middle_seq(db)
    data = str(stored(db, seq)["data"])
    # Rewrite the first delivery's recorded state, whichever it is (commits group differently
    # from run to run), as someone hiding what happened would.
    edited = re.sub(r'\[(\d+),"[a-z]+"', r'[\1,"suppressed"', data, count=1)
    if edited == data:
        edited = re.sub(r'\[(\d+),"[a-z]+"', r'[\1,"failed"', data, count=1)
    assert edited != data
    db.execute("UPDATE audit_log SET data = ? WHERE seq = ?", (edited, seq))
    assert_broken_at(chain, seq, "was altered")


def test_an_edited_entry_with_its_hash_recomputed_breaks_the_next_link(
    chain: tuple[Path, Path], db: sqlite3.Connection
) -> None:
    seq = middle_seq(db)
    entry = stored(db, seq)
    entry["data"] = json.dumps({"changes": []})
    digest = forged_hash(str(entry["prev_hash"]), seq, entry)
    db.execute(
        "UPDATE audit_log SET data = ?, hash = ? WHERE seq = ?", (entry["data"], digest, seq)
    )
    assert_broken_at(chain, seq + 1, f"does not follow entry {seq}")


def test_a_deleted_entry_is_found(chain: tuple[Path, Path], db: sqlite3.Connection) -> None:
    seq = middle_seq(db)
    db.execute("DELETE FROM audit_log WHERE seq = ?", (seq,))
    assert_broken_at(chain, seq, f"entry {seq} is missing")


def test_a_deleted_entry_with_the_rest_renumbered_is_found(
    chain: tuple[Path, Path], db: sqlite3.Connection
) -> None:
    seq = middle_seq(db)
    db.execute("DELETE FROM audit_log WHERE seq = ?", (seq,))
    shift_seqs(db, seq + 1, -1)
    assert_broken_at(chain, seq, f"does not follow entry {seq - 1}")


def test_two_entries_swapped_in_content_are_found(
    chain: tuple[Path, Path], db: sqlite3.Connection
) -> None:
    first = middle_seq(db)
    second = first + 3
    a, b = stored(db, first), stored(db, second)
    assignments = ", ".join(f"{c} = ?" for c in COLUMNS)
    db.execute(f"UPDATE audit_log SET {assignments} WHERE seq = ?", (*b.values(), first))
    db.execute(f"UPDATE audit_log SET {assignments} WHERE seq = ?", (*a.values(), second))
    assert_broken_at(chain, first, f"does not follow entry {first - 1}")


def test_two_entries_swapped_by_seq_are_found(
    chain: tuple[Path, Path], db: sqlite3.Connection
) -> None:
    first = middle_seq(db)
    second = first + 1
    db.execute("UPDATE audit_log SET seq = -1 WHERE seq = ?", (first,))
    db.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (first, second))
    db.execute("UPDATE audit_log SET seq = ? WHERE seq = -1", (second,))
    assert_broken_at(chain, first, f"does not follow entry {first - 1}")


def test_an_inserted_entry_linked_to_its_predecessor_breaks_the_next_link(
    chain: tuple[Path, Path], db: sqlite3.Connection
) -> None:
    # The most careful forgery short of rewriting the whole rest of the chain: the new entry
    # points at its predecessor and carries a correct hash, so the break shows right after it.
    seq = middle_seq(db)
    before = stored(db, seq - 1)
    shift_seqs(db, seq, 1)
    forged = dict(before) | {"kind": "optout.add", "subject": "forged", "data": "{}"}
    forged["prev_hash"] = before["hash"]
    forged["hash"] = forged_hash(str(before["hash"]), seq, forged)
    db.execute(
        f"INSERT INTO audit_log (seq, {', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, *forged.values()),
    )
    assert entry_count(db) > seq + 1
    assert_broken_at(chain, seq + 1, f"does not follow entry {seq}")


def test_an_inserted_entry_with_a_wrong_link_is_found_where_it_is(
    chain: tuple[Path, Path], db: sqlite3.Connection
) -> None:
    seq = middle_seq(db)
    older = stored(db, seq - 2)  # links to the entry before its predecessor
    shift_seqs(db, seq, 1)
    forged = dict(older) | {"kind": "optout.add", "subject": "forged", "data": "{}"}
    forged["prev_hash"] = older["hash"]
    forged["hash"] = forged_hash(str(older["hash"]), seq, forged)
    db.execute(
        f"INSERT INTO audit_log (seq, {', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, *forged.values()),
    )
    assert_broken_at(chain, seq, f"does not follow entry {seq - 1}")


def test_the_export_verifies_on_its_own_and_catches_tampering(
    chain: tuple[Path, Path], db: sqlite3.Connection, tmp_path: Path
) -> None:
    export = tmp_path / "audit.jsonl"
    result = dispatcher("audit", "export", str(chain[0]), "--out", str(export), database=chain[1])
    assert result.returncode == 0, result.stderr
    lines = export.read_text(encoding="utf-8").splitlines()
    assert len(lines) == entry_count(db)
    first = json.loads(lines[0])
    assert set(first) == {"seq", "at", "actor", "kind", "subject", "data", "prev_hash", "hash"}
    assert first["seq"] == 1 and first["prev_hash"] == "0" * 64
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["at"])
    assert first["hash"] == stored(db, 1)["hash"]

    # No config and no database needed.
    verified = dispatcher("audit", "verify", "--file", str(export))
    assert verified.returncode == 0, verified.stderr
    assert f"audit chain intact: {len(lines)} entries" in verified.stdout

    def verify_variant(name: str, variant: list[str]) -> subprocess.CompletedProcess[str]:
        path = tmp_path / name
        path.write_text("\n".join(variant) + "\n", encoding="utf-8")
        outcome = dispatcher("audit", "verify", "--file", str(path))
        assert outcome.returncode == 2, outcome.stdout
        assert "Traceback" not in outcome.stderr
        return outcome

    k = len(lines) // 2
    entry = json.loads(lines[k])
    entry["actor"] = "someone-else"
    edited = [*lines[:k], json.dumps(entry, ensure_ascii=False), *lines[k + 1 :]]
    assert (
        f"broken at entry {k + 1}: entry {k + 1} was altered"
        in verify_variant("edited.jsonl", edited).stderr
    )
    deleted = lines[:k] + lines[k + 1 :]
    assert (
        f"broken at entry {k + 1}: entry {k + 1} is missing"
        in verify_variant("deleted.jsonl", deleted).stderr
    )
    swapped = [*lines[:k], lines[k + 1], lines[k], *lines[k + 2 :]]
    assert f"broken at entry {k + 1}:" in verify_variant("swapped.jsonl", swapped).stderr
    garbled = [*lines[:k], "{not json", *lines[k + 1 :]]
    assert (
        f"garbled.jsonl:{k + 1}: not a JSON object"
        in verify_variant("garbled.jsonl", garbled).stderr
    )


def test_exporting_a_broken_chain_writes_the_evidence_and_fails(
    chain: tuple[Path, Path], db: sqlite3.Connection, tmp_path: Path
) -> None:
    seq = middle_seq(db)
    db.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = ?", (seq,))
    export = tmp_path / "audit.jsonl"
    result = dispatcher("audit", "export", str(chain[0]), "--out", str(export), database=chain[1])
    assert result.returncode == 2
    assert f"broken at entry {seq}" in result.stderr
    assert len(export.read_text(encoding="utf-8").splitlines()) == entry_count(db)
    verified = dispatcher("audit", "verify", "--file", str(export))
    assert verified.returncode == 2 and f"broken at entry {seq}:" in verified.stderr


def test_verify_needs_a_config_or_a_file_and_a_database(tmp_path: Path) -> None:
    neither = dispatcher("audit", "verify")
    assert neither.returncode == 2 and "CONFIG" in neither.stderr
    for name in ("campaigns", "slogans"):
        shutil.copytree(REPO / name, tmp_path / name)
    shutil.copy(REPO / "config.example.toml", tmp_path / "config.toml")
    missing = dispatcher("audit", "verify", str(tmp_path / "config.toml"))
    assert missing.returncode == 2
    assert "no database at" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "var" / "dispatcher.db").exists()


async def test_verify_walks_a_long_chain_in_constant_memory(tmp_path: Path) -> None:
    db = Database.open(f"sqlite:///{tmp_path / 'long.db'}")
    await db.upgrade()
    start = datetime(2010, 9, 1, tzinfo=UTC)
    payload = {"changes": [[n, "delivered", None] for n in range(20)], "note": "x" * 400}
    for block in range(40):
        async with db.engine.begin() as conn:
            events = [audit.AuditEvent("deliveries", "worker", None, payload)] * 1000
            await audit.append(conn, events, start + timedelta(seconds=block))
    tracemalloc.start()
    try:
        result = await audit.verify(db.engine, batch=500)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await db.close()
    assert result.ok and result.entries == 40_000 and result.head_seq == 40_000
    # 40,000 entries of ~1 kB each would need tens of MB if held at once; a batch needs ~1 MB.
    assert peak < 8 * 1024 * 1024, peak
