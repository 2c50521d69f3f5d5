"""A Twilio-compatible Messages API on 127.0.0.1, for tests and benchmarks.

It speaks the part of Twilio's REST API (version 2010-04-01) that the `twilio` channel uses,
with Twilio's HTTP statuses, error codes and JSON shapes, so the adapter runs unchanged
against it through the official SDK (its `api_base` setting):

- ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json`` creates a message (201),
- ``GET  /2010-04-01/Accounts/{AccountSid}/Messages.json`` lists them, newest first, in
  Twilio's paging envelope (filters ``To``, ``From``, ``DateSent``, ``DateSent<``,
  ``DateSent>``; ``PageSize``, ``Page``, ``PageToken``),
- ``GET  /2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json`` fetches one.

Faults are programmable per number (a Twilio error, or a transport fault) and by seeded
probability (500, 429 with Retry-After, connection reset, an answer held past any client
timeout), at runtime through attributes and methods. Every accepted message is kept in memory
(and optionally appended to a JSON-lines file) so tests can count what the provider really
got, duplicates included. Status callbacks are signed exactly like Twilio signs them.

The fake hands every accepted message to its imaginary carrier at once, so ``date_sent`` is
set when the message is created (real Twilio sets it later, when the message leaves its queue).

In-process::

    async with TwilioServer(accounts={"AC...": "token"}) as srv:
        client_base_url = srv.base_url

As a subprocess (the bound port is the first line on stdout)::

    python -m tests.peers.twilio_server --port 0 --account AC...:token --latency-ms 100 \\
        --print-port --record sent.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import functools
import gc
import hmac
import json
import random
import re
import signal
import socket
import struct
import sys
import time as _time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import IO, Any, Final, Literal, get_args
from urllib.parse import urlencode

from aiohttp import ClientError, ClientSession, ClientTimeout, web
from twilio.request_validator import RequestValidator

API_VERSION: Final = "2010-04-01"
DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 1000

FaultKind = Literal["reset", "reset_after_accept", "hang", "server_error", "throttle"]
FAULT_KINDS: Final[tuple[str, ...]] = get_args(FaultKind)
DeliveryStatus = Literal["delivered", "undelivered", "failed"]

# Twilio's own wording for the codes the fake answers with (https://www.twilio.com/docs/errors).
ERROR_MESSAGES: Final[dict[int, str]] = {
    20003: "Authenticate",
    20404: "The requested resource was not found",
    20429: "Too Many Requests",
    20500: "An internal server error has occurred",
    21211: "The 'To' number {to} is not a valid phone number.",
    21408: "Permission to send an SMS has not been enabled for the region indicated by the "
    "'To' number: {to}.",
    21602: "Message body is required.",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21610: "Attempt to send to unsubscribed recipient",
    21614: "'To' number is not a valid mobile number",
}

_E164: Final = re.compile(r"\+[1-9][0-9]{1,14}")
_GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENDED: Final = frozenset("^{}\\[~]|€\f")
# How often the JSON-lines record reaches the file: buffered, never fsynced, so the server
# stays fast under a 100,000-message benchmark while a reader sees lines within a moment.
_RECORD_FLUSH_S: Final = 0.2


@dataclass(frozen=True, slots=True)
class ProgrammedError:
    """A Twilio error answered for one number instead of accepting the message."""

    code: int
    status: int = 400
    message: str | None = None


@dataclass(slots=True)
class FaultRates:
    """Per-request probabilities of infrastructure faults (their sum must not exceed 1).

    ``reset`` closes the connection with a TCP RST before the message is taken; ``hang``
    takes the message and holds the answer for ``hang_s`` (past any sane client timeout).
    """

    server_error: float = 0.0
    throttle: float = 0.0
    reset: float = 0.0
    hang: float = 0.0


@dataclass(slots=True)
class StoredMessage:
    """One message the fake accepted, with what the client sent for it."""

    sid: str
    account_sid: str
    auth_user: str
    to: str
    from_: str | None
    messaging_service_sid: str | None
    body: str
    status_callback: str | None
    validity_period: str | None
    num_segments: int
    created: datetime
    status: str
    error_code: int | None = None
    updated: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the message in Twilio's Message resource JSON shape."""
        base = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{self.sid}"
        created = _rfc2822(self.created)
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": self.body,
            "date_created": created,
            "date_sent": created,
            "date_updated": _rfc2822(self.updated) if self.updated else created,
            "direction": "outbound-api",
            "error_code": self.error_code,
            "error_message": None,
            "from": self.from_,
            "messaging_service_sid": self.messaging_service_sid,
            "num_media": "0",
            "num_segments": str(self.num_segments),
            "price": None,
            "price_unit": "USD",
            "sid": self.sid,
            "status": self.status,
            "subresource_uris": {
                "media": f"{base}/Media.json",
                "feedback": f"{base}/Feedback.json",
            },
            "to": self.to,
            "uri": f"{base}.json",
        }


