"""Audiences: stream a CSV export into normalised recipients, rejections and duplicates.

Audience files come from Excel and similar tools: GB18030 or UTF-8 (with or without a BOM),
messy numbers, stray blank rows, now and then a broken row. Nothing here loads a file whole:
rows are read one at a time, and duplicates are found through an on-disk SQLite set, so memory
stays flat however large the audience is. A broken row becomes a `Rejection` naming its line;
only a file that cannot be read at all raises `AudienceError`.
"""

from __future__ import annotations

import codecs
import csv
import re
import sqlite3
import tempfile
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal, Self, TextIO

import phonenumbers

from dispatcher.addresses import InvalidAddress, mask_address, normalise
from dispatcher.errors import AudienceError, Problem

if TYPE_CHECKING:
    import _csv

__all__ = [
    "AudienceCounts",
    "AudienceSource",
    "Recipient",
    "Rejection",
    "SeenSet",
    "count_audience",
    "dedupe",
    "detect_encoding",
    "first_recipients",
    "read_audience",
]

# Bytes read to guess the encoding: enough for hundreds of rows, small enough to be constant.
SNIFF_BYTES: Final = 64 * 1024
# Longest line and longest field accepted, in characters; longer ones reject their row.
LINE_LIMIT: Final = 64 * 1024
FIELD_LIMIT: Final = 64 * 1024

# A NUL or an undecodable byte (kept by the _UNDECODABLE handler as U+DC00..U+DCFF).
_BAD_CHAR: Final = re.compile("[\x00\udc00-\udcff]")
_UNDECODABLE: Final = "dispatcher.audience.undecodable"


def _keep_undecodable(exc: UnicodeError) -> tuple[str, int]:
    """Keep each undecodable byte as one lone surrogate, so its row can be rejected.

    errors="surrogateescape" does this for bytes from 0x80 only, and a broken UTF-16 or UTF-32
    sequence may hold lower ones: it would fail the whole file instead of one row.
    """
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return "".join(chr(0xDC00 + byte) for byte in exc.object[exc.start : exc.end]), exc.end


# A named, stateless handler: registering it again (on a reload) changes nothing.
codecs.register_error(_UNDECODABLE, _keep_undecodable)


@dataclass(frozen=True, slots=True)
class AudienceSource:
    """Where an audience is and how to read it.

    `columns` maps template variable names to CSV headers, for headers that are not valid or
    convenient variable names (`{"mobile": "手机"}`). `encoding=None` means detect it.
    """

    path: Path
    address_column: str
    kind: Literal["phone", "email"]
    region: str = "CN"
    encoding: str | None = None
    columns: Mapping[str, str] = field(default_factory=dict, hash=False)
    delimiter: str = ","

    def __post_init__(self) -> None:
        if not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))


@dataclass(frozen=True, slots=True)
class Recipient:
    """One valid audience row: its normalised address and its columns as template variables."""

    line: int
    address: str
    variables: dict[str, str]


@dataclass(frozen=True, slots=True)
class Rejection:
    """One audience row that will not be sent to, with why; `masked` is the masked raw value.

    `duplicate_of` is the line of the first row with the same address when that is the reason.
    """

    file: str
    line: int
    reason: str
    masked: str
    duplicate_of: int | None = None


@dataclass(slots=True)
class AudienceCounts:
    """How an audience's data rows split up: `rows == valid + invalid + duplicates`."""

    rows: int
    valid: int
    invalid: int
    duplicates: int


def detect_encoding(path: Path) -> str:
    """Return the encoding of the CSV at `path`: "utf-8-sig", "utf-8" or "gb18030".

    Judged from the first 64 KiB only, so it costs the same for any file size. A UTF-16 file
    with a byte-order mark (Excel's "Unicode text") gives "utf-16".
    """
    try:
        with open(path, "rb") as stream:
            head = stream.read(SNIFF_BYTES + 1)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    complete = len(head) <= SNIFF_BYTES
    head = head[:SNIFF_BYTES]
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    for encoding in ("utf-8", "gb18030"):
        # An incremental decoder keeps a multibyte character cut at the 64 KiB mark pending
        # instead of calling it an error.
        decoder = codecs.getincrementaldecoder(encoding)()
        try:
            decoder.decode(head, final=complete)
        except UnicodeDecodeError:
            continue
        return encoding
    raise AudienceError(
        [
            Problem(
                "cannot tell the text encoding: it is neither UTF-8 nor GB18030; save it from "
                'Excel as "CSV UTF-8", or set the audience\'s encoding',
                file=str(path),
            )
        ]
    )


