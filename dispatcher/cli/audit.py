"""`dispatcher audit`: verify the hash-chained audit log, in the database or in an export."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from sqlalchemy.engine import make_url

from dispatcher import audit as chain
from dispatcher.cli.common import console, load, run
from dispatcher.config.loader import Config
from dispatcher.errors import AuditError, OperatorError
from dispatcher.store.database import Database

EXPORT_FIELDS = ("seq", "at", "actor", "kind", "subject", "data", "prev_hash", "hash")
EXPORT_BATCH = 5000


async def open_existing(cfg: Config) -> Database:
    """The configured database, refusing to create an empty SQLite file for a read-only command."""
    url = make_url(cfg.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(str(url.database))
        if not await asyncio.to_thread(path.exists):
            raise OperatorError(
                f"no database at {path} (from {cfg.path}): nothing has been recorded yet; "
                "`dispatcher run`, `send` or `rehearse --keep FILE` create one"
            )
    db = Database.open(cfg.database_url)
    try:
        await db.upgrade()
    except BaseException:
        await db.close()
        raise
    return db


@click.group("audit")
def audit_group() -> None:
    """The audit log: verify its hash chain, export it."""


@audit_group.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--file",
    "export_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Verify an export (from `audit export`) instead of the database; no config needed.",
)
def verify(config: str | None, export_file: Path | None) -> None:
    """Walk the audit chain and report the first edited, deleted, reordered or inserted entry.

    Exits 0 only when every entry links to the one before it; otherwise names the entry.
    """
    if (config is None) == (export_file is None):
        raise click.UsageError("give CONFIG (verify the database) or --file EXPORT, not both")
    if export_file is not None:
        result = verify_export(export_file)
        where = str(export_file)
    else:
        cfg = load(config)  # type: ignore[arg-type]
        result = run(_verify_database(cfg))
        where = "the database"
    if not result.ok:
        raise AuditError(
            f"audit chain in {where} broken at entry {result.broken_at}: {result.problem}; "
            f"the {result.entries - 1} entries before it are intact"
        )
    out = console()
    out.print(f"audit chain intact: {result.entries} entries")
    if result.entries:
        # Only an outside record of the head shows that entries were cut off the end.
        out.print(
            f"head: entry {result.head_seq}, hash {result.head_hash} "
            "(keep this line elsewhere: a later verify must reach it)"
        )


async def _verify_database(cfg: Config) -> chain.VerifyResult:
    db = await open_existing(cfg)
    try:
        return await chain.verify(db.engine)
    finally:
        await db.close()


def read_export(path: Path) -> Iterator[dict[str, Any]]:
    """Entries of an export file, one JSON object per line, checked for shape (streaming)."""
    try:
        with path.open(encoding="utf-8") as stream:
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                yield _export_entry(path, number, line)
    except UnicodeDecodeError as exc:
        raise AuditError(f"{path}: not UTF-8 text ({exc.reason}): is it an audit export?") from exc
    except OSError as exc:
        raise AuditError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _export_entry(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise AuditError(f"{path}:{number}: not a JSON object ({exc.msg})") from exc
    if not isinstance(entry, dict):
        raise AuditError(f"{path}:{number}: not a JSON object")
    missing = [name for name in EXPORT_FIELDS if name not in entry]
    if missing:
        raise AuditError(f"{path}:{number}: missing {', '.join(missing)}")
    if not isinstance(entry["seq"], int) or isinstance(entry["seq"], bool):
        raise AuditError(f"{path}:{number}: seq must be a whole number")
    for name in ("at", "actor", "kind", "data", "prev_hash", "hash"):
        if not isinstance(entry[name], str):
            raise AuditError(f"{path}:{number}: {name} must be a string")
    if entry["subject"] is not None and not isinstance(entry["subject"], str):
        raise AuditError(f"{path}:{number}: subject must be a string or null")
    try:
        chain.export_record(entry)  # parses `at`
    except ValueError as exc:
        raise AuditError(f"{path}:{number}: at {entry['at']!r} is not an ISO 8601 time") from exc
    return entry


def verify_export(path: Path) -> chain.VerifyResult:
    """Verify an export file in constant memory."""
    return chain.verify_entries(read_export(path))


@audit_group.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write (JSON lines, one entry per line); `audit verify --file` checks it.",
)
def export(config: str, out: Path) -> None:
    """Write the whole audit chain as JSON lines: every field, hashes included, times in UTC."""
    cfg = load(config)
    result = run(_export(cfg, out))
    if not result.ok:
        raise AuditError(
            f"exported {result.entries} entries to {out}, but the chain is broken at entry "
            f"{result.broken_at}: {result.problem}"
        )
    console().print(
        f"exported {result.entries} entries to {out}; audit chain intact "
        f"(head: entry {result.head_seq}, hash {result.head_hash})"
    )


async def _export(cfg: Config, out: Path) -> chain.VerifyResult:
    """Stream the chain into `out` (through a temporary file, so a failure leaves no half file)."""
    db = await open_existing(cfg)
    partial = out.with_name(out.name + ".partial")
    verifier = chain.ChainVerifier()
    written = 0
    try:
        stream = await asyncio.to_thread(partial.open, "w", encoding="utf-8", newline="\n")
        try:
            lines: list[str] = []
            async for row in chain.iter_entries(db.engine, EXPORT_BATCH):
                verifier.check(row)
                lines.append(chain.export_line(row) + "\n")
                if len(lines) >= EXPORT_BATCH:
                    await asyncio.to_thread(stream.writelines, lines)
                    written += len(lines)
                    lines = []
            await asyncio.to_thread(stream.writelines, lines)
            written += len(lines)
        finally:
            await asyncio.to_thread(stream.close)
        await asyncio.to_thread(os.replace, partial, out)
    except OSError as exc:
        raise OperatorError(f"--out {out}: cannot write: {exc.strerror or exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
        await db.close()
    result = verifier.result
    # A broken chain still exports every entry (the export is the evidence), so count them all.
    return chain.VerifyResult(written, result.broken_at, result.problem, result.head_seq,
                              result.head_hash)  # fmt: skip
