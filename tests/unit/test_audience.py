"""Streaming audience CSVs: encodings, bad rows, line numbers, dedupe, counts, memory."""

from __future__ import annotations

import csv
import tracemalloc
from pathlib import Path

import pytest

from dispatcher.audience import (
    SNIFF_BYTES,
    AudienceCounts,
    AudienceSource,
    Recipient,
    Rejection,
    SeenSet,
    count_audience,
    dedupe,
    detect_encoding,
    first_recipients,
    read_audience,
)
from dispatcher.errors import AudienceError

AUDIENCES = Path(__file__).resolve().parents[2] / "campaigns" / "audiences"

HEADER = "姓名,手机,城市\n"


def write(tmp_path: Path, text: str, encoding: str = "utf-8", name: str = "a.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def phones(path: Path, **options: object) -> AudienceSource:
    return AudienceSource(path, "手机", "phone", **options)  # type: ignore[arg-type]


def rows(source: AudienceSource) -> list[Recipient | Rejection]:
    return list(read_audience(source))


def summary(items: list[Recipient | Rejection]) -> list[tuple[int, str]]:
    return [
        (item.line, item.address if isinstance(item, Recipient) else f"! {item.reason}")
        for item in items
    ]


@pytest.mark.parametrize(
    ("encoding", "detected"),
    [("utf-8", "utf-8"), ("utf-8-sig", "utf-8-sig"), ("gb18030", "gb18030")],
)
def test_each_encoding_is_detected_and_read(tmp_path: Path, encoding: str, detected: str) -> None:
    path = write(tmp_path, HEADER + "张三,138 0013 8000,北京\n李四,13912345678,上海\n", encoding)
    assert detect_encoding(path) == detected
    got = rows(phones(path))
    assert got == [
        Recipient(
            2,
            "+8613800138000",
            {"姓名": "张三", "手机": "138 0013 8000", "城市": "北京", "address": "+8613800138000"},
        ),
        Recipient(
            3,
            "+8613912345678",
            {"姓名": "李四", "手机": "13912345678", "城市": "上海", "address": "+8613912345678"},
        ),
    ]


def test_plain_ascii_is_utf8(tmp_path: Path) -> None:
    assert detect_encoding(write(tmp_path, "name,phone\nA,13800138000\n")) == "utf-8"


def test_utf16_with_bom_is_recognised(tmp_path: Path) -> None:
    path = write(tmp_path, "\ufeff姓名\t手机\r\n张三\t13800138000\r\n", "utf-16-le")
    assert detect_encoding(path) == "utf-16"
    [recipient] = rows(phones(path, delimiter="\t"))
    assert isinstance(recipient, Recipient)
    assert recipient.variables["姓名"] == "张三"


@pytest.mark.parametrize("encoding", ["utf-8", "gb18030"])
def test_detection_does_not_trip_on_a_character_cut_at_the_sniff_limit(
    tmp_path: Path, encoding: str
) -> None:
    # Pad so that a two-or-more-byte character straddles byte SNIFF_BYTES.
    header = HEADER.encode(encoding)
    row = "张三,13800138000,北京\n".encode(encoding)
    body = bytearray(header)
    while len(body) < SNIFF_BYTES - len(row):
        body += row
    pad = SNIFF_BYTES - 1 - len(body)
    body += b"x" * pad + "张".encode(encoding) + b",13800138000,x\n"
    assert body[SNIFF_BYTES - 1 : SNIFF_BYTES + 1] == "张".encode(encoding)[:2]
    path = tmp_path / "cut.csv"
    path.write_bytes(bytes(body))
    assert detect_encoding(path) == encoding


def test_unknown_encoding_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(b"name,phone\n\x80\x80\xff\xff,1\n")
    with pytest.raises(AudienceError, match="neither UTF-8 nor GB18030") as caught:
        detect_encoding(path)
    assert str(path) in str(caught.value)
    with pytest.raises(AudienceError, match=r"bad\.csv"):
        rows(phones(path))


def test_explicit_encoding_is_used(tmp_path: Path) -> None:
    path = write(tmp_path, "name,phone,city\nJosé,13800138000,São Paulo\n", "latin-1")
    source = AudienceSource(path, "phone", "phone", encoding="latin-1")
    [recipient] = rows(source)
    assert isinstance(recipient, Recipient)
    assert recipient.variables["name"] == "José"
    assert recipient.variables["city"] == "São Paulo"


def test_explicit_gb18030_reads_what_utf8_would_mangle(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "张三,13800138000,北京\n", "gb18030")
    [recipient] = rows(phones(path, encoding="GB18030"))
    assert isinstance(recipient, Recipient)
    assert recipient.variables["城市"] == "北京"


def test_unknown_explicit_encoding_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER)
    with pytest.raises(AudienceError, match="unknown encoding 'klingon'") as caught:
        rows(phones(path, encoding="klingon"))
    assert caught.value.problems[0].key == "encoding"