def read_audience(source: AudienceSource) -> Generator[Recipient | Rejection, None, None]:
    """Yield each data row of `source` as a `Recipient` or a `Rejection`, in file order.

    Streams the file; `line` is the physical line where the row starts (the header is line 1
    when it is the first line). Fully blank rows are skipped. A file that cannot be read, or
    whose header lacks a needed column, raises `AudienceError` on the first iteration.
    Duplicates are not looked for here: see `dedupe`.
    """
    file = str(source.path)
    encoding = _resolve_encoding(source)
    _check_source(source)
    try:
        stream = open(  # noqa: SIM115 -- closed by the `with` below, inside the generator
            source.path, encoding=encoding, errors=_UNDECODABLE, newline=""
        )
    except OSError as exc:
        raise _unreadable(source.path, exc) from None
    with stream:
        try:
            yield from _read_rows(stream, source, file, encoding)
        except OSError as exc:
            raise _unreadable(source.path, exc) from None


def _resolve_encoding(source: AudienceSource) -> str:
    if source.encoding is None:
        return detect_encoding(source.path)
    try:
        return codecs.lookup(source.encoding).name
    except LookupError:
        raise AudienceError(
            [
                Problem(
                    f"unknown encoding {source.encoding!r} (try 'utf-8', 'utf-8-sig' or "
                    "'gb18030', or leave it out to detect it)",
                    file=str(source.path),
                    key="encoding",
                )
            ]
        ) from None


def _check_source(source: AudienceSource) -> None:
    file = str(source.path)
    if len(source.delimiter) != 1 or source.delimiter in '\r\n"':
        raise AudienceError(
            [
                Problem(
                    f"bad delimiter {source.delimiter!r}: must be one character",
                    file=file,
                    key="delimiter",
                )
            ]
        )
    if source.kind not in ("phone", "email"):
        raise AudienceError(
            [Problem(f"unknown kind {source.kind!r}: 'phone' or 'email'", file=file, key="kind")]
        )
    if source.kind == "phone" and source.region.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise AudienceError(
            [
                Problem(
                    f"unknown phone region {source.region!r} (an ISO code such as 'CN')",
                    file=file,
                    key="region",
                )
            ]
        )


def _unreadable(path: Path, exc: OSError) -> AudienceError:
    reason = "no such file" if isinstance(exc, FileNotFoundError) else exc.strerror or str(exc)
    return AudienceError([Problem(f"cannot read the audience file: {reason}", file=str(path))])


class _Lines:
    """The lines of a text stream for `csv.reader`, with what was wrong with them counted.

    Each line is read with a size cap, so one enormous line (or a binary file with no line
    breaks) costs bounded memory: the rest of it is skipped and a blank line stands in for it.
    """

    __slots__ = (
        "_encoding",
        "_file",
        "_pending",
        "_size",
        "_stream",
        "bad",
        "chars",
        "cut",
        "lines",
        "nul",
    )

    def __init__(self, stream: TextIO, limit: int, *, file: str, encoding: str) -> None:
        self._stream = stream
        self._file = file
        self._encoding = encoding
        self.lines = 0
        # Room for the line break too: "\r\n" after `limit` characters still fits.
        self._size = limit + 2
        self._pending: str | None = None
        self.chars = 0
        self.cut = 0
        self.bad = 0
        self.nul = 0

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> str:
        if self._pending is not None:
            line, self._pending = self._pending, None
        else:
            line = self._readline()
        if not line:
            raise StopIteration
        self.lines += 1
        if len(line) < self._size or line.endswith("\n"):
            self.chars += len(line)
            if _BAD_CHAR.search(line):
                self.bad += 1
                if "\x00" in line:
                    self.nul += 1
            return line
        self.cut += 1
        self._skip_rest(line)
        return "\n"

    def _skip_rest(self, tail: str) -> None:
        while not tail.endswith("\n"):
            chunk = self._readline()
            if not chunk:
                return
            if tail.endswith("\r"):
                # A "\r" at the size cap may be half of "\r\n", or a line break of its own, in
                # which case `chunk` is already the next line.
                if chunk != "\n":
                    self._pending = chunk
                return
            tail = chunk

    def _readline(self) -> str:
        try:
            return self._stream.readline(self._size)
        except UnicodeError as exc:
            # Not a byte sequence (those become bad rows) but the stream itself, such as
            # "utf-16" declared for a file without a byte-order mark: unreadable from here on.
            raise AudienceError(
                [
                    Problem(
                        f"not valid {self._encoding} text from this line on ({exc}); save the "
                        'file again from Excel as "CSV UTF-8", or set the audience\'s encoding',
                        file=self._file,
                        line=self.lines + 1,
                    )
                ]
            ) from None


