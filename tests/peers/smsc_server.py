"""A minimal SMSC for tests: SMPP 3.4 over asyncio streams on 127.0.0.1, PDUs via smpplib.

The far side of the network for the SMPP adapter's tests, written independently of the
adapter (its own framing, text decoding and reassembly). It checks bind credentials, answers
enquire_link, records every submit_sm with its decoded text and reassembles UDH-concatenated
messages, answers with message ids or statuses programmed per destination, sends delivery
receipts in the standard text format after a delay, and on demand stalls its answers, refuses
binds, ignores enquire_links, drops every connection or sends a mobile-originated message.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from smpplib import gsm, smpp

# smpplib's table has "`" where GSM 03.38 has "§" (0x5F); the rest is the standard table.
_GSM_TABLE = gsm.GSM_CHARACTER_TABLE[:0x5F] + "§" + gsm.GSM_CHARACTER_TABLE[0x60:]
_MESSAGE_STATES = {
    "ENROUTE": 1,
    "DELIVRD": 2,
    "EXPIRED": 3,
    "DELETED": 4,
    "UNDELIV": 5,
    "ACCEPTD": 6,
    "UNKNOWN": 7,
    "REJECTD": 8,
}
ESME_ROK = 0x00
ESME_RINVBNDSTS = 0x04
ESME_RINVPASWD = 0x0E
ESME_RINVSYSID = 0x0F


@dataclass
class Submit:
    """One submit_sm as the SMSC received it."""

    source_addr: str
    source_ton: int
    source_npi: int
    destination: str
    dest_ton: int
    dest_npi: int
    esm_class: int
    data_coding: int
    registered_delivery: int
    validity_period: str
    short_message: bytes
    udh: bytes | None
    text: str
    status: int = ESME_ROK
    message_id: str | None = None


@dataclass
class Message:
    """A whole message: one submit_sm, or every part of a concatenated one, in order."""

    destination: str
    text: str
    parts: list[Submit]
    reference: int | None = None


@dataclass
class ReceiptPlan:
    """The receipt the SMSC sends for each accepted part to one destination."""

    stat: str = "DELIVRD"
    err: str = "000"
    delay: float = 0.0
    tlvs: bool = False


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    bound: bool = False
    sequence: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    waiting: dict[int, asyncio.Future[int]] = field(default_factory=dict)


class FakeSmsc:
    """An SMSC on 127.0.0.1 with a free port; `await start()` before use, `await stop()` after."""

    def __init__(self, *, system_id: str = "dispatcher", password: str = "s3cret") -> None:
        self.system_id = system_id
        self.password = password
        self.port = 0
        self.submits: list[Submit] = []
        self.messages: list[Message] = []
        self.binds = 0
        self.bind_failures = 0
        self.unbinds = 0
        self.enquire_links = 0
        self.deliver_sm_statuses: list[int] = []
        #: When set, submit_sm is recorded but never answered.
        self.stall = False
        #: When set, binds with good credentials are answered with this status.
        self.refuse_binds: int | None = None
        #: When False, enquire_link is not answered (a half-dead link).
        self.answer_enquire_link = True
        self.default_receipt: ReceiptPlan | None = ReceiptPlan()
        self._statuses: dict[str, list[int]] = {}
        self._receipts: dict[str, ReceiptPlan | None] = {}
        self._fragments: dict[tuple[str, int, int], dict[int, Submit]] = {}
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(0x1000)
        self._server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1 (`port` 0 picks a free one) and return the port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Close every connection and the listener, and cancel pending receipts."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await self.drop_connections()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    @property
    def connections(self) -> int:
        """How many clients are connected right now."""
        return len(self._connections)

    def program_status(self, destination: str, *statuses: int) -> None:
        """Answer the next submit_sm to `destination` with these statuses in turn, then ROK."""
        self._statuses.setdefault(destination.removeprefix("+"), []).extend(statuses)

    def program_receipt(self, destination: str, plan: ReceiptPlan | None) -> None:
        """Send `plan`'s receipt (None: no receipt) for parts accepted for `destination`."""
        self._receipts[destination.removeprefix("+")] = plan

    async def drop_connections(self) -> None:
        """Cut every connection at once (no unbind), as a crashing SMSC or network would."""
        for connection in list(self._connections):
            connection.writer.transport.abort()
        await self.eventually(lambda: not self._connections)

    async def send_mo(
        self, source: str, text: str, *, to: str = "10690000", part_chars: int | None = None
    ) -> list[int]:
        """Deliver a mobile-originated message from `source`; return the deliver_sm_resp statuses.

        UCS-2 when the text is not ASCII; split into UDH parts of `part_chars` when given.
        """
        ucs2 = not text.isascii()
        chunks = [text]
        if part_chars is not None:
            chunks = [text[i : i + part_chars] for i in range(0, len(text), part_chars)]
        reference = next(self._ids) & 0xFF
        statuses = []
        for number, chunk in enumerate(chunks, start=1):
            body = chunk.encode("utf-16-be" if ucs2 else "ascii")
            esm_class = 0
            if len(chunks) > 1:
                body = bytes([5, 0, 3, reference, len(chunks), number]) + body
                esm_class = 0x40
            statuses.append(
                await self._request(
                    "deliver_sm",
                    source_addr_ton=1 if source.startswith("+") else 0,
                    source_addr_npi=1,
                    source_addr=source.removeprefix("+"),
                    dest_addr_ton=0,
                    dest_addr_npi=0,
                    destination_addr=to,
                    esm_class=esm_class,
                    data_coding=8 if ucs2 else 0,
                    short_message=body,
                )
            )
        return statuses

    async def unbind(self) -> int:
        """Ask the (first) bound client to unbind, as an SMSC going down for maintenance does."""
        return await self._request("unbind")

    async def eventually(
        self, condition: Callable[[], bool], within_s: float = 5.0, what: str = ""
    ) -> None:
        """Poll `condition` until it holds; fail the test after `within_s` seconds."""
        step = 0.005
        for _ in range(int(within_s / step) + 1):
            if condition():
                return
            await asyncio.sleep(step)
        raise AssertionError(f"gave up after {within_s}s waiting for {what or condition}")

    # -- the protocol ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(reader, writer)
        self._connections.add(connection)
        try:
            while True:
                head = await reader.readexactly(4)
                data = head + await reader.readexactly(int.from_bytes(head, "big") - 4)
                pdu = smpp.parse_pdu(data, sequence=0, allow_unknown_opt_params=True)
                await self._handle(connection, pdu)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._connections.discard(connection)
            for future in connection.waiting.values():
                future.cancel()
            writer.close()

    async def _handle(self, connection: _Connection, pdu: Any) -> None:
        command = pdu.command
        if command == "bind_transceiver":
            status = self._check_bind(pdu)
            connection.bound = status == ESME_ROK
            self._write(
                connection, "bind_transceiver_resp", pdu.sequence, status=status, system_id="Fake"
            )
        elif command == "enquire_link":
            self.enquire_links += 1
            if self.answer_enquire_link:
                self._write(connection, "enquire_link_resp", pdu.sequence)
        elif command == "submit_sm":
            self._submit(connection, pdu)
        elif command == "unbind":
            self.unbinds += 1
            connection.bound = False
            self._write(connection, "unbind_resp", pdu.sequence)
            await connection.writer.drain()
            connection.writer.close()
        elif command in ("deliver_sm_resp", "unbind_resp"):
            future = connection.waiting.pop(pdu.sequence, None)
            if future is not None and not future.done():
                future.set_result(pdu.status)
        elif command != "generic_nack":
            self._write(connection, "generic_nack", pdu.sequence, status=0x03)

    def _check_bind(self, pdu: Any) -> int:
        if pdu.system_id.decode() != self.system_id:
            self.bind_failures += 1
            return ESME_RINVSYSID
        if pdu.password.decode() != self.password:
            self.bind_failures += 1
            return ESME_RINVPASWD
        if self.refuse_binds is not None:
            self.bind_failures += 1
            return self.refuse_binds
        self.binds += 1
        return ESME_ROK

    def _submit(self, connection: _Connection, pdu: Any) -> None:
        if not connection.bound:
            self._write(connection, "submit_sm_resp", pdu.sequence, status=ESME_RINVBNDSTS)
            return
        destination = pdu.destination_addr.decode()
        short_message: bytes = pdu.short_message or b""
        udh = None
        if pdu.esm_class & 0x40:
            udh = short_message[: 1 + short_message[0]]
            short_message = short_message[len(udh) :]
        submit = Submit(
            source_addr=pdu.source_addr.decode(),
            source_ton=pdu.source_addr_ton,
            source_npi=pdu.source_addr_npi,
            destination=destination,
            dest_ton=pdu.dest_addr_ton,
            dest_npi=pdu.dest_addr_npi,
            esm_class=pdu.esm_class,
            data_coding=pdu.data_coding,
            registered_delivery=pdu.registered_delivery,
            validity_period=(pdu.validity_period or b"").decode(),
            short_message=pdu.short_message or b"",
            udh=udh,
            text=_decode(short_message, pdu.data_coding),
        )
        self.submits.append(submit)
        if self.stall:
            return
        programmed = self._statuses.get(destination)
        submit.status = programmed.pop(0) if programmed else ESME_ROK
        if submit.status != ESME_ROK:
            self._write(connection, "submit_sm_resp", pdu.sequence, status=submit.status)
            return
        submit.message_id = f"{next(self._ids):08X}"
        self._write(connection, "submit_sm_resp", pdu.sequence, message_id=submit.message_id)
        self._assemble(submit)
        plan = self._receipts.get(destination, self.default_receipt)
        if plan is not None and submit.registered_delivery & 1:
            self._spawn(self._send_receipt(submit, plan))

    def _assemble(self, submit: Submit) -> None:
        if submit.udh is None:
            self.messages.append(Message(submit.destination, submit.text, [submit]))
            return
        # The adapter's UDH: length 5, IE 0x00, IE length 3, reference, total, number.
        assert submit.udh[:3] == b"\x05\x00\x03", submit.udh.hex()
        reference, total, number = submit.udh[3], submit.udh[4], submit.udh[5]
        key = (submit.destination, reference, total)
        parts = self._fragments.setdefault(key, {})
        assert number not in parts, f"part {number} of reference {reference} sent twice"
        parts[number] = submit
        if len(parts) == total:
            ordered = [parts[n] for n in range(1, total + 1)]
            del self._fragments[key]
            text = "".join(part.text for part in ordered)
            self.messages.append(Message(submit.destination, text, ordered, reference))

    async def _send_receipt(self, submit: Submit, plan: ReceiptPlan) -> None:
        await asyncio.sleep(plan.delay)
        stamp = datetime.now(UTC).strftime("%y%m%d%H%M")
        delivered = "001" if plan.stat == "DELIVRD" else "000"
        preview = submit.text[:20].encode("ascii", "replace").decode()
        body = (
            f"id:{submit.message_id} sub:001 dlvrd:{delivered} submit date:{stamp} "
            f"done date:{stamp} stat:{plan.stat} err:{plan.err} text:{preview}"
        )
        extra: dict[str, Any] = {}
        if plan.tlvs:
            extra = {
                "receipted_message_id": submit.message_id,
                "message_state": _MESSAGE_STATES[plan.stat],
            }
        await self._request(
            "deliver_sm",
            source_addr_ton=1,
            source_addr_npi=1,
            source_addr=submit.destination,
            dest_addr_ton=submit.source_ton,
            dest_addr_npi=submit.source_npi,
            destination_addr=submit.source_addr,
            esm_class=0x04,
            data_coding=0,
            short_message=body.encode("ascii"),
            **extra,
        )

    async def _request(self, command: str, **fields: Any) -> int:
        """Send a request on a bound connection and return the command_status of its answer."""
        await self.eventually(lambda: any(c.bound for c in self._connections), what="a bind")
        connection = next(c for c in self._connections if c.bound)
        sequence = next(connection.sequence)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        connection.waiting[sequence] = future
        self._write(connection, command, sequence, **fields)
        async with asyncio.timeout(5.0):
            status = await future
        if command == "deliver_sm":
            self.deliver_sm_statuses.append(status)
        return status

    def _write(self, connection: _Connection, command: str, sequence: int, **fields: Any) -> None:
        pdu = smpp.make_pdu(command, sequence=sequence, **fields)
        pdu.sequence = sequence  # smpplib ignores the keyword once it has a default
        if not connection.writer.is_closing():
            connection.writer.write(pdu.generate())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        # A receipt with nobody bound to take it is dropped, as a real SMSC would retry later.
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()


def _decode(data: bytes, data_coding: int) -> str:
    if data_coding == 8:
        return data.decode("utf-16-be")
    if data_coding == 0:
        chars, escaped = [], False
        for octet in data:
            if escaped:
                chars.append(_GSM_TABLE[0x80 + octet])
                escaped = False
            elif octet == 0x1B:
                escaped = True
            else:
                chars.append(_GSM_TABLE[octet])
        return "".join(chars)
    return data.decode("latin-1")
