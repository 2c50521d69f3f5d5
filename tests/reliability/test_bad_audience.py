"""Bad audience CSVs: rows or rejections with true line numbers, or an AudienceError naming the file.

Audience files arrive from Excel and worse: any encoding, stray quotes, NULs, blank lines,
missing or extra cells, fields and lines of megabytes, or bytes that are not text at all.
Whatever the file, `read_audience` yields `Recipient`s and `Rejection`s whose lines grow
strictly from 2 on, or raises `AudienceError` naming the file (at once, or at the point where
the file stops being readable); `count_audience` agrees with it; nothing else is raised, and
memory stays bounded however long a line is.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dispatcher.audience import (
    AudienceSource,
    Recipient,
    Rejection,
    count_audience,
    read_audience,
)
from dispatcher.errors import AudienceError

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ENCODINGS = ["utf-8", "utf-8-sig", "gb18030", "utf-16", "latin-1"]
BIG = 70 * 1024  # over the reader's 64 KiB limits on lines and fields

# Cells as they come: good and bad numbers and addresses, quoting chaos, separators, NUL,
# line breaks of every kind, non-ASCII text, and cells longer than the limits.
CELL_SAMPLES = [
    "13800138000", "+86 138-0013-8001", "1.38001E+10", "13800138002.0", "010-12345678",
    "zhang.san@example.cn", "no-at-sign", "张三", "北京", "", " ", '"', '""', '"a,b"',
    '"unclosed', 'in"side', "a\x00b", "\x00", "\r", "\n", "\r\n", "\t", ";", "\ufeff", "é",
    "𝄞", "\u2028", "\x85",
]  # fmt: skip
CELLS = st.one_of(
    st.sampled_from(CELL_SAMPLES),
    st.text(max_size=12),
    st.just("9" * BIG),
    st.just('"' + "x" * BIG + '"'),
)
HEADER_SAMPLES = [
    "姓名,手机", "手机", "手机,姓名,城市", '"手机",email', "name,phone", "email,手机", "email",
    "姓名,email", "", "\n\n手机,姓名", "手机,手机", "手机;姓名", "\ufeff手机,姓名", "手机,,",
    "x" * BIG,
]  # fmt: skip
HEADERS = st.sampled_from(HEADER_SAMPLES)


GOOD = {
    "手机": ["13800138000", "+86 138-0013-8001", "138 0013 8002", "13800138003.0", "8613800138004"],
    "email": ["zhang.san@example.cn", "Li.Si@Example.CN", "w@qm2010.example.cn"],
}


@st.composite
def csv_texts(draw: st.DrawFn, column: str, delimiter: str) -> str:
    """A CSV text: mostly a header holding `column` and rows that fit it, with chaos mixed in."""
    if draw(st.integers(min_value=0, max_value=3)):
        names = draw(
            st.lists(st.sampled_from(["姓名", "城市", "备注", ""]), max_size=3, unique=True)
        )
        names.insert(draw(st.integers(min_value=0, max_value=len(names))), column)
        header = delimiter.join(names)
    else:
        names = [column]
        header = draw(HEADERS)
    address = names.index(column)
    separator = draw(st.sampled_from([delimiter, delimiter, delimiter, ","]))
    fitting = st.lists(CELLS, min_size=len(names), max_size=len(names))
    rows = []
    for _ in range(draw(st.integers(min_value=0, max_value=10))):
        kind = draw(st.integers(min_value=0, max_value=4))
        if kind == 0:
            rows.append(draw(st.sampled_from(["", ",,", "\r", '"', '"\n"', "\x00"])))
            continue
        cells = draw(fitting if kind > 1 else st.lists(CELLS, max_size=5))
        if kind > 2 and address < len(cells):
            cells[address] = draw(st.sampled_from(GOOD[column]))
        rows.append(separator.join(cells))
    breaks = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return breaks.join([header, *rows]) + draw(st.sampled_from(["", breaks]))


@st.composite
def audience_files(draw: st.DrawFn, column: str, delimiter: str) -> tuple[bytes, str | None]:
    """The bytes of an audience file, and the encoding its configuration names (None: detect)."""
    if draw(st.integers(min_value=0, max_value=5)) == 0:
        return draw(st.binary(max_size=600)), draw(st.sampled_from([None, *ENCODINGS]))
    encoding = draw(st.sampled_from(ENCODINGS))
    # surrogatepass/replace: a lone surrogate or an unencodable character is bad input too.
    errors = "surrogatepass" if encoding.startswith("utf") else "replace"
    data = draw(csv_texts(column, delimiter)).encode(encoding, errors)
    if draw(st.booleans()):
        cut = draw(st.integers(min_value=0, max_value=len(data)))
        data = data[:cut] + draw(st.binary(min_size=1, max_size=6)) + data[cut:]
    declared = draw(st.sampled_from([None, None, None, encoding, encoding, encoding, *ENCODINGS]))
    return data, declared


def source(
    path: Path,
    encoding: str | None,
    *,
    column: str = "手机",
    kind: Literal["phone", "email"] = "phone",
    delimiter: str = ",",
    columns: dict[str, str] | None = None,
) -> AudienceSource:
    return AudienceSource(
        path=path,
        address_column=column,
        kind=kind,
        encoding=encoding,
        columns=columns or {},
        delimiter=delimiter,
    )


def read_all(audience: AudienceSource) -> tuple[list[Recipient | Rejection], AudienceError | None]:
    """Every row `read_audience` yields, and the AudienceError that ended it, if one did."""
    rows: list[Recipient | Rejection] = []
    try:
        for row in read_audience(audience):
            rows.append(row)
    except AudienceError as exc:
        return rows, exc
    return rows, None


def check_audience(
    audience: AudienceSource,
) -> tuple[list[Recipient | Rejection], AudienceError | None]:
    """Read `audience` twice (rows, then counts), checking every promise; return what was read."""
    file = str(audience.path)
    rows, error = read_all(audience)
    previous = 1
    for row in rows:
        assert isinstance(row, Recipient | Rejection)
        assert row.line > previous, f"line {row.line} after line {previous}"
        previous = row.line
        if isinstance(row, Rejection):
            assert row.file == file
            assert row.reason.strip()
            assert row.duplicate_of is None  # read_audience does not look for repeats
        elif audience.kind == "phone":
            assert row.address.startswith("+") and row.address[1:].isdigit(), row.address
        else:
            assert row.address.count("@") == 1, row.address
    if error is not None:
        assert error.problems
        for problem in error.problems:
            assert problem.file == file, problem
            if problem.line is not None:
                assert problem.line > (rows[-1].line if rows else 0), problem
    # count_audience reads the same rows (and dedupes them), or fails the same way.
    try:
        counts = count_audience(audience)
    except AudienceError as exc:
        assert error is not None, f"count_audience failed alone: {exc}"
        assert [p.file for p in exc.problems] == [p.file for p in error.problems]
    else:
        assert error is None, f"count_audience succeeded where read_audience failed: {error}"
        assert counts.rows == len(rows)
        assert counts.valid + counts.invalid + counts.duplicates == counts.rows
        assert counts.invalid == sum(isinstance(row, Rejection) for row in rows)
    return rows, error


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Module-level temp dir: hypothesis runs many examples per test function call.
    yield tmp_path_factory.mktemp("audience") / "audience.csv"


@FUZZ
@given(st.data(), st.sampled_from(["phone", "email"]), st.sampled_from([",", ",", ";", "\t"]))
def test_any_file_gives_rows_in_line_order_or_an_error_naming_it(
    path: Path, data: st.DataObject, kind: Literal["phone", "email"], delimiter: str
) -> None:
    column = "手机" if kind == "phone" else "email"
    content, encoding = data.draw(audience_files(column, delimiter), label="file")
    columns = data.draw(st.sampled_from([{}, {}, {"name": "姓名"}]), label="columns")
    path.write_bytes(content)
    audience = source(
        path, encoding, column=column, kind=kind, delimiter=delimiter, columns=columns
    )
    rows, error = check_audience(audience)
    recipients = sum(isinstance(row, Recipient) for row in rows)
    event(f"{'error' if error else 'no error'}, {'some' if recipients else 'no'} recipients")


# -- cases worth keeping whatever the fuzzer draws -----------------------------------------------


BAD_UTF16 = (
    "手机\n13800138000\n".encode("utf-16") + b"\x00\xd8" + "3\n13800138001\n".encode("utf-16-le")
)


def _summary(rows: list[Recipient | Rejection]) -> list[tuple[str, int]]:
    return [(type(row).__name__, row.line) for row in rows]


def test_a_broken_utf16_sequence_rejects_its_row_only(tmp_path: Path) -> None:
    # A lone surrogate in line 3 of a UTF-16 file (detected by its byte-order mark): the
    # decoder's UnicodeDecodeError used to escape from read_audience, ending the whole file.
    path = tmp_path / "a.csv"
    path.write_bytes(BAD_UTF16)
    rows, error = check_audience(source(path, None))
    assert error is None
    assert _summary(rows) == [("Recipient", 2), ("Rejection", 3), ("Recipient", 4)]
    assert isinstance(rows[1], Rejection) and "not valid utf-16" in rows[1].reason


def test_a_truncated_utf16_file_rejects_its_last_row(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes("手机\n13800138000\n".encode("utf-16")[:-1])  # an odd number of bytes
    rows, error = check_audience(source(path, None))
    assert error is None
    assert _summary(rows) == [("Rejection", 2)]


@pytest.mark.parametrize(
    ("data", "declared", "why"),
    [
        ("手机\n13800138000\n".encode("utf-16-le"), "utf-16", "does not start with BOM"),
        (b"\xd8\x00\x00\xdc" * 3 + b"\x00", "utf-16", "does not start with BOM"),
        ("手机\n13800138000\n".encode("utf-32"), None, "header row is not valid utf-16"),
    ],
    ids=["utf-16 declared, no BOM", "garbage declared utf-16", "utf-32 (its BOM looks UTF-16)"],
)
def test_an_unreadable_utf16_stream_is_an_audience_error_on_line_1(
    tmp_path: Path, data: bytes, declared: str | None, why: str
) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(data)
    rows, error = check_audience(source(path, declared))
    assert rows == []
    assert error is not None
    [problem] = error.problems
    assert (problem.file, problem.line) == (str(path), 1)
    assert why in problem.message


@pytest.mark.parametrize(
    ("name", "data"),
    [
        (
            "one 5 MB data line",
            b"\xe6\x89\x8b\xe6\x9c\xba,n\n" + b"1" * 5_000_000 + b",x\n13800138000,y\n",
        ),
        ("one 5 MB header line", b"x" * 5_000_000),
        ("5 MB of NUL without a line break", b"\x00" * 5_000_000),
        (
            "5 MB quoted field over a few lines",
            '手机,n\n"'.encode() + (b"a" * 1_000_000 + b"\n") * 5,
        ),
        ("5 MB line of UTF-16", "手机,n\n".encode("utf-16") + "1".encode("utf-16-le") * 2_500_000),
        ("5 MB line ended by a lone CR", "手机,n\r".encode() + b"1" * 5_000_000 + b"\r1\r"),
    ],
)
def test_a_huge_line_costs_bounded_memory(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / "big.csv"
    path.write_bytes(data)
    audience = source(path, None)
    tracemalloc.start()
    try:
        rows, error = read_all(audience)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"{name}: peak {peak / 1e6:.1f} MB"
    check_audience(audience)
    if name == "one 5 MB data line":
        assert [(type(r).__name__, r.line) for r in rows] == [("Rejection", 2), ("Recipient", 3)]
        assert error is None
