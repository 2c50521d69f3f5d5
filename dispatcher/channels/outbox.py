"""The `file` channel: append each message as one JSON line to an outbox file.

For dry runs, for handing messages to another system, and for tests. A message counts as
accepted once its line is in the file (and on disk, with `fsync = true`); a disk that is full
or not writable makes the send retry later, so nothing is lost while an operator fixes it;
an outbox moved aside (rotated, archived) is noticed before the next write and created anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator

from dispatcher.channels.base import (
    AddressKind,
    Channel,
    ChannelContext,
    ChannelSettings,
    OutboundMessage,
    Outcome,
    SendResult,
)

#: The error code of a send refused because the file would grow beyond `max_bytes`.
FULL_CODE = "ENOSPC"
# Lines written by one system call at most: a bigger batch would only delay its first sender.
_MAX_BATCH_LINES = 1024
_MAX_BATCH_BYTES = 4 * 1024 * 1024

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_IN_THE_WAY = frozenset({errno.EEXIST, errno.ENOTDIR})


class OutboxSettings(ChannelSettings):
    """Settings of a `file` channel."""

    path: str
    fsync: bool = False
    max_bytes: int | None = Field(default=None, gt=0)

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        if not path.strip():
            raise ValueError("path must name the outbox file, e.g. 'outbox/sms.jsonl'")
        return path


def provider_id_for(delivery_id: int) -> str:
    """Return the id the outbox gives a delivery's line (stable, so a retry is recognisable)."""
    return f"outbox-{delivery_id}"


