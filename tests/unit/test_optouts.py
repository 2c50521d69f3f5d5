"""The opt-out list: reading number files, and add / remove / list / import on a SQLite file."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from dispatcher import audit, optouts
from dispatcher.errors import AudienceError, Problem
from dispatcher.server.twilio_hooks import OPT_OUT_KEYWORDS, normalise_keyword
from dispatcher.store.database import Database
from dispatcher.store.tables import AuditEntry

A = AuditEntry.__table__  # type: ignore[attr-defined]
NOW = datetime(2010, 9, 1, 2, 0, tzinfo=UTC)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database.open(f"sqlite:///{tmp_path / 'optouts.db'}")
    await database.upgrade()
    try:
        yield database
    finally:
        await database.close()


async def audit_rows(db: Database) -> list[tuple[str, str | None, dict[str, object]]]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(select(A.c.kind, A.c.subject, A.c.data).order_by(A.c.seq))
        return [(kind, subject, json.loads(data)) for kind, subject, data in rows]


# -- reading files ---------------------------------------------------------------------------


def test_plain_list_one_number_per_line(tmp_path: Path) -> None:
    path = tmp_path / "stop.txt"
    path.write_text(
        "13800138000\n\n# from the hotline\n+86 139-0013-9000\n１３８００１３８００１\n"
    )
    assert list(optouts.read_numbers(path)) == [
        (1, "+8613800138000"),
        (4, "+8613900139000"),
        (5, "+8613800138001"),
    ]


def test_csv_with_a_known_header_uses_that_column(tmp_path: Path) -> None:
    path = tmp_path / "stop.csv"
    path.write_bytes("姓名,手机\n张三,13800138000\n李四,12\n".encode("gb18030"))
    result = list(optouts.read_numbers(path))
    assert result[0] == (2, "+8613800138000")
    line, problem = result[1]
    assert line == 3 and isinstance(problem, Problem)
    assert str(problem) == f"{path}:3: **: too short (2 digits)"


def test_csv_with_an_unknown_header_uses_the_first_column(tmp_path: Path) -> None:
    path = tmp_path / "stop.csv"
    path.write_text("\ufeffwho,when\n13800138000,2010-09-01\n", encoding="utf-8")
    assert list(optouts.read_numbers(path)) == [(2, "+8613800138000")]


def test_bad_lines_are_reported_masked_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "stop.txt"
    path.write_text("13800138000\n1.38001E+10\n138001380009999\nabc\n")
    items = list(optouts.read_numbers(path))
    assert items[0] == (1, "+8613800138000")
    problems = [(line, str(p)) for line, p in items[1:] if isinstance(p, Problem)]
    assert [line for line, _ in problems] == [2, 3, 4]
    assert "scientific notation" in problems[0][1]
    assert "138001380009999" not in problems[1][1]  # masked


def test_region_applies_to_numbers_without_a_country_code(tmp_path: Path) -> None:
    path = tmp_path / "stop.txt"
    path.write_text("(201) 555-0123\n")
    assert list(optouts.read_numbers(path, "US")) == [(1, "+12015550123")]


def test_unreadable_encoding_is_an_audience_error(tmp_path: Path) -> None:
    path = tmp_path / "stop.txt"
    path.write_bytes(b"\x81\x20\x81\x20\xff\xfe\xfd")
    with pytest.raises(AudienceError, match="encoding"):
        list(optouts.read_numbers(path))


# -- the list in the database ----------------------------------------------------------------


async def test_add_lists_new_addresses_once_and_audits_each(db: Database) -> None:
    async with db.engine.begin() as conn:
        first = await optouts.add(
            conn,
            ["+8613800138000", "+8613900139000"],
            source="operator",
            actor="ops",
            now=NOW,
            details={"keyword": "STOP"},
        )
    async with db.engine.begin() as conn:
        again = await optouts.add(conn, ["+8613800138000"], source="operator", actor="ops", now=NOW)
    assert first == ["+8613800138000", "+8613900139000"]
    assert again == []
    assert await audit_rows(db) == [
        ("optout.add", "+8613800138000", {"source": "operator", "keyword": "STOP"}),
        ("optout.add", "+8613900139000", {"source": "operator", "keyword": "STOP"}),
    ]


async def test_remove_only_audits_what_was_listed(db: Database) -> None:
    async with db.engine.begin() as conn:
        await optouts.add(conn, ["+8613800138000"], source="reply:sms", actor="d", now=NOW)
        removed = await optouts.remove(
            conn, ["+8613800138000", "+8613900139000"], source="operator", actor="ops", now=NOW
        )
        assert await optouts.count(conn) == 0
    assert removed == ["+8613800138000"]
    kinds = [(kind, subject) for kind, subject, _ in await audit_rows(db)]
    assert kinds == [("optout.add", "+8613800138000"), ("optout.remove", "+8613800138000")]


async def test_a_failed_transaction_leaves_neither_list_nor_audit(db: Database) -> None:
    with pytest.raises(RuntimeError):
        async with db.engine.begin() as conn:
            await optouts.add(conn, ["+8613800138000"], source="operator", actor="ops", now=NOW)
            raise RuntimeError("rolled back")
    async with db.engine.connect() as conn:
        assert await optouts.count(conn) == 0
    assert await audit_rows(db) == []


async def test_entries_are_masked_unless_asked(db: Database) -> None:
    addresses = [f"+86138{i:08d}" for i in range(2500)]
    async with db.engine.begin() as conn:
        await optouts.add(conn, addresses, source="import:x", actor="ops", now=NOW)
    async with db.engine.connect() as conn:
        masked = [e async for e in optouts.entries(conn, batch=1000)]
        plain = [e.address async for e in optouts.entries(conn, unmasked=True, batch=1000)]
    assert plain == addresses
    assert masked[0].address == "+86138****0000"
    assert masked[0].source == "import:x" and masked[0].created_at == NOW


async def test_import_commits_in_batches_and_reports_bad_lines(
    db: Database, tmp_path: Path
) -> None:
    path = tmp_path / "stop.csv"
    lines = ["mobile"] + [f"138{i:08d}" for i in range(1200)] + ["oops", "13800000005"]
    path.write_text("\n".join(lines) + "\n")
    result = await optouts.import_file(db, path, region="CN", actor="ops", now=NOW)
    assert (result.added, result.already, result.lines) == (1200, 1, len(lines))
    assert [p.line for p in result.bad] == [len(lines) - 1]
    async with db.engine.connect() as conn:
        assert await optouts.count(conn) == 1200
        verified = await audit.verify(conn)
    assert verified.ok and verified.entries == 1200
    kind, subject, data = (await audit_rows(db))[0]
    assert (kind, subject) == ("optout.add", "+8613800000000")
    assert data == {"source": "import:stop.csv", "file": "stop.csv", "line": 2}


# -- reply keywords --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "keyword"),
    [("stop", "STOP"), ("ＳＴＯＰ", "STOP"), ("  退订 ", "退订"), ("\u3000td", "TD"), ("t", "T")],
)
def test_reply_keywords_are_normalised(body: str, keyword: str) -> None:
    assert normalise_keyword(body) == keyword
    assert keyword in OPT_OUT_KEYWORDS


def test_sentences_are_not_keywords() -> None:
    assert normalise_keyword("stop it") not in OPT_OUT_KEYWORDS
    assert normalise_keyword("不要退订") not in OPT_OUT_KEYWORDS


def test_emails_are_listed_too(tmp_path: Path) -> None:
    path = tmp_path / "stop.txt"
    path.write_text("Zhang.San@Example.CN\nnot@an@address\n")
    items = list(optouts.read_numbers(path))
    assert items[0] == (1, "Zhang.San@example.cn")
    assert isinstance(items[1][1], Problem) and "more than one '@'" in str(items[1][1])


# -- the command line ------------------------------------------------------------------------


def cli_config(tmp_path: Path) -> str:
    (tmp_path / "slogans").mkdir()
    path = tmp_path / "config.toml"
    path.write_text(
        '[dispatcher]\ndatabase = "sqlite:///var/cli.db"\ncampaigns = []\n'
        '[channels.sms]\ntype = "simulator"\n'
    )
    return str(path)


def test_cli_add_list_remove_import_masked_by_default(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dispatcher.cli.main import cli

    config = cli_config(tmp_path)
    runner = CliRunner()

    def dispatcher(*args: str) -> tuple[int, str]:
        result = runner.invoke(cli, list(args))
        return result.exit_code, result.output

    assert dispatcher("optout", "add", config, "13800138000", "a@b.cn") == (
        0,
        "2 added to the opt-out list, 0 already on it\n",
    )
    code, out = dispatcher("optout", "add", config, "13800138000", "12345")
    assert code == 2
    assert "12345" not in out and "***45: too short" in out
    (tmp_path / "more.txt").write_text("13900139000\nbad\n")
    code, out = dispatcher("optout", "import", config, str(tmp_path / "more.txt"))
    assert code == 0
    assert "more.txt:2: ***: contains 'b'" in out and "1 added, 0 already listed, 1 bad" in out

    code, out = dispatcher("optout", "list", config)
    assert code == 0
    assert "+86138****8000" in out and "+86139****9000" in out and "a***@b.cn" in out
    assert "13800138000" not in out and "3 addresses on the opt-out list" in out
    code, out = dispatcher("optout", "list", config, "--unmasked", "--json")
    assert [json.loads(line)["address"] for line in out.splitlines()] == [
        "+8613800138000",
        "+8613900139000",
        "a@b.cn",
    ]

    assert dispatcher("optout", "remove", config, "+86 138 0013 8000", "13700137000") == (
        0,
        "1 removed from the opt-out list, 1 were not on it\n",
    )
    code, out = dispatcher("optout", "list", config, "--json")
    assert [json.loads(line)["source"] for line in out.splitlines()] == [
        "import:more.txt",
        "operator",
    ]
    code, out = dispatcher("optout", "import", config, str(tmp_path / "missing.txt"))
    assert code == 2 and "file not found" in out