@dataclass(frozen=True, slots=True)
class CallbackRecord:
    """One status callback the fake POSTed: where, what, how it was signed and the answer."""

    url: str
    params: dict[str, str]
    signature: str
    response_status: int | None  # None when the receiver could not be reached


@dataclass(slots=True)
class _Delivery:
    status: DeliveryStatus = "delivered"
    error_code: int | None = None


@functools.lru_cache(maxsize=8)
def _rfc2822_second(second: int) -> str:
    # Memoised per second: formatting dates is a hot path under a 100,000-message benchmark.
    return format_datetime(datetime.fromtimestamp(second, UTC))


def _rfc2822(moment: datetime) -> str:
    return _rfc2822_second(int(moment.timestamp()))


def count_segments(body: str) -> int:
    """Return how many SMS segments `body` takes (GSM-7 160/153, else UCS-2 70/67)."""
    if all(ch in _GSM7_BASIC or ch in _GSM7_EXTENDED for ch in body):
        units = len(body) + sum(1 for ch in body if ch in _GSM7_EXTENDED)
        return 1 if units <= 160 else -(-units // 153)
    units = len(body.encode("utf-16-le")) // 2
    return 1 if units <= 70 else -(-units // 67)


def _basic_header(user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode("latin-1")).decode("ascii")
    return f"Basic {token}"


class TwilioServer:
    """A Twilio-compatible Messages API served by aiohttp on `host`, port `port` (0: any free).

    Every knob is a public attribute that may be changed while the server runs:
    `latency_ms`, `rates`, `retry_after` (the Retry-After header value sent with 429s),
    `hang_s`, `callbacks`, `callback_delay_ms`. Per-number behaviour is set with
    `program_error`, `program_fault` and `program_delivery`.
    """

    def __init__(
        self,
        accounts: Mapping[str, str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 0.0,
        rates: FaultRates | None = None,
        retry_after: str = "1",
        hang_s: float = 30.0,
        errors: Mapping[str, ProgrammedError] | None = None,
        faults: Mapping[str, FaultKind] | None = None,
        callbacks: bool = False,
        callback_delay_ms: float = 0.0,
        record: Path | None = None,
        seed: int = 0,
    ) -> None:
        self.accounts = dict(accounts)
        self.host = host
        self.latency_ms = latency_ms
        self.rates = rates or FaultRates()
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.callbacks = callbacks
        self.callback_delay_ms = callback_delay_ms
        self.messages: list[StoredMessage] = []
        self.callbacks_sent: list[CallbackRecord] = []
        self.stats: Counter[str] = Counter()
        self._requested_port = port
        self._port: int | None = None
        self._errors: dict[str, ProgrammedError] = dict(errors or {})
        self._faults: dict[str, FaultKind] = dict(faults or {})
        self._deliveries: dict[str, _Delivery] = {}
        self._by_sid: dict[str, StoredMessage] = {}
        self._by_to: dict[str, list[StoredMessage]] = {}
        self._auth_headers = {_basic_header(s, t): s for s, t in self.accounts.items()}
        self._fault_rng = random.Random(seed)
        self._sid_rng = random.Random(seed ^ 0x5EED)
        self._record_path = record
        self._record_file: IO[str] | None = None
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- runtime programming ---------------------------------------------------------------

    def program_error(
        self, number: str, code: int, status: int = 400, message: str | None = None
    ) -> None:
        """Answer every send to `number` with Twilio error `code` and HTTP `status`."""
        self._errors[number] = ProgrammedError(code, status, message)

    def program_fault(self, number: str, kind: FaultKind) -> None:
        """Give every send to `number` the transport fault `kind` (see `FaultRates`)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r} (known: {', '.join(FAULT_KINDS)})")
        self._faults[number] = kind

    def program_delivery(
        self, number: str, status: DeliveryStatus, error_code: int | None = None
    ) -> None:
        """Make the final status callback for `number` say `status` (default: delivered)."""
        self._deliveries[number] = _Delivery(status, error_code)

    def clear_programs(self) -> None:
        """Forget every per-number error, fault and delivery outcome."""
        self._errors.clear()
        self._faults.clear()
        self._deliveries.clear()

    def add_account(self, account_sid: str, auth_token: str) -> None:
        """Accept HTTP Basic credentials `account_sid:auth_token` from now on."""
        self.accounts[account_sid] = auth_token
        self._auth_headers[_basic_header(account_sid, auth_token)] = account_sid

    # -- what the provider got -------------------------------------------------------------

    def messages_to(self, number: str) -> list[StoredMessage]:
        """Return every accepted message to `number`, oldest first."""
        return list(self._by_to.get(number, ()))

    def duplicates(self) -> dict[tuple[str, str], int]:
        """Return (To, Body) pairs accepted more than once, with how many times."""
        counts = Counter((m.to, m.body) for m in self.messages)
        return {key: n for key, n in counts.items() if n > 1}

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port (after `start`)."""
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """The `api_base` to give the adapter, e.g. ``http://127.0.0.1:51234``."""
        return f"http://{self.host}:{self.port}"

    def messages_url(self, account_sid: str) -> str:
        """Return the absolute Messages list URL of `account_sid`."""
        return f"{self.base_url}/{API_VERSION}/Accounts/{account_sid}/Messages.json"

    async def start(self) -> None:
        """Bind the port and start answering."""
        app = web.Application()
        prefix = f"/{API_VERSION}/Accounts/{{account_sid}}"
        app.router.add_post(f"{prefix}/Messages.json", self._create_message)
        app.router.add_get(f"{prefix}/Messages.json", self._list_messages)
        app.router.add_get(f"{prefix}/Messages/{{sid}}.json", self._fetch_message)
        # No access log: it costs more than the handler under a benchmark.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._requested_port)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        self._session = ClientSession(timeout=ClientTimeout(total=10))
        if self._record_path is not None:
            # The file is the record of what the provider got; buffered, flushed by a task.
            self._record_file = self._record_path.open("a", encoding="utf-8")
            self._spawn(self._flush_record_periodically())

    async def stop(self) -> None:
        """Stop answering, cancel pending callbacks and held answers, close the record."""
        self._stopping.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._record_file is not None:
            self._record_file.close()
            self._record_file = None

    async def __aenter__(self) -> TwilioServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- handlers --------------------------------------------------------------------------

    async def _create_message(self, request: web.Request) -> web.StreamResponse:
        # A provider counts a request against its rate when it arrives, not when it has
        # finished with it: the record keeps the arrival time (before latency and parsing).
        arrived = _time.time()
        self.stats["requests"] += 1
        account_sid = self._authenticate(request)
        if account_sid is None:
            return self._unauthorized()
        if request.match_info["account_sid"] != account_sid:
            return self._not_found(request)
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000)
        form = await request.post()
        to = _form_str(form, "To")
        fault = self._faults.get(to or "") or self._draw_fault()
        if fault == "reset":
            return self._reset(request, "reset")
        if fault == "server_error":
            self.stats["server_error"] += 1
            return _error(500, 20500)
        if fault == "throttle":
            self.stats["throttle"] += 1
            return _error(429, 20429, headers={"Retry-After": self.retry_after})

        from_ = _form_str(form, "From")
        service = _form_str(form, "MessagingServiceSid")
        body = _form_str(form, "Body")
        if not to:
            return self._invalid(400, 21604)
        if not from_ and not service:
            return self._invalid(400, 21603)
        if not body:
            return self._invalid(400, 21602)
        if not _E164.fullmatch(to):
            return self._invalid(400, 21211, to=to)
        programmed = self._errors.get(to)
        if programmed is not None:
            self.stats["programmed_error"] += 1
            return _error(programmed.status, programmed.code, programmed.message, to=to)

        message = StoredMessage(
            sid=f"SM{self._sid_rng.getrandbits(128):032x}",
            account_sid=account_sid,
            auth_user=account_sid,
            to=to,
            from_=from_,
            messaging_service_sid=service,
            body=body,
            status_callback=_form_str(form, "StatusCallback"),
            validity_period=_form_str(form, "ValidityPeriod"),
            num_segments=count_segments(body),
            created=datetime.now(UTC),
            # Twilio says "accepted" while a Messaging Service still has to pick a sender.
            status="accepted" if service and not from_ else "queued",
        )
        payload = json.dumps(message.to_json())
        self._store(message, payload, arrived)

        if fault == "reset_after_accept":
            return self._reset(request, "reset_after_accept")
        if fault == "hang":
            self.stats["hang"] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.hang_s)
            if self._stopping.is_set():
                return self._reset(request, "hang_aborted")
        return web.Response(status=201, text=payload, content_type="application/json")

    async def _list_messages(self, request: web.Request) -> web.StreamResponse:
        account_sid = self._authenticate(request)
        if account_sid is None:
            return self._unauthorized()
        if request.match_info["account_sid"] != account_sid:
            return self._not_found(request)
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000)
        query = request.query
        try:
            page_size = min(int(query.get("PageSize", DEFAULT_PAGE_SIZE)), MAX_PAGE_SIZE)
            page = int(query.get("Page", 0))
            token = query.get("PageToken")
            offset = int(token[2:]) if token else page * page_size
            date_filters = [
                _DateFilter.parse(op, query[name])
                for name, op in (("DateSent", "="), ("DateSent<", "<"), ("DateSent>", ">"))
                if name in query
            ]
        except ValueError as exc:
            return _error(400, 20001, f"Invalid query parameter: {exc}")
        if page_size < 1 or offset < 0:
            return _error(400, 20001, "Invalid paging parameters")

        to, from_ = query.get("To"), query.get("From")
        pool = self._by_to.get(to, []) if to else self.messages
        matching = [
            m
            for m in reversed(pool)
            if m.account_sid == account_sid
            and (from_ is None or m.from_ == from_)
            and all(f.matches(m.created) for f in date_filters)
        ]
        chunk = matching[offset : offset + page_size]
        filters = {k: v for k, v in query.items() if k not in ("Page", "PageSize", "PageToken")}
        path = f"/{API_VERSION}/Accounts/{account_sid}/Messages.json"

        def page_uri(page_no: int, start: int | None) -> str:
            params = dict(filters, PageSize=str(page_size), Page=str(page_no))
            if start is not None:
                params["PageToken"] = f"PA{start}"
            return f"{path}?{urlencode(params)}"

        page_no = offset // page_size
        has_next = offset + page_size < len(matching)
        envelope = {
            "end": offset + max(len(chunk) - 1, 0),
            "first_page_uri": page_uri(0, None),
            "messages": [m.to_json() for m in chunk],
            "next_page_uri": page_uri(page_no + 1, offset + page_size) if has_next else None,
            "page": page_no,
            "page_size": page_size,
            "previous_page_uri": (
                page_uri(page_no - 1, max(offset - page_size, 0)) if offset > 0 else None
            ),
            "start": offset,
            "uri": page_uri(page_no, offset or None),
        }
        return web.json_response(envelope)

    async def _fetch_message(self, request: web.Request) -> web.StreamResponse:
        account_sid = self._authenticate(request)
        if account_sid is None:
            return self._unauthorized()
        message = self._by_sid.get(request.match_info["sid"])
        if request.match_info["account_sid"] != account_sid or message is None:
            return self._not_found(request)
        if message.account_sid != account_sid:
            return self._not_found(request)
        return web.json_response(message.to_json())

    # -- pieces ----------------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        account_sid = self._auth_headers.get(header)
        if account_sid is not None:
            return account_sid
        # Slow path for encodings of the same credentials other than ours (rare).
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded).decode("latin-1").partition(":")
        except (binascii.Error, ValueError):
            return None
        expected = self.accounts.get(user)
        if expected is None or not hmac.compare_digest(expected, password):
            return None
        return user

    def _unauthorized(self) -> web.Response:
        self.stats["unauthorized"] += 1
        body = {
            "code": 20003,
            "detail": "Your AccountSid or AuthToken was incorrect.",
            "message": ERROR_MESSAGES[20003],
            "more_info": "https://www.twilio.com/docs/errors/20003",
            "status": 401,
        }
        return web.json_response(
            body, status=401, headers={"WWW-Authenticate": 'Basic realm="Twilio API"'}
        )

    def _not_found(self, request: web.Request) -> web.Response:
        self.stats["not_found"] += 1
        return _error(404, 20404, f"The requested resource {request.path} was not found", to=None)

    def _invalid(self, status: int, code: int, to: str | None = None) -> web.Response:
        self.stats["invalid"] += 1
        return _error(status, code, to=to)

    def _draw_fault(self) -> FaultKind | None:
        rates = self.rates
        if not (rates.reset or rates.hang or rates.server_error or rates.throttle):
            return None
        draw = self._fault_rng.random()
        choices: tuple[tuple[FaultKind, float], ...] = (
            ("reset", rates.reset),
            ("hang", rates.hang),
            ("server_error", rates.server_error),
            ("throttle", rates.throttle),
        )
        for kind, rate in choices:
            if draw < rate:
                return kind
            draw -= rate
        return None

    def _reset(self, request: web.Request, stat: str) -> web.StreamResponse:
        """Abort the connection with a TCP RST; the client gets no answer at all."""
        self.stats[stat] += 1
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # Linger 0 makes close() send RST instead of FIN: a real "connection reset".
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        # aiohttp ignores the response it cannot write to an aborted transport.
        return web.Response(status=500)

    def _store(self, message: StoredMessage, payload: str, arrived: float) -> None:
        self.stats["accepted"] += 1
        self.messages.append(message)
        self._by_sid[message.sid] = message
        self._by_to.setdefault(message.to, []).append(message)
        if self._record_file is not None:
            # The arrival time (sub-second, this machine's clock) lets tests check rate caps
            # per 1 s window at the provider's side.
            self._record_file.write(f'{{"received_at": {arrived:.6f}, {payload[1:]}\n')
        if self.callbacks and message.status_callback:
            self._spawn(self._send_callbacks(message))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_record_periodically(self) -> None:
        while self._record_file is not None:
            await asyncio.sleep(_RECORD_FLUSH_S)
            if self._record_file is not None:
                self._record_file.flush()

    async def _send_callbacks(self, message: StoredMessage) -> None:
        if self.callback_delay_ms > 0:
            await asyncio.sleep(self.callback_delay_ms / 1000)
        outcome = self._deliveries.get(message.to, _Delivery())
        await self._post_status(message, "sent", None)
        await self._post_status(message, outcome.status, outcome.error_code)

    async def _post_status(self, message: StoredMessage, status: str, code: int | None) -> None:
        url = message.status_callback
        if url is None or self._session is None:
            return
        message.status = status
        message.error_code = code
        message.updated = datetime.now(UTC)
        params = {
            "AccountSid": message.account_sid,
            "ApiVersion": API_VERSION,
            "From": message.from_ or "",
            "MessageSid": message.sid,
            "MessageStatus": status,
            "SmsSid": message.sid,
            "SmsStatus": status,
            "To": message.to,
        }
        if message.messaging_service_sid:
            params["MessagingServiceSid"] = message.messaging_service_sid
        if code is not None:
            params["ErrorCode"] = str(code)
        token = self.accounts[message.account_sid]
        signature = RequestValidator(token).compute_signature(url, params)
        status_code: int | None
        try:
            async with self._session.post(
                url, data=params, headers={"X-Twilio-Signature": signature}
            ) as response:
                await response.read()
                status_code = response.status
        except (ClientError, TimeoutError, OSError):
            status_code = None
        self.callbacks_sent.append(CallbackRecord(url, params, signature, status_code))