def test_explicit_utf8_on_a_bom_file_still_finds_the_first_column(tmp_path: Path) -> None:
    path = write(tmp_path, "手机,姓名\n13800138000,张三\n", "utf-8-sig")
    [recipient] = rows(phones(path, encoding="utf-8"))
    assert isinstance(recipient, Recipient)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.csv"
    with pytest.raises(AudienceError, match="no such file") as caught:
        rows(phones(path))
    assert caught.value.problems[0].file == str(path)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AudienceError, match="empty"):
        rows(phones(write(tmp_path, "")))


def test_header_only_file_has_no_rows(tmp_path: Path) -> None:
    assert rows(phones(write(tmp_path, HEADER))) == []


def test_missing_address_column_lists_the_headers_found(tmp_path: Path) -> None:
    path = write(tmp_path, "姓名,电话,城市\n张三,13800138000,北京\n")
    with pytest.raises(AudienceError) as caught:
        rows(phones(path))
    [problem] = caught.value.problems
    assert problem.file == str(path)
    assert problem.line == 1
    assert problem.key == "手机"
    assert "no column '手机'" in problem.message
    assert "'姓名', '电话', '城市'" in problem.message


def test_missing_column_hints_at_another_delimiter(tmp_path: Path) -> None:
    path = write(tmp_path, "姓名;手机;城市\n张三;13800138000;北京\n")
    with pytest.raises(AudienceError, match="separated by ';': set the delimiter"):
        rows(phones(path))
    assert summary(rows(phones(path, delimiter=";"))) == [(2, "+8613800138000")]


def test_missing_mapped_column_is_an_error_naming_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "张三,13800138000,北京\n")
    with pytest.raises(AudienceError, match="no column '单位'") as caught:
        rows(phones(path, columns={"unit": "单位"}))
    assert caught.value.problems[0].key == "columns.unit"


def test_duplicate_header_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AudienceError, match="appears twice"):
        rows(phones(write(tmp_path, "手机,城市,城市\n13800138000,a,b\n")))


def test_renamed_columns_are_variables_too(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "张三,13800138000,北京\n")
    [recipient] = rows(phones(path, columns={"name": "姓名", "city": "城市"}))
    assert isinstance(recipient, Recipient)
    assert recipient.variables == {
        "姓名": "张三",
        "手机": "13800138000",
        "城市": "北京",
        "name": "张三",
        "city": "北京",
        "address": "+8613800138000",
    }


def test_whitespace_is_stripped_and_blank_rows_skipped(tmp_path: Path) -> None:
    text = " 姓名 , 手机 ,城市\n\n  张三 ,  13800138000 , 北京 \n,,\n , ,\n李四,13912345678,上海\n"
    got = rows(phones(write(tmp_path, text)))
    assert summary(got) == [(3, "+8613800138000"), (6, "+8613912345678")]
    first = got[0]
    assert isinstance(first, Recipient)
    assert first.variables["姓名"] == "张三"
    assert first.variables["城市"] == "北京"


def test_excel_trailing_empty_cells_are_tolerated(tmp_path: Path) -> None:
    text = "姓名,手机,城市,,\n张三,13800138000,北京,,\n李四,13912345678,上海\n"
    assert summary(rows(phones(write(tmp_path, text)))) == [
        (2, "+8613800138000"),
        (3, "+8613912345678"),
    ]


