"""The file channel: JSON lines, UTF-8, no interleaving, full and unwritable disks."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dispatcher.channels import registry
from dispatcher.channels.base import ChannelContext, OutboundMessage, Outcome
from dispatcher.channels.outbox import (
    FULL_CODE,
    OutboxChannel,
    OutboxSettings,
    os_error_result,
    outbox_line,
)

THEME = "抓质量水平提升 促发展方式转变"
LOGGER = logging.getLogger("test.outbox")


def message(delivery_id: int, body: str = THEME, **fields: Any) -> OutboundMessage:
    return OutboundMessage(
        delivery_id=delivery_id,
        address=f"+86138{delivery_id:08d}",
        body=body,
        campaign="quality-month-2010",
        stage="opening-blast",
        encoding="UCS-2",
        segments=1,
        **fields,
    )


def outbox(tmp_path: Path, **settings: Any) -> OutboxChannel:
    context = ChannelContext(base_dir=tmp_path, logger=LOGGER)
    return OutboxChannel("outbox", OutboxSettings.model_validate(settings), context)


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[OutboxChannel]:
    channel = outbox(tmp_path, path="out/sms.jsonl")
    await channel.start()
    yield channel
    await channel.close()


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER.name and r.levelno == logging.ERROR]


def test_registry_finds_the_outbox() -> None:
    assert registry.load("file") is OutboxChannel


async def test_writes_one_utf8_json_line_per_message(tmp_path: Path) -> None:
    channel = outbox(tmp_path, path="nested/deeper/sms.jsonl")
    await channel.start()
    valid_until = datetime(2010, 9, 30, 23, 59, tzinfo=UTC)
    first = await channel.send(message(1, subject="质量月", valid_until=valid_until))
    second = await channel.send(message(2, body="第二条"))
    await channel.close()

    assert first.outcome is Outcome.ACCEPTED and first.provider_id == "outbox-1"
    assert second.provider_id == "outbox-2"
    raw = (tmp_path / "nested" / "deeper" / "sms.jsonl").read_bytes()
    assert THEME.encode("utf-8") in raw  # written as UTF-8, not as \\u escapes
    records = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    assert len(records) == 2
    written_at = datetime.fromisoformat(records[0].pop("written_at"))
    assert written_at.tzinfo is not None
    assert records[0] == {
        "id": "outbox-1",
        "delivery_id": 1,
        "address": "+8613800000001",
        "campaign": "quality-month-2010",
        "stage": "opening-blast",
        "subject": "质量月",
        "body": THEME,
        "encoding": "UCS-2",
        "segments": 1,
        "valid_until": "2010-09-30T23:59:00+00:00",
    }
    assert records[1]["body"] == "第二条"
    assert records[1]["subject"] is None and records[1]["valid_until"] is None


async def test_reopening_appends(tmp_path: Path) -> None:
    for delivery_id in (1, 2):
        channel = outbox(tmp_path, path="sms.jsonl")
        await channel.start()
        await channel.send(message(delivery_id))
        await channel.close()
    assert [r["delivery_id"] for r in read_lines(tmp_path / "sms.jsonl")] == [1, 2]


async def test_line_separators_in_a_body_stay_inside_the_line(started: OutboxChannel) -> None:
    body = "第一行\n第二行\u2028第三段\u2029完"
    await started.send(message(1, body=body))
    await started.send(message(2))
    lines = started.path.read_text("utf-8").splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["body"] == body


def test_a_lone_surrogate_is_escaped_not_fatal() -> None:
    line = outbox_line(message(1, body="bad \udce9 byte"), datetime.now(UTC))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["body"] == "bad \udce9 byte"


async def test_concurrent_sends_never_interleave(started: OutboxChannel) -> None:
    # Bodies up to 64 KiB, so a batch is far bigger than one page or one pipe buffer.
    bodies = {i: f"{i}:" + THEME[i % len(THEME)] * (1 + (i * 997) % 21_000) for i in range(1, 401)}
    results = await asyncio.gather(*(started.send(message(i, body=b)) for i, b in bodies.items()))

    assert all(r.outcome is Outcome.ACCEPTED for r in results)
    records = read_lines(started.path)
    assert len(records) == 400
    assert {r["delivery_id"]: r["body"] for r in records} == bodies


async def test_fsync_mode_writes_durably(tmp_path: Path) -> None:
    channel = outbox(tmp_path, path="sms.jsonl", fsync=True)
    await channel.start()
    results = await asyncio.gather(*(channel.send(message(i)) for i in range(1, 21)))
    await channel.close()
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 20
    assert len(read_lines(tmp_path / "sms.jsonl")) == 20


async def test_max_bytes_simulates_a_full_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    line_size = len(outbox_line(message(1), datetime.now(UTC)))
    # Room for two lines and a half, whatever the timestamp's length.
    limit = line_size * 5 // 2
    channel = outbox(tmp_path, path="sms.jsonl", max_bytes=limit)
    await channel.start()
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        results = [await channel.send(message(i)) for i in range(1, 6)]
    await channel.close()

    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 2 + [Outcome.RETRY] * 3
    full = results[2]
    assert full.error_code == FULL_CODE == "ENOSPC"
    assert full.reason is not None
    assert str(tmp_path / "sms.jsonl") in full.reason and f"max_bytes={limit}" in full.reason
    path = tmp_path / "sms.jsonl"
    assert path.stat().st_size <= limit
    assert [r["delivery_id"] for r in read_lines(path)] == [1, 2]
    assert len(error_records(caplog)) == 1  # three refusals, one error in the log


async def test_a_file_in_the_way_makes_sends_retry_until_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "outbox"
    blocker.write_text("not a directory")
    channel = outbox(tmp_path, path="outbox/sms.jsonl")
    await channel.start()
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        refused = [await channel.send(message(i)) for i in (1, 2)]
        blocker.unlink()
        accepted = await channel.send(message(1))
    await channel.close()

    for result in refused:
        assert result.outcome is Outcome.RETRY
        assert result.error_code in {"EEXIST", "ENOTDIR"}
        assert result.reason is not None and str(blocker) in result.reason
    assert len(error_records(caplog)) == 1
    assert any("writable again" in r.getMessage() for r in caplog.records)
    assert accepted.outcome is Outcome.ACCEPTED
    assert [r["delivery_id"] for r in read_lines(blocker / "sms.jsonl")] == [1]


# Run in a child process, because as root the test drops to an unprivileged user first:
# permissions do not stop root. Everything is imported before setuid, as /root may be closed.
UNWRITABLE_SCRIPT = """
import asyncio, json, os, sys
from pathlib import Path
from dispatcher.channels.base import ChannelContext, OutboundMessage
from dispatcher.channels.outbox import OutboxChannel, OutboxSettings

