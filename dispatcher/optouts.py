"""The opt-out list: add, remove, list and import addresses that must not be sent to.

Every change is appended to the audit chain in the same transaction as the change itself
(kinds "optout.add" / "optout.remove", subject the address), so the list and its history
never disagree. Workers check the list before every send (see `store.queue.mark_sending`).
"""

from __future__ import annotations

import asyncio
import csv
import unicodedata
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any, Final

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from dispatcher import audit
from dispatcher.addresses import (
    InvalidAddress,
    mask_address,
    normalise_email,
    normalise_phone,
)
from dispatcher.audience import detect_encoding
from dispatcher.errors import AudienceError, Problem
from dispatcher.store import queue
from dispatcher.store.database import Database
from dispatcher.store.tables import OptOut

__all__ = [
    "IMPORT_BATCH",
    "ImportResult",
    "OptOutEntry",
    "add",
    "count",
    "entries",
    "import_file",
    "read_numbers",
    "remove",
]

OPT = OptOut.__table__  # type: ignore[attr-defined]

#: Addresses committed per transaction when importing (each batch with its audit entries).
IMPORT_BATCH: Final = 500
# Header names that mark the phone column of an imported CSV (compared case-insensitively).
_PHONE_HEADERS: Final = frozenset(
    {
        "phone",
        "mobile",
        "number",
        "msisdn",
        "address",
        "tel",
        "手机",
        "手机号",
        "手机号码",
        "电话",
        "电话号码",
        "号码",
    }
)


@dataclass(frozen=True, slots=True)
class OptOutEntry:
    """One listed address (masked unless asked otherwise), where it came from and when."""

    address: str
    source: str
    created_at: datetime
    note: str | None


@dataclass(slots=True)
class ImportResult:
    """What an import did: lines read, addresses added, already listed, and the bad lines."""

    lines: int = 0
    added: int = 0
    already: int = 0
    bad: list[Problem] = field(default_factory=list)


async def add(
    conn: AsyncConnection,
    addresses: Iterable[str],
    *,
    source: str,
    actor: str,
    now: datetime,
    note: str | None = None,
    details: dict[str, Any] | None = None,
) -> list[str]:
    """List `addresses` (already normalised) in the caller's transaction; return those new.

    Each newly listed address gets one "optout.add" audit entry with `source` and `details`.
    """
    added = await queue.add_opt_outs(conn, addresses, source=source, now=now, note=note)
    await audit.append(
        conn,
        [
            audit.AuditEvent(
                "optout.add", actor, subject=a, data={"source": source, **(details or {})}
            )
            for a in added
        ],
        now,
    )
    return added


async def remove(
    conn: AsyncConnection,
    addresses: Iterable[str],
    *,
    source: str,
    actor: str,
    now: datetime,
    details: dict[str, Any] | None = None,
) -> list[str]:
    """Take `addresses` off the list in the caller's transaction; return those that were listed.

    Each removed address gets one "optout.remove" audit entry naming who asked (`source`).
    """
    wanted = sorted(set(addresses))
    if not wanted:
        return []
    result = await conn.execute(
        delete(OPT).where(OPT.c.address.in_(wanted)).returning(OPT.c.address)
    )
    removed = sorted(row[0] for row in result.all())
    await audit.append(
        conn,
        [
            audit.AuditEvent(
                "optout.remove", actor, subject=a, data={"source": source, **(details or {})}
            )
            for a in removed
        ],
        now,
    )
    return removed


async def count(conn: AsyncConnection) -> int:
    """How many addresses are listed."""
    return int((await conn.execute(select(func.count()).select_from(OPT))).scalar_one())