def test_bad_rows_are_rejections_with_their_lines_and_reading_goes_on(tmp_path: Path) -> None:
    text = (
        HEADER
        + "张三,13800138000,北京\n"  # 2
        + "李四,13912345678\n"  # 3: too few fields
        + "王五,13712345678,上海,多余\n"  # 4: too many fields
        + "赵六,010 6521 3456,北京\n"  # 5: landline
        + "钱七,12345,北京\n"  # 6: invalid
        + "孙八,,北京\n"  # 7: empty
        + "周九,135\x0012345678,北京\n"  # 8: NUL byte
        + '吴十,13612345678,"'
        + "长" * (70 * 1024)
        + '"\n'  # 9: field over 64 KiB
        + "郑一,13512345678,深圳\n"  # 10
    )
    got = rows(phones(write(tmp_path, text)))
    assert summary(got) == [
        (2, "+8613800138000"),
        (
            3,
            "! has 2 fields where the header has 3 (a missing or extra ',', or an unclosed quote?)",
        ),
        (
            4,
            "! has 4 fields where the header has 3 (a missing or extra ',', or an unclosed quote?)",
        ),
        (5, "! landline, not a mobile number (SMS needs a mobile)"),
        (6, "! too short for a full number (5 digits)"),
        (7, "! empty"),
        (8, "! contains NUL bytes (a binary file, or UTF-16 without a byte-order mark?)"),
        (9, "! a line is longer than 64 KiB"),
        (10, "+8613512345678"),
    ]
    rejected = [item for item in got if isinstance(item, Rejection)]
    assert {item.file for item in rejected} == {str(tmp_path / "a.csv")}
    masked = {item.line: item.masked for item in rejected}
    assert masked[5] == "***********56"  # the raw value, masked
    assert masked[3] == "*********78"


def test_quoted_fields_with_newlines_keep_later_line_numbers_right(tmp_path: Path) -> None:
    text = (
        HEADER
        + '张三,13800138000,"北京\n朝阳区\n建国路"\n'  # lines 2-4
        + "李四,13912345678,上海\n"  # line 5
        + '王五,"137 1234\r\n5678",广州\n'  # lines 6-7: number broken across lines
        + "赵六,13612345678,深圳\n"  # line 8
    )
    got = rows(phones(write(tmp_path, text)))
    assert summary(got) == [
        (2, "+8613800138000"),
        (5, "+8613912345678"),
        (6, "+8613712345678"),
        (8, "+8613612345678"),
    ]
    first = got[0]
    assert isinstance(first, Recipient)
    assert first.variables["城市"] == "北京\n朝阳区\n建国路"


def test_crlf_and_cr_line_endings_count_lines(tmp_path: Path) -> None:
    text = "姓名,手机\r\n张三,13800138000\r\n\r\n李四,13912345678\r王五,13712345678\r\n"
    assert summary(rows(phones(write(tmp_path, text)))) == [
        (2, "+8613800138000"),
        (4, "+8613912345678"),
        (5, "+8613712345678"),
    ]


def test_multiline_field_over_64_kib_is_a_rejection(tmp_path: Path) -> None:
    big = "\n".join(["长" * 1000] * 80)  # 80 lines, each short, 80 000 characters in all
    text = HEADER + f'张三,13800138000,"{big}"\n李四,13912345678,上海\n'
    assert summary(rows(phones(write(tmp_path, text)))) == [
        (2, "! a field is longer than 64 KiB"),
        (82, "+8613912345678"),
    ]


def test_unclosed_quote_does_not_stop_the_file(tmp_path: Path) -> None:
    text = (
        HEADER + '张三,"13800138000,北京\n' + ("x" * 1000 + "\n") * 200 + "李四,13912345678,上海\n"
    )
    got = rows(phones(write(tmp_path, text)))
    # The open quote swallows lines until csv's own field limit; then reading resumes.
    assert got[0] == Rejection(
        str(tmp_path / "a.csv"), 2, "malformed CSV row: field larger than field limit (131072)", ""
    )
    assert summary(got)[-1] == (203, "+8613912345678")
    assert all(isinstance(item, Rejection) for item in got[:-1])