base = Path(sys.argv[1])
locked = base / "locked"
locked.mkdir(mode=0o500)
if os.geteuid() == 0:
    os.chown(base, 65534, 65534)
    os.chown(locked, 65534, 65534)
    os.setgid(65534)
    os.setuid(65534)

async def main():
    answers = []
    for path in ("locked/sms.jsonl", "locked/sub/sms.jsonl"):
        channel = OutboxChannel("o", OutboxSettings(path=path), ChannelContext(base_dir=base))
        await channel.start()
        result = await channel.send(OutboundMessage(1, "+8613800138000", "b", "c", "s"))
        await channel.close()
        answers.append([result.outcome.value, result.error_code, result.reason])
    print(json.dumps(answers))

asyncio.run(main())
"""


def test_an_unwritable_directory_makes_sends_retry() -> None:
    # Not tmp_path: its parents are closed to the unprivileged user the child may become.
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        base = Path(top) / "base"
        base.mkdir()
        done = subprocess.run(
            [sys.executable, "-c", UNWRITABLE_SCRIPT, str(base)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    (outcome, code, reason), (sub_outcome, sub_code, sub_reason) = json.loads(done.stdout)
    assert (outcome, code) == ("retry", "EACCES")
    assert f"open {base / 'locked' / 'sms.jsonl'}" in reason and "permissions" in reason
    assert (sub_outcome, sub_code) == ("retry", "EACCES")
    assert f"create directory {base / 'locked' / 'sub'}" in sub_reason


@pytest.mark.parametrize(
    ("code", "name", "advice"),
    [
        (errno.ENOSPC, "ENOSPC", "free some space"),
        (errno.EDQUOT, "EDQUOT", "free some space"),
        (errno.EACCES, "EACCES", "permissions"),
        (errno.EROFS, "EROFS", "mount"),
        (errno.EIO, "EIO", "retried"),
    ],
)
def test_disk_errors_are_retries_with_the_path(code: int, name: str, advice: str) -> None:
    error = OSError(code, os.strerror(code))
    result = os_error_result(error, "write /srv/outbox/sms.jsonl")
    assert (result.outcome, result.error_code) == (Outcome.RETRY, name)
    assert result.reason is not None
    assert "/srv/outbox/sms.jsonl" in result.reason and advice in result.reason


async def test_send_outside_start_and_close_is_refused(tmp_path: Path) -> None:
    channel = outbox(tmp_path, path="sms.jsonl")
    with pytest.raises(RuntimeError, match="start"):
        await channel.send(message(1))
    await channel.start()
    await channel.close()
    await channel.close()  # closing twice is harmless
    with pytest.raises(RuntimeError, match="close"):
        await channel.send(message(1))


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, "path"),
        ({"path": "  "}, "must name the outbox file"),
        ({"path": "sms.jsonl", "max_bytes": 0}, "greater than 0"),
        ({"path": "sms.jsonl", "rotate": True}, "Extra inputs are not permitted"),
    ],
)
def test_settings_are_validated(settings: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        OutboxSettings.model_validate(settings)