def outbox_line(message: OutboundMessage, written_at: datetime) -> bytes:
    """Encode `message` as one UTF-8 JSON line, ending in a newline and containing no other."""
    record = {
        "id": provider_id_for(message.delivery_id),
        "delivery_id": message.delivery_id,
        "address": message.address,
        "campaign": message.campaign,
        "stage": message.stage,
        "subject": message.subject,
        "body": message.body,
        "encoding": message.encoding,
        "segments": message.segments,
        "valid_until": message.valid_until.isoformat() if message.valid_until else None,
        "written_at": written_at.isoformat(),
    }
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    # JSON allows U+2028/U+2029 raw, but str.splitlines() and JavaScript readers split on them.
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (from a badly decoded CSV) cannot be UTF-8; escaped, it is still JSON.
        return (json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n").encode()


def os_error_result(exc: OSError, action: str) -> SendResult:
    """Classify a disk error as a retry: the outbox never drops a message for the disk's sake.

    `action` says what failed, e.g. "write /srv/outbox/sms.jsonl"; it starts the reason.
    """
    code = errno.errorcode.get(exc.errno, "EIO") if exc.errno else "EIO"
    detail = exc.strerror or str(exc)
    if exc.errno in _NO_SPACE:
        advice = "free some space; the message will be retried"
    elif exc.errno in _NOT_WRITABLE:
        advice = "fix the permissions or the mount; the message will be retried"
    elif exc.errno in _IN_THE_WAY:
        advice = "a file stands where a directory is needed; the message will be retried"
    else:
        advice = "the message will be retried"
    if exc.errno in _NO_SPACE:
        # No message can be written until space is freed: the whole channel waits.
        return SendResult.unavailable(code, f"outbox: cannot {action}: {detail}; {advice}")
    return SendResult.retry(code, f"outbox: cannot {action}: {detail}; {advice}")


class OutboxChannel(Channel):
    """Append messages to a JSON-lines file, one line per message, from one writer thread.

    Sends queue their lines; a writer task hands everything queued to a dedicated thread, which
    writes the batch with one system call (and one fsync when asked), so lines never interleave
    and a busy campaign pays one write per batch rather than per message.
    """

    settings_model: ClassVar[type[ChannelSettings]] = OutboxSettings
    address_kind: ClassVar[AddressKind] = "any"

    def __init__(self, name: str, settings: ChannelSettings, context: ChannelContext) -> None:
        if not isinstance(settings, OutboxSettings):
            raise TypeError(f"channel {name!r}: expected OutboxSettings, got {type(settings)}")
        super().__init__(name, settings, context)
        self.path = context.base_dir / settings.path
        self._file = _OutboxFile(self.path, fsync=settings.fsync, max_bytes=settings.max_bytes)
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._executor: ThreadPoolExecutor | None = None
        self._writer: asyncio.Task[None] | None = None
        self._reported: set[str] = set()

    async def start(self) -> None:
        """Start the writer; the file is opened (and its directory made) on the first send."""
        if self._writer is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"outbox-{self.name}")
        self._writer = asyncio.get_running_loop().create_task(
            self._write_batches(), name=f"outbox-writer-{self.name}"
        )

    async def send(self, message: OutboundMessage) -> SendResult:
        """Append `message` to the outbox; accepted once the line is written."""
        if self._writer is None:
            raise RuntimeError(f"channel {self.name!r}: send() before start() or after close()")
        line = outbox_line(message, datetime.now(UTC))
        future: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(provider_id_for(message.delivery_id), line, future))
        return await future

    async def close(self) -> None:
        """Write what is queued, then close the file and stop the writer thread."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        # A sentinel rather than cancel(): a cancelled await of the thread would leave it
        # writing while the file is closed behind it.
        self._queue.put_nowait(None)
        await writer
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._file.close)
            await asyncio.to_thread(executor.shutdown, True)

    async def _write_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            size = len(first.line)
            stop = False
            while (
                not self._queue.empty()
                and len(batch) < _MAX_BATCH_LINES
                and size < _MAX_BATCH_BYTES
            ):
                item = self._queue.get_nowait()
                if item is None:
                    stop = True
                    break
                batch.append(item)
                size += len(item.line)
            lines = [(p.provider_id, p.line) for p in batch]
            try:
                results = await loop.run_in_executor(self._executor, self._file.write_batch, lines)
            except Exception as exc:
                # A bug, not a disk answer: the senders raise, which the engine treats as
                # ambiguous, and the writer lives on for the next batch.
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
            else:
                self._report(results)
                for pending, result in zip(batch, results, strict=True):
                    if not pending.future.done():
                        pending.future.set_result(result)
            if stop:
                return

    def _report(self, results: list[SendResult]) -> None:
        # Each kind of trouble is logged once until a write succeeds again: a full disk at
        # 500 messages a second must not bury the log.
        for result in results:
            if result.outcome is Outcome.ACCEPTED:
                if self._reported:
                    self._reported.clear()
                    self.context.logger.info(
                        "channel %s: outbox %s is writable again", self.name, self.path
                    )
            elif result.error_code is not None and result.error_code not in self._reported:
                self._reported.add(result.error_code)
                self.context.logger.error("channel %s: %s", self.name, result.reason)


@dataclass(frozen=True, slots=True)
class _Pending:
    provider_id: str
    line: bytes
    future: asyncio.Future[SendResult]


class _OutboxFile:
    """The outbox file as seen from the writer thread; every method runs on that one thread."""

    def __init__(self, path: Path, *, fsync: bool, max_bytes: int | None) -> None:
        self.path = path
        self._fsync = fsync
        self._max_bytes = max_bytes
        self._fd: int | None = None

    def write_batch(self, lines: list[tuple[str, bytes]]) -> list[SendResult]:
        """Append the lines that fit; return one result per line, in order."""
        try:
            fd = self._open()
        except _ActionError as exc:
            return [os_error_result(exc.error, exc.action)] * len(lines)
        try:
            start = os.fstat(fd).st_size
        except OSError as exc:
            self._discard_fd()
            return [os_error_result(exc, f"stat {self.path}")] * len(lines)

        results: list[SendResult | None] = []
        chunks: list[bytes] = []
        size = start
        for _, line in lines:
            if self._max_bytes is not None and size + len(line) > self._max_bytes:
                results.append(
                    SendResult.unavailable(
                        FULL_CODE,
                        f"outbox: {self.path} would grow beyond max_bytes={self._max_bytes}; "
                        "sends wait until there is room",
                    )
                )
                continue
            chunks.append(line)
            size += len(line)
            results.append(None)
        failure = self._append(fd, b"".join(chunks), start) if chunks else None
        return [
            result if result is not None else (failure or SendResult.accepted(provider_id))
            for result, (provider_id, _) in zip(results, lines, strict=True)
        ]

    def close(self) -> None:
        self._discard_fd()

    def _append(self, fd: int, data: bytes, start: int) -> SendResult | None:
        """Write `data` whole, or not at all: None when written, else why not."""
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self._fsync:
                os.fsync(fd)
        except OSError as exc:
            failed = os_error_result(exc, f"write {self.path}")
            # Take the partial batch back out, so that the retry does not leave a broken line
            # or a second copy behind.
            try:
                os.ftruncate(fd, start)
            except OSError:
                self._discard_fd()
                return SendResult.ambiguous(
                    failed.error_code,
                    f"{failed.reason}; a partial write could not be removed from {self.path}, "
                    "check its last lines",
                )
            return failed
        return None

    def _open(self) -> int:
        if self._fd is not None:
            if self._still_at_path(self._fd):
                return self._fd
            # An operator moved or deleted the outbox (to archive it, to free a full disk):
            # lines appended to the old file would land where no reader looks, or nowhere.
            self._discard_fd()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _ActionError(f"create directory {self.path.parent}", exc) from exc
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _ActionError(f"open {self.path}", exc) from exc
        if self._fsync:
            # A new file's directory entry is durable only once the directory is synced.
            with contextlib.suppress(OSError):
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        self._fd = fd
        return fd

    def _still_at_path(self, fd: int) -> bool:
        """True while `fd` is the file the outbox path names (not moved, deleted or replaced)."""
        try:
            named = os.stat(self.path)
            opened = os.fstat(fd)
        except OSError:
            return False
        return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

    def _discard_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class _ActionError(Exception):
    def __init__(self, action: str, error: OSError) -> None:
        super().__init__(action)
        self.action = action
        self.error = error