def test_a_line_with_no_line_break_costs_bounded_memory(tmp_path: Path) -> None:
    text = (
        HEADER + "张三,13800138000,北京\n" + "y" * (3 * 1024 * 1024) + "\r李四,13912345678,上海\n"
    )
    got = rows(phones(write(tmp_path, text)))
    assert summary(got) == [
        (2, "+8613800138000"),
        (3, "! a line is longer than 64 KiB"),
        (4, "+8613912345678"),
    ]


def test_undecodable_bytes_past_the_sniffed_prefix_reject_only_their_row(tmp_path: Path) -> None:
    good = "张三,13800138000,北京\n".encode()
    body = bytearray(HEADER.encode())
    count = SNIFF_BYTES // len(good) + 10
    for _ in range(count):
        body += good
    body += b"\xe5\xbc,13912345678,\xff\xfe\n"  # broken UTF-8
    body += "李四,13712345678,上海\n".encode()
    path = tmp_path / "late.csv"
    path.write_bytes(bytes(body))
    assert detect_encoding(path) == "utf-8"
    got = rows(phones(path))
    assert len(got) == count + 2
    bad, last = got[-2], got[-1]
    assert bad == Rejection(
        str(path), count + 2, "contains bytes that are not valid utf-8 text", "*********78"
    )
    assert isinstance(last, Recipient)
    assert (last.line, last.address) == (count + 3, "+8613712345678")


def test_email_audience(tmp_path: Path) -> None:
    text = "organisation,email\nA,Li@Example.ORG\nB,not-an-email\n"
    source = AudienceSource(write(tmp_path, text), "email", "email")
    assert summary(rows(source)) == [(2, "Li@example.org"), (3, "! no '@'")]


def test_bad_source_settings_are_errors_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER)
    with pytest.raises(AudienceError) as caught:
        rows(phones(path, region="XX"))
    assert caught.value.problems[0].key == "region"
    with pytest.raises(AudienceError) as caught:
        rows(phones(path, delimiter=";;"))
    assert caught.value.problems[0].key == "delimiter"


def test_seen_set_reports_first_lines_within_and_across_batches(tmp_path: Path) -> None:
    with SeenSet() as seen:
        assert seen.first_seen([]) == []
        assert seen.first_seen([("+861", 2), ("+862", 3), ("+861", 4), ("+861", 5)]) == [
            None,
            None,
            2,
            2,
        ]
        assert seen.first_seen([("+862", 9), ("+863", 10), ("+863", 11)]) == [3, None, 10]
    with pytest.raises(ValueError, match="closed"):
        seen.first_seen([("+864", 1)])


def test_seen_set_deletes_its_temporary_directory(tmp_path: Path) -> None:
    seen = SeenSet()
    directory = Path(seen._directory.name)
    assert (directory / "seen.sqlite3").exists()
    seen.close()
    seen.close()
    assert not directory.exists()


def test_seen_set_handles_batches_larger_than_one_query(tmp_path: Path) -> None:
    with SeenSet() as seen:
        first = [(f"+86138{index:08d}", index) for index in range(1800)]
        assert seen.first_seen(first) == [None] * 1800
        again = [(address, line + 5000) for address, line in reversed(first)]
        assert seen.first_seen(again) == [line for _, line in reversed(first)]


@pytest.mark.parametrize("batch", [1, 2, 5000])
def test_dedupe_finds_the_same_number_in_other_formats(tmp_path: Path, batch: int) -> None:
    text = (
        HEADER
        + "张三,13800138000,北京\n"  # 2
        + "张三,+86 138-0013-8000,北京\n"  # 3
        + "李四,13912345678,上海\n"  # 4
        + "坏,12,上海\n"  # 5
        + "张三,１３８００１３８０００,北京\n"  # 6
        + "李四,0086 139 1234 5678,上海\n"  # 7
        + "王五,13712345678.0,广州\n"  # 8
    )
    path = write(tmp_path, text)
    got = list(dedupe(read_audience(phones(path)), batch, file=str(path)))
    assert summary(got) == [
        (2, "+8613800138000"),
        (3, "! duplicate of line 2"),
        (4, "+8613912345678"),
        (5, "! too short (2 digits)"),
        (6, "! duplicate of line 2"),
        (7, "! duplicate of line 4"),
        (8, "+8613712345678"),
    ]
    duplicate = got[1]
    assert duplicate == Rejection(
        str(path), 3, "duplicate of line 2", "+86138****8000", duplicate_of=2
    )