def _read_rows(
    stream: TextIO, source: AudienceSource, file: str, encoding: str
) -> Iterator[Recipient | Rejection]:
    lines = _Lines(stream, LINE_LIMIT, file=file, encoding=encoding)
    reader = csv.reader(lines, delimiter=source.delimiter)
    headers, header_line = _read_header(reader, lines, file, encoding)
    address_index = _column_index(headers, source.address_column, file, header_line)
    renames = [
        (name, _column_index(headers, header, file, header_line, key=f"columns.{name}"))
        for name, header in source.columns.items()
    ]
    width = len(headers)
    named = [(index, name) for index, name in enumerate(headers) if name]
    all_named = len(named) == width
    kind, region = source.kind, source.region
    previous_end = reader.line_num
    while True:
        start = previous_end + 1
        cut, bad, nul, chars = lines.cut, lines.bad, lines.nul, lines.chars
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            previous_end = reader.line_num
            yield Rejection(file, start, f"malformed CSV row: {exc}", "")
            continue
        previous_end = reader.line_num
        if lines.cut != cut:
            yield Rejection(file, start, f"a line is longer than {LINE_LIMIT // 1024} KiB", "")
            continue
        values = [value.strip() for value in fields]
        if not any(values):
            continue
        if len(values) > width and not any(values[width:]):
            del values[width:]  # trailing empty cells, as some exports add
        raw = values[address_index] if address_index < len(values) else ""
        if lines.bad != bad:
            reason = (
                "contains NUL bytes (a binary file, or UTF-16 without a byte-order mark?)"
                if lines.nul != nul
                else f"contains bytes that are not valid {encoding} text"
            )
            yield Rejection(file, start, reason, mask_address(_BAD_CHAR.sub("\ufffd", raw)))
            continue
        if len(values) != width:
            yield Rejection(
                file,
                start,
                f"has {len(values)} fields where the header has {width} "
                f"(a missing or extra {source.delimiter!r}, or an unclosed quote?)",
                mask_address(raw),
            )
            continue
        if lines.chars - chars > FIELD_LIMIT and any(len(v) > FIELD_LIMIT for v in values):
            yield Rejection(file, start, f"a field is longer than {FIELD_LIMIT // 1024} KiB", "")
            continue
        try:
            address = normalise(raw, kind, region)
        except InvalidAddress as exc:
            yield Rejection(file, start, exc.reason, mask_address(raw))
            continue
        variables = (
            dict(zip(headers, values, strict=True))
            if all_named
            else {name: values[index] for index, name in named}
        )
        for name, index in renames:
            variables[name] = values[index]
        variables["address"] = address
        yield Recipient(start, address, variables)


def _read_header(
    reader: _csv.Reader, lines: _Lines, file: str, encoding: str
) -> tuple[list[str], int]:
    """Return the header's stripped names and its line, skipping blank lines before it."""
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            raise AudienceError(
                [Problem("the file is empty: expected a header row", file=file)]
            ) from None
        except csv.Error as exc:
            raise AudienceError(
                [Problem(f"malformed header row: {exc}", file=file, line=start)]
            ) from None
        if lines.cut or lines.bad:
            what = "is too long" if lines.cut else f"is not valid {encoding} text"
            raise AudienceError(
                [
                    Problem(
                        f"the header row {what}; is this the right file and encoding?",
                        file=file,
                        line=start,
                    )
                ]
            )
        headers = [name.strip() for name in fields]
        if any(headers):
            break
    headers[0] = headers[0].removeprefix("\ufeff").strip()
    while headers and not headers[-1]:
        headers.pop()  # empty trailing header cells that Excel leaves behind
    seen: set[str] = set()
    for name in headers:
        if name and name in seen:
            raise AudienceError(
                [
                    Problem(
                        f"the column {name!r} appears twice in the header",
                        file=file,
                        line=start,
                    )
                ]
            )
        seen.add(name)
    return headers, start


def _column_index(
    headers: list[str], column: str, file: str, line: int, *, key: str | None = None
) -> int:
    wanted = column.strip()
    try:
        return headers.index(wanted)
    except ValueError:
        found = ", ".join(repr(name) for name in headers if name)
        hint = next(
            (
                f" (the columns seem to be separated by {separator!r}: set the delimiter)"
                for separator in (";", "\t", "|")
                if len(headers) == 1 and separator in headers[0]
            ),
            "",
        )
        raise AudienceError(
            [
                Problem(
                    f"no column {wanted!r} in the header; the columns are: {found}{hint}",
                    file=file,
                    line=line,
                    key=key or wanted,
                )
            ]
        ) from None