@dataclass(frozen=True, slots=True)
class _DateFilter:
    """One of Twilio's DateSent filters: a day (YYYY-MM-DD) or an instant (ISO 8601, UTC)."""

    op: str
    day: date | None = None
    instant: datetime | None = None

    @classmethod
    def parse(cls, op: str, value: str) -> _DateFilter:
        if len(value) == 10:
            return cls(op, day=date.fromisoformat(value))
        instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if instant.tzinfo is None:
            instant = instant.replace(tzinfo=UTC)
        return cls(op, instant=instant)

    def matches(self, moment: datetime) -> bool:
        if self.day is not None:
            start = datetime.combine(self.day, time(), UTC)
            end = start + timedelta(days=1)
            if self.op == ">":
                return moment >= start
            if self.op == "<":
                return moment < end
            return start <= moment < end
        assert self.instant is not None
        if self.op == ">":
            return moment >= self.instant
        if self.op == "<":
            return moment <= self.instant
        return moment.replace(microsecond=0) == self.instant.replace(microsecond=0)


def _form_str(form: Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _error(
    status: int,
    code: int,
    message: str | None = None,
    *,
    to: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """Answer with Twilio's legacy error body ({code, message, more_info, status})."""
    text = message or ERROR_MESSAGES.get(code, "Error").format(to=to or "")
    body = {
        "code": code,
        "message": text,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return web.json_response(body, status=status, headers=headers)


# -- command line ------------------------------------------------------------------------------


def _pair(text: str, sep: str) -> tuple[str, str]:
    left, found, right = text.partition(sep)
    if not found or not left or not right:
        raise argparse.ArgumentTypeError(f"expected LEFT{sep}RIGHT, got {text!r}")
    return left, right


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.peers.twilio_server",
        description="A Twilio-compatible Messages API for tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--account", action="append", default=[], metavar="SID:TOKEN", required=True
    )
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-port", action="store_true", help="first stdout line: the port")
    parser.add_argument("--record", type=Path, help="append accepted messages as JSON lines")
    parser.add_argument("--p-500", type=float, default=0.0, help="probability of a 500")
    parser.add_argument("--p-429", type=float, default=0.0, help="probability of a 429")
    parser.add_argument("--p-reset", type=float, default=0.0, help="probability of a reset")
    parser.add_argument("--p-hang", type=float, default=0.0, help="probability of a held answer")
    parser.add_argument("--hang-s", type=float, default=30.0)
    parser.add_argument("--retry-after", default="1", help="Retry-After header sent with 429")
    parser.add_argument("--error", action="append", default=[], metavar="NUMBER=CODE[:STATUS]")
    parser.add_argument("--fault", action="append", default=[], metavar="NUMBER=KIND")
    parser.add_argument("--callbacks", action="store_true", help="POST signed status callbacks")
    parser.add_argument("--callback-delay-ms", type=float, default=0.0)
    return parser.parse_args(argv)


def _server_from_args(args: argparse.Namespace) -> TwilioServer:
    accounts = dict(_pair(item, ":") for item in args.account)
    errors: dict[str, ProgrammedError] = {}
    for item in args.error:
        number, spec = _pair(item, "=")
        code, _, status = spec.partition(":")
        errors[number] = ProgrammedError(int(code), int(status or 400))
    faults: dict[str, FaultKind] = {}
    for item in args.fault:
        number, kind = _pair(item, "=")
        if kind not in FAULT_KINDS:
            raise SystemExit(f"unknown fault {kind!r} (known: {', '.join(FAULT_KINDS)})")
        faults[number] = kind  # type: ignore[assignment]
    return TwilioServer(
        accounts,
        host=args.host,
        port=args.port,
        latency_ms=args.latency_ms,
        rates=FaultRates(
            server_error=args.p_500, throttle=args.p_429, reset=args.p_reset, hang=args.p_hang
        ),
        retry_after=args.retry_after,
        hang_s=args.hang_s,
        errors=errors,
        faults=faults,
        callbacks=args.callbacks,
        callback_delay_ms=args.callback_delay_ms,
        record=args.record,
        seed=args.seed,
    )


async def _serve(args: argparse.Namespace) -> None:
    server = _server_from_args(args)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, done.set)
    async with server:
        if args.print_port:
            sys.stdout.write(f"{server.port}\n")
            sys.stdout.flush()
        print(f"twilio fake listening on {server.base_url}", file=sys.stderr, flush=True)
        await done.wait()
    accepted = server.stats["accepted"]
    print(f"twilio fake stopped; {accepted} messages accepted", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the fake until SIGINT or SIGTERM."""
    # The fake keeps every message it accepted: with the collector at its defaults, its pauses
    # grow with that store and hold requests back for tens of milliseconds, which shows up as
    # bunched arrival times (a rate cap seemingly exceeded at the "provider"). Its objects are
    # long-lived and acyclic, so young garbage is collected rarely and the store is frozen.
    gc.set_threshold(100_000, 50, 1_000)
    asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    main()