def test_dedupe_across_two_audiences_with_a_shared_seen_set(tmp_path: Path) -> None:
    first = write(tmp_path, HEADER + "张三,13800138000,北京\n", name="one.csv")
    second = write(
        tmp_path, HEADER + "张三,138 0013 8000,北京\n李四,13912345678,上海\n", name="two.csv"
    )
    with SeenSet() as seen:
        one = list(dedupe(read_audience(phones(first)), file=str(first), seen=seen))
        two = list(dedupe(read_audience(phones(second)), file=str(second), seen=seen))
    assert summary(one) == [(2, "+8613800138000")]
    assert summary(two) == [(2, "! duplicate of line 2"), (3, "+8613912345678")]


def test_dedupe_rejects_a_bad_batch_size() -> None:
    with pytest.raises(ValueError):
        list(dedupe([], 0))


def test_sample_public_audience_counts() -> None:
    source = AudienceSource(AUDIENCES / "public.csv", "手机", "phone")
    assert detect_encoding(source.path) == "gb18030"
    assert count_audience(source) == AudienceCounts(rows=66, valid=58, invalid=5, duplicates=3)
    reasons = sorted(item.reason for item in read_audience(source) if isinstance(item, Rejection))
    assert [reason.split(" (")[0].split(",")[0] for reason in reasons] == [
        "empty",
        "landline",
        "landline",
        "not a valid number for region CN",
        "the cell was exported as a number in scientific notation",
    ]


def test_sample_partner_audience_counts() -> None:
    source = AudienceSource(AUDIENCES / "partners.csv", "email", "email")
    assert detect_encoding(source.path) == "utf-8-sig"
    assert count_audience(source) == AudienceCounts(rows=12, valid=10, invalid=1, duplicates=1)


def test_first_recipients_skips_rejections_and_duplicates(tmp_path: Path) -> None:
    text = (
        HEADER
        + "张三,13800138000,北京\n"
        + "坏,12,上海\n"
        + "张三,138 0013 8000,北京\n"
        + "李四,13912345678,上海\n"
        + "王五,13712345678,广州\n"
    )
    source = phones(write(tmp_path, text))
    assert [(r.line, r.address) for r in first_recipients(source, 2)] == [
        (2, "+8613800138000"),
        (5, "+8613912345678"),
    ]
    assert first_recipients(source, 0) == []
    assert len(first_recipients(source, 10)) == 3


def test_sample_public_first_recipients_expose_template_variables() -> None:
    source = AudienceSource(
        AUDIENCES / "public.csv", "手机", "phone", columns={"name": "姓名", "unit": "单位"}
    )
    recipients = first_recipients(source, 5)
    assert len(recipients) == 5
    for recipient in recipients:
        assert recipient.address.startswith("+861")
        assert recipient.variables["address"] == recipient.address
        assert recipient.variables["name"] == recipient.variables["姓名"] != ""
        assert recipient.variables["unit"] == recipient.variables["单位"] != ""


def test_counting_200k_rows_stays_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    total = 200_000
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["姓名", "手机", "城市", "单位"])
        for index in range(total):
            # Every 50th row repeats an earlier number in another format.
            number = f"138{(index - 1 if index % 50 == 49 else index):08d}"
            shown = f"+86 {number}" if index % 50 == 49 else number
            writer.writerow([f"用户{index}", shown, "北京", "北京市质量技术监督局宣传处"])
    size = path.stat().st_size
    assert size > 9_000_000
    tracemalloc.start()
    try:
        counts = count_audience(AudienceSource(path, "手机", "phone"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts == AudienceCounts(rows=total, valid=total - 4000, invalid=0, duplicates=4000)
    assert peak < 20 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB file"
