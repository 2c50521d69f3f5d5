"""One SMPP 3.4 connection over asyncio streams: bind, requests matched by sequence, keep-alive.

PDUs are encoded and parsed by smpplib's command classes; the transport is ours, so nothing
blocks the event loop. A session binds once and never rebinds: when its connection ends it
fails every request still waiting for an answer, and its owner opens a new session.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any, Final, TypeAlias

from smpplib import smpp

#: An smpplib command object (smpplib is untyped): `.command`, `.status`, `.sequence`, fields.
Pdu: TypeAlias = Any
#: Answers one deliver_sm with the command_status of its deliver_sm_resp.
DeliverHandler: TypeAlias = Callable[[Pdu], Awaitable[int]]

_HEADER: Final = struct.Struct(">LLLL")
# message_payload may carry up to 64 KiB; anything longer is not SMPP.
_MAX_PDU_LENGTH: Final = 70_000
_RESPONSE_BIT: Final = 0x80000000
_DELIVER_SM: Final = 0x00000005
_UNBIND: Final = 0x00000006
_ENQUIRE_LINK: Final = 0x00000015
_ALERT_NOTIFICATION: Final = 0x00000102

ESME_ROK: Final = 0x00
ESME_RINVCMDID: Final = 0x03
ESME_RX_T_APPN: Final = 0x64
ESME_RX_P_APPN: Final = 0x65


class SessionError(Exception):
    """Base of what a session raises when a request cannot get its answer."""


class NotSent(SessionError):
    """The session had ended before the request was written: the peer never saw it."""


class ConnectionLost(SessionError):
    """The connection ended after the request was written and before its response came."""


class ProtocolError(SessionError):
    """The peer sent bytes that are not a PDU we can read."""


class BindRejected(SessionError):
    """The SMSC answered the bind with a non-zero command_status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"bind rejected with command_status 0x{status:08X}")
        self.status = status


def build_pdu(command: str, sequence: int, **fields: Any) -> bytes:
    """Return the wire bytes of `command` with `sequence` and the given smpplib fields."""
    # smpplib ignores a `sequence` keyword once a default exists, so it is set afterwards.
    pdu = smpp.make_pdu(command, sequence=sequence, **fields)
    pdu.sequence = sequence
    data: bytes = pdu.generate()
    return data


def parse_pdu(data: bytes) -> Pdu:
    """Return the smpplib command object for one whole PDU, or raise ProtocolError."""
    try:
        return smpp.parse_pdu(data, sequence=0, allow_unknown_opt_params=True)
    except Exception as exc:  # smpplib raises anything from KeyError to struct.error
        raise ProtocolError(f"unreadable PDU ({len(data)} bytes): {exc!r}") from exc


async def read_pdu(reader: asyncio.StreamReader) -> bytes:
    """Return the next whole PDU from `reader` (header included)."""
    head = await reader.readexactly(4)
    length = int.from_bytes(head, "big")
    if not _HEADER.size <= length <= _MAX_PDU_LENGTH:
        raise ProtocolError(f"impossible command_length {length}")
    return head + await reader.readexactly(length - 4)