class SeenSet:
    """A set of addresses that remembers the line each was first seen on, kept on disk.

    Backed by a SQLite file in a private temporary directory (deleted on `close`) with a
    bounded page cache, so a million addresses cost disk, not memory. Not for concurrent use.
    """

    _CHUNK: Final = 500  # bound parameters per query, well under SQLite's limit

    def __init__(self, *, cache_kib: int = 2048) -> None:
        self._directory = tempfile.TemporaryDirectory(
            prefix="dispatcher-seen-", ignore_cleanup_errors=True
        )
        # check_same_thread=False: a caller may step a generator from a thread pool
        # (asyncio.to_thread), one call at a time.
        self._db = sqlite3.connect(
            Path(self._directory.name) / "seen.sqlite3",
            isolation_level=None,
            check_same_thread=False,
        )
        # A scratch file that dies with the process needs no journal or fsync.
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute(f"PRAGMA cache_size = {-int(cache_kib)}")
        self._db.execute("PRAGMA temp_store = FILE")
        self._db.execute(
            "CREATE TABLE seen (address TEXT PRIMARY KEY, line INTEGER NOT NULL) WITHOUT ROWID"
        )
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the database and delete its temporary directory (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        self._db.close()
        self._directory.cleanup()

    def first_seen(self, addresses: Sequence[tuple[str, int]]) -> list[int | None]:
        """Record a batch of (address, line); for each, None if new, else its first line.

        Repeats inside the batch count too: the second occurrence gets the first one's line.
        """
        if self._closed:
            raise ValueError("SeenSet is closed")
        first_in_batch: dict[str, tuple[int, int]] = {}
        for position, (address, line) in enumerate(addresses):
            first_in_batch.setdefault(address, (position, line))
        known: dict[str, int] = {}
        unique = list(first_in_batch)
        for begin in range(0, len(unique), self._CHUNK):
            chunk = unique[begin : begin + self._CHUNK]
            marks = ",".join("?" * len(chunk))
            known.update(
                self._db.execute(
                    f"SELECT address, line FROM seen WHERE address IN ({marks})", chunk
                )
            )
        new = [
            (address, line) for address, (_, line) in first_in_batch.items() if address not in known
        ]
        self._db.execute("BEGIN")
        try:
            self._db.executemany("INSERT INTO seen (address, line) VALUES (?, ?)", new)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        result: list[int | None] = []
        for position, (address, _) in enumerate(addresses):
            earlier = known.get(address)
            if earlier is None:
                first_position, first_line = first_in_batch[address]
                earlier = None if first_position == position else first_line
            result.append(earlier)
        return result


def dedupe(
    rows: Iterable[Recipient | Rejection],
    batch: int = 5000,
    *,
    file: str = "",
    seen: SeenSet | None = None,
) -> Generator[Recipient | Rejection, None, None]:
    """Yield `rows` in order, each repeated address turned into a "duplicate of line N" rejection.

    Works `batch` rows at a time against a `SeenSet` (its own, unless `seen` is given to
    dedupe across several audiences); `file` names the duplicates' rejections.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    owned = seen is None
    seen_set = SeenSet() if seen is None else seen
    try:
        pending: list[Recipient | Rejection] = []
        for row in rows:
            pending.append(row)
            if len(pending) >= batch:
                yield from _mark_duplicates(pending, seen_set, file)
                pending = []
        if pending:
            yield from _mark_duplicates(pending, seen_set, file)
    finally:
        if owned:
            seen_set.close()


def _mark_duplicates(
    rows: list[Recipient | Rejection], seen: SeenSet, file: str
) -> Iterator[Recipient | Rejection]:
    recipients = [row for row in rows if isinstance(row, Recipient)]
    earlier = iter(seen.first_seen([(row.address, row.line) for row in recipients]))
    for row in rows:
        if isinstance(row, Rejection):
            yield row
            continue
        first_line = next(earlier)
        if first_line is None:
            yield row
        else:
            yield Rejection(
                file,
                row.line,
                f"duplicate of line {first_line}",
                mask_address(row.address),
                duplicate_of=first_line,
            )


def count_audience(source: AudienceSource) -> AudienceCounts:
    """Count `source`'s data rows as valid, invalid and duplicate, in constant memory."""
    counts = AudienceCounts(rows=0, valid=0, invalid=0, duplicates=0)
    with (
        closing(read_audience(source)) as rows,
        closing(dedupe(rows, file=str(source.path))) as unique,
    ):
        for row in unique:
            counts.rows += 1
            if isinstance(row, Recipient):
                counts.valid += 1
            elif row.duplicate_of is not None:
                counts.duplicates += 1
            else:
                counts.invalid += 1
    return counts


def first_recipients(source: AudienceSource, n: int) -> list[Recipient]:
    """Return the first `n` recipients of `source` that would be sent to (valid, not repeats)."""
    if n <= 0:
        return []
    found: list[Recipient] = []
    with (
        closing(read_audience(source)) as rows,
        closing(dedupe(rows, batch=min(5000, max(64, n)), file=str(source.path))) as unique,
    ):
        for row in unique:
            if isinstance(row, Recipient):
                found.append(row)
                if len(found) >= n:
                    break
    return found