async def entries(
    conn: AsyncConnection, *, unmasked: bool = False, batch: int = 1000
) -> AsyncIterator[OptOutEntry]:
    """Every listed address in address order, masked unless `unmasked`, read in batches."""
    last: str | None = None
    while True:
        stmt = select(OPT.c.address, OPT.c.source, OPT.c.created_at, OPT.c.note).order_by(
            OPT.c.address
        )
        if last is not None:
            stmt = stmt.where(OPT.c.address > last)
        rows = (await conn.execute(stmt.limit(batch))).all()
        if not rows:
            return
        for row in rows:
            address = row.address if unmasked else mask_address(row.address)
            yield OptOutEntry(address, row.source, row.created_at, row.note)
        last = rows[-1].address


def read_numbers(path: Path, region: str = "CN") -> Iterator[tuple[int, str | Problem]]:
    """Yield (line, E.164 number) for each number in a CSV or TXT file, or (line, Problem).

    One number (or e-mail address) per line, or a CSV whose phone column is found by its
    header (phone, mobile, email, 手机, 电话, …) or is the first column. Blank lines, `#`
    comments and a header row are skipped. The encoding is detected as for audiences (UTF-8
    with or without BOM, GB18030). Problems show the value masked. An unreadable file
    raises `AudienceError`.
    """
    encoding = detect_encoding(path)
    name = str(path)
    try:
        with open(path, encoding=encoding, errors="replace", newline="") as stream:
            reader = csv.reader(stream)
            column = 0
            first = True
            for row in reader:
                line = reader.line_num
                cells = [unicodedata.normalize("NFKC", c).strip() for c in row]
                if not any(cells) or cells[0].startswith("#"):
                    continue
                if first:
                    first = False
                    header = _header_column(cells)
                    if header is not None:
                        column = header
                        continue
                raw = cells[column] if column < len(cells) else ""
                if not raw:
                    yield line, Problem("no number in this row", file=name, line=line)
                    continue
                try:
                    if "@" in raw:
                        yield line, normalise_email(raw)
                    else:
                        yield line, normalise_phone(raw, region, mobile_only=False)
                except InvalidAddress as exc:
                    yield line, Problem(f"{mask_address(raw)}: {exc.reason}", file=name, line=line)
    except OSError as exc:
        raise AudienceError(
            [Problem(f"cannot read the file: {exc.strerror or exc}", file=name)]
        ) from None
    except csv.Error as exc:
        raise AudienceError([Problem(f"not a readable CSV file: {exc}", file=name)]) from None


def _header_column(cells: Sequence[str]) -> int | None:
    """The phone column's index if `cells` is a header row, else None (a data row)."""
    for index, cell in enumerate(cells):
        if cell.lower() in _PHONE_HEADERS:
            return index
    # No digit and no "@" anywhere: a header with names we do not know; addresses in column 0.
    if not any(ch.isdigit() or ch == "@" for cell in cells for ch in cell):
        return 0
    return None


async def import_file(
    db: Database,
    path: Path,
    *,
    region: str = "CN",
    actor: str = "operator",
    now: datetime,
    source: str | None = None,
) -> ImportResult:
    """List every valid number of `path`, skipping (and reporting) bad lines.

    Commits every `IMPORT_BATCH` numbers with their audit entries, so a huge list does not
    hold the database's write lock for long; an interrupted import can simply be run again.
    The file is read off the event loop.
    """
    source = source or f"import:{path.name}"[:64]
    result = ImportResult()
    numbers = read_numbers(path, region)
    while True:
        chunk = await asyncio.to_thread(lambda: list(islice(numbers, IMPORT_BATCH)))
        if not chunk:
            return result
        lines: dict[str, int] = {}
        for line, item in chunk:
            result.lines = line
            if isinstance(item, Problem):
                result.bad.append(item)
            else:
                lines.setdefault(item, line)
        async with db.engine.begin() as conn:
            added = await queue.add_opt_outs(conn, lines, source=source, now=now)
            await audit.append(
                conn,
                [
                    audit.AuditEvent(
                        "optout.add",
                        actor,
                        subject=a,
                        data={"source": source, "file": path.name, "line": lines[a]},
                    )
                    for a in added
                ],
                now,
            )
        result.added += len(added)
        result.already += len(lines) - len(added)