class SmppSession:
    """A bound transceiver session; build it with `SmppSession.open`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        on_deliver: DeliverHandler,
        enquire_link_s: float,
        response_timeout_s: float,
        logger: logging.Logger,
        label: str,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_deliver = on_deliver
        self._enquire_link_s = enquire_link_s
        self._response_timeout_s = response_timeout_s
        self._logger = logger
        self._label = label
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, asyncio.Future[Pdu]] = {}
        self._sequence = 1  # the bind used 1
        self._closed = asyncio.Event()
        self._handlers: set[asyncio.Task[None]] = set()
        self._last_received = self._loop.time()
        self.close_reason = ""
        self._tasks = [
            asyncio.create_task(self._read_loop(), name=f"{label} reader"),
            asyncio.create_task(self._keep_alive(), name=f"{label} keep-alive"),
        ]

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        system_id: str,
        password: str,
        system_type: str,
        timeout_s: float,
        on_deliver: DeliverHandler,
        enquire_link_s: float,
        logger: logging.Logger,
        label: str,
    ) -> SmppSession:
        """Connect and bind as a transceiver; raise OSError, TimeoutError or a SessionError."""
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
        try:
            async with asyncio.timeout(timeout_s):
                writer.write(
                    build_pdu(
                        "bind_transceiver",
                        1,
                        system_id=system_id,
                        password=password,
                        system_type=system_type,
                        addr_ton=0,
                        addr_npi=0,
                        address_range="",
                    )
                )
                await writer.drain()
                answer = parse_pdu(await read_pdu(reader))
            if answer.command not in ("bind_transceiver_resp", "generic_nack"):
                raise ProtocolError(f"expected bind_transceiver_resp, got {answer.command}")
            if answer.status != ESME_ROK:
                raise BindRejected(int(answer.status))
        except BaseException:
            writer.close()
            raise
        return cls(
            reader,
            writer,
            on_deliver=on_deliver,
            enquire_link_s=enquire_link_s,
            response_timeout_s=timeout_s,
            logger=logger,
            label=label,
        )

    @property
    def closed(self) -> bool:
        """True once the connection has ended (for whatever reason, see `close_reason`)."""
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        """Return when the connection has ended."""
        await self._closed.wait()

    async def request(self, command: str, timeout_s: float, **fields: Any) -> Pdu:
        """Send one request and return its response PDU (which may carry an error status).

        Raises NotSent when the session had already ended, ConnectionLost when it ended while
        waiting, TimeoutError when no response came within `timeout_s`, ProtocolError when the
        response could not be read, ValueError when smpplib cannot encode the fields.
        """
        if self.closed or self._writer.is_closing():
            raise NotSent(self.close_reason or "connection closing")
        sequence = self._next_sequence()
        data = build_pdu(command, sequence, **fields)
        future: asyncio.Future[Pdu] = self._loop.create_future()
        self._pending[sequence] = future
        try:
            async with asyncio.timeout(timeout_s):
                self._writer.write(data)
                await self._writer.drain()
                return await future
        except ConnectionError as exc:
            raise ConnectionLost(str(exc) or type(exc).__name__) from exc
        finally:
            self._pending.pop(sequence, None)

    async def close(self, timeout_s: float) -> None:
        """Unbind politely when still connected, then release the connection and its tasks."""
        if not self.closed:
            with suppress(SessionError, TimeoutError, ValueError):
                await self.request("unbind", timeout_s)
            self._end("closed by us")
        if self._handlers:
            _, late = await asyncio.wait(set(self._handlers), timeout=timeout_s)
            for task in late:
                task.cancel()
        await asyncio.gather(*self._tasks, *self._handlers, return_exceptions=True)
        with suppress(OSError, TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._writer.wait_closed()

    def _next_sequence(self) -> int:
        self._sequence = self._sequence % 0x7FFFFFFF + 1
        return self._sequence

    def _end(self, reason: str) -> None:
        """Mark the session ended, fail every waiting request, close the socket, stop tasks."""
        if self._closed.is_set():
            return
        self.close_reason = reason
        self._closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLost(reason))
        self._pending.clear()
        self._writer.close()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    def _write(self, data: bytes) -> None:
        """Queue an answer to the SMSC; dropped when the connection is already gone."""
        if not self.closed and not self._writer.is_closing():
            self._writer.write(data)

    async def _read_loop(self) -> None:
        reason = "connection closed by the SMSC"
        try:
            while True:
                data = await read_pdu(self._reader)
                self._last_received = self._loop.time()
                self._dispatch(data)
        except asyncio.IncompleteReadError:
            pass
        except (ConnectionError, OSError) as exc:
            reason = f"connection error: {exc}"
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
        finally:
            self._end(reason)

    def _dispatch(self, data: bytes) -> None:
        _, command_id, _, sequence = _HEADER.unpack_from(data)
        if command_id & _RESPONSE_BIT:
            future = self._pending.pop(sequence, None)
            if future is None or future.done():
                self._logger.debug("%s: late or unknown response seq=%d", self._label, sequence)
                return
            try:
                future.set_result(parse_pdu(data))
            except ProtocolError as exc:
                future.set_exception(exc)
        elif command_id == _ENQUIRE_LINK:
            self._write(build_pdu("enquire_link_resp", sequence))
        elif command_id == _DELIVER_SM:
            try:
                pdu = parse_pdu(data)
            except ProtocolError as exc:
                # Redelivering the same bytes cannot help: refuse for good.
                self._logger.error("%s: unreadable deliver_sm: %s", self._label, exc)
                self._write(build_pdu("deliver_sm_resp", sequence, status=ESME_RX_P_APPN))
                return
            task = asyncio.create_task(self._answer_deliver(pdu, sequence))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        elif command_id == _UNBIND:
            self._write(build_pdu("unbind_resp", sequence))
            self._end("the SMSC unbound")
        elif command_id != _ALERT_NOTIFICATION:  # alert_notification takes no response
            self._write(build_pdu("generic_nack", sequence, status=ESME_RINVCMDID))

    async def _answer_deliver(self, pdu: Pdu, sequence: int) -> None:
        # Handled off the read loop, so a slow receipt sink never delays submit_sm_resps.
        try:
            status = await self._on_deliver(pdu)
        except Exception:  # a temporary error makes the SMSC deliver it again later
            self._logger.exception("%s: deliver_sm handler failed", self._label)
            status = ESME_RX_T_APPN
        self._write(build_pdu("deliver_sm_resp", sequence, status=status))

    async def _keep_alive(self) -> None:
        while not self.closed:
            idle = self._loop.time() - self._last_received
            if idle < self._enquire_link_s:
                await asyncio.sleep(self._enquire_link_s - idle)
                continue
            try:
                await self.request("enquire_link", self._response_timeout_s)
            except TimeoutError:
                self._end(f"no enquire_link_resp within {self._response_timeout_s:g}s")
                return
            except SessionError:
                return
