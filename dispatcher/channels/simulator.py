"""A simulated SMS provider for rehearsals, demos and benchmarks.

It answers like a real provider would: latency, permanent and retryable errors with provider
codes, lost responses, and delivery receipts. Every answer is a function of the seed, the
delivery id and how many times that delivery was tried, so a rehearsal gives the same outcomes
whatever the concurrency or the order in which workers send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from dispatcher.channels.base import (
    AddressKind,
    Channel,
    ChannelContext,
    ChannelSettings,
    OutboundMessage,
    Receipt,
    ReceiptStatus,
    SendResult,
)
from dispatcher.errors import ChannelError

#: The code a receipt carries when the simulated handset was unreachable (Twilio's 30003).
UNDELIVERED_CODE = "30003"
#: A send-log line reaches the file at most this long after the message was sent.
LOG_FLUSH_INTERVAL_S = 0.2
# Due receipts handed to the sink together (and awaited together) before the pump looks again.
_RECEIPTS_AT_ONCE = 500
# How long close() lets a receipt already being handed to the sink finish before cancelling it.
_CLOSE_GRACE_S = 5.0
# Sums of probabilities are compared with a little slack for float rounding (0.1 + 0.2 ...).
_SUM_TOLERANCE = 1e-9


class SimulatorSettings(ChannelSettings):
    """Settings of a `simulator` channel; every probability is per send attempt.

    Latency is uniform in `latency_ms ± latency_jitter_ms` (never below 0). A send fails for
    good with code C with probability `failure_rates[C]`, is refused for now with
    `retry_rates[C]`, loses its answer with `ambiguous_rate` (the message is still sent), and
    is otherwise accepted; a sent message's receipt says undelivered ("30003") with
    `undelivered_rate`. `log` is a JSON-lines file of sent messages, relative to the base dir.
    """

    latency_ms: float = Field(default=0, ge=0)
    latency_jitter_ms: float = Field(default=0, ge=0)
    failure_rates: dict[str, float] = Field(default_factory=dict)
    retry_rates: dict[str, float] = Field(default_factory=dict)
    retry_after_s: float | None = Field(default=None, ge=0)
    ambiguous_rate: float = 0
    receipts: bool = True
    receipt_delay_ms: float = Field(default=0, ge=0)
    undelivered_rate: float = 0
    seed: int = 0
    log: str | None = None

    @field_validator("failure_rates", "retry_rates")
    @classmethod
    def _check_code_rates(cls, rates: dict[str, float]) -> dict[str, float]:
        for code, rate in rates.items():
            if not code.strip():
                raise ValueError("an error code must not be empty")
            _check_probability(f"rate of code {code!r}", rate)
        return rates

    @field_validator("ambiguous_rate", "undelivered_rate")
    @classmethod
    def _check_rate(cls, rate: float) -> float:
        _check_probability("rate", rate)
        return rate

    @field_validator("log")
    @classmethod
    def _check_log(cls, log: str | None) -> str | None:
        if log is not None and not log.strip():
            raise ValueError("log must be a file path, or left out for no send log")
        return log

    @model_validator(mode="after")
    def _check_outcomes_exclusive(self) -> SimulatorSettings:
        both = sorted(set(self.failure_rates) & set(self.retry_rates))
        if both:
            raise ValueError(
                f"code(s) {', '.join(both)} appear in both failure_rates and retry_rates; "
                "a code is either permanent or retryable"
            )
        total = sum(self.failure_rates.values()) + sum(self.retry_rates.values())
        total += self.ambiguous_rate
        if total > 1 + _SUM_TOLERANCE:
            raise ValueError(
                f"failure_rates, retry_rates and ambiguous_rate add up to {total:g}; they are "
                "probabilities of exclusive outcomes of one send, so their sum must be at most 1"
            )
        return self


def _check_probability(what: str, rate: float) -> None:
    if not (math.isfinite(rate) and 0 <= rate <= 1):
        raise ValueError(f"{what} must be a probability between 0 and 1, got {rate!r}")


@dataclass(frozen=True, slots=True)
class _Band:
    """One outcome of a send, taken when the draw falls below `upper`."""

    upper: float
    kind: Literal["failed", "retry", "ambiguous"]
    code: str


def _outcome_bands(settings: SimulatorSettings) -> tuple[_Band, ...]:
    # Codes are sorted so that the same rates give the same outcomes whatever their order in
    # the TOML file.
    bands: list[_Band] = []
    upper = 0.0
    for code, rate in sorted(settings.failure_rates.items()):
        upper += rate
        bands.append(_Band(upper, "failed", code))
    for code, rate in sorted(settings.retry_rates.items()):
        upper += rate
        bands.append(_Band(upper, "retry", code))
    upper += settings.ambiguous_rate
    bands.append(_Band(upper, "ambiguous", "TIMEOUT"))
    return tuple(bands)


@dataclass(frozen=True, slots=True)
class _Draw:
    """Every random choice of one attempt, drawn up front so each is independent of the others."""

    outcome: float
    latency_s: float
    undelivered: bool
    provider_id: str


class SimulatorChannel(Channel):
    """A provider that answers from seeded dice; see `SimulatorSettings` for the knobs.

    Counters `accepted`, `retried`, `failed`, `ambiguous` and `duplicates` (a delivery sent
    again after the simulator already had it: a breach of "never twice" in a rehearsal) are
    public for tests and benchmarks. For `reconcile`, the simulator remembers the provider id of
    every delivery it sent (about 150 bytes each): acceptable for a simulator, and the reason a
    real provider is asked instead of kept in memory.
    """

    settings_model: ClassVar[type[ChannelSettings]] = SimulatorSettings
    address_kind: ClassVar[AddressKind] = "any"
    can_reconcile: ClassVar[bool] = True

    def __init__(self, name: str, settings: ChannelSettings, context: ChannelContext) -> None:
        if not isinstance(settings, SimulatorSettings):
            raise TypeError(f"channel {name!r}: expected SimulatorSettings, got {type(settings)}")
        super().__init__(name, settings, context)
        self._settings = settings
        self._bands = _outcome_bands(settings)
        self._attempts: dict[int, int] = {}
        self._sent: dict[int, str] = {}
        self._log: _SendLog | None = None
        self._receipts = _ReceiptPump(name, context)
        self.accepted = 0
        self.retried = 0
        self.failed = 0
        self.ambiguous = 0
        self.duplicates = 0

    @property
    def sent_count(self) -> int:
        """How many distinct deliveries the simulated provider has (accepted or lost answers)."""
        return len(self._sent)

    @property
    def pending_receipts(self) -> int:
        """How many receipts are scheduled and not yet handed to the sink."""
        return self._receipts.pending

    @property
    def receipts_delivered(self) -> int:
        """How many receipts the sink has accepted without raising."""
        return self._receipts.delivered

    async def start(self) -> None:
        """Open the send log, when one is configured."""
        if self._settings.log is not None and self._log is None:
            path = self.context.base_dir / self._settings.log
            log = _SendLog(path, self.context)
            await log.open(self.name)
            self._log = log

    async def send(self, message: OutboundMessage) -> SendResult:
        """Answer like a provider would, from the dice of this delivery's attempt."""
        if self._settings.log is not None and self._log is None:
            raise RuntimeError(f"channel {self.name!r}: send() before start()")
        delivery_id = message.delivery_id
        attempt = self._attempts.get(delivery_id, 0)
        self._attempts[delivery_id] = attempt + 1
        draw = self._draw(delivery_id, attempt)
        if draw.latency_s > 0:
            await asyncio.sleep(draw.latency_s)

        band = next((b for b in self._bands if draw.outcome < b.upper), None)
        if band is None:
            self._attempts.pop(delivery_id, None)
            self.accepted += 1
            self._record_sent(message, draw)
            return SendResult.accepted(draw.provider_id, expects_receipt=self._settings.receipts)
        if band.kind == "failed":
            self._attempts.pop(delivery_id, None)
            self.failed += 1
            return SendResult.failed(band.code, f"simulated permanent failure (code {band.code})")
        if band.kind == "retry":
            self.retried += 1
            return SendResult.retry(
                band.code,
                f"simulated retryable error (code {band.code})",
                retry_after=self._settings.retry_after_s,
            )
        # The request reached the provider, which sent the message; only the answer was lost.
        self.ambiguous += 1
        self._record_sent(message, draw)
        return SendResult.ambiguous(
            band.code, "simulated lost response: the provider may have the message"
        )

    async def reconcile(self, message: OutboundMessage, since: datetime) -> SendResult | None:
        """Say whether this simulator sent `message`: accepted with its id, or None if unsure.

        The record lives in this process only: a delivery it has no record of may have been sent
        by a simulator in a process that died, so "not found" is not proof and the engine must
        keep it `unknown` (resending it could send it twice).
        """
        provider_id = self._sent.get(message.delivery_id)
        if provider_id is not None:
            return SendResult.accepted(provider_id, expects_receipt=False)
        return None

    async def close(self) -> None:
        """Drop receipts not yet due, then flush and close the send log."""
        await self._receipts.close()
        if self._log is not None:
            await self._log.close()
            self._log = None

    def _draw(self, delivery_id: int, attempt: int) -> _Draw:
        # A string seed is hashed with SHA-512 by `random`, so it is stable across processes
        # (unlike hash()) and independent of every other delivery's draws.
        rng = random.Random(f"{self._settings.seed}:{delivery_id}:{attempt}")
        outcome = rng.random()
        latency_ms = self._settings.latency_ms
        jitter_ms = self._settings.latency_jitter_ms
        if jitter_ms > 0:
            latency_ms = max(0.0, latency_ms + rng.uniform(-jitter_ms, jitter_ms))
        undelivered = rng.random() < self._settings.undelivered_rate
        provider_id = f"SM{rng.getrandbits(128):032x}"
        return _Draw(outcome, latency_ms / 1000, undelivered, provider_id)

    def _record_sent(self, message: OutboundMessage, draw: _Draw) -> None:
        if message.delivery_id in self._sent:
            self.duplicates += 1
            self.context.logger.warning(
                "channel %s: delivery %d was sent again (already sent as %s)",
                self.name,
                message.delivery_id,
                self._sent[message.delivery_id],
            )
        else:
            self._sent[message.delivery_id] = draw.provider_id
        if self._log is not None:
            self._log.append(
                {
                    "t": time.time(),
                    "id": draw.provider_id,
                    "address": message.address,
                    "delivery_id": message.delivery_id,
                    "segments": message.segments,
                }
            )
        if self._settings.receipts:
            status = ReceiptStatus.UNDELIVERED if draw.undelivered else ReceiptStatus.DELIVERED
            self._receipts.schedule(
                self._settings.receipt_delay_ms / 1000,
                Receipt(
                    channel=self.name,
                    provider_id=draw.provider_id,
                    status=status,
                    error_code=UNDELIVERED_CODE if draw.undelivered else None,
                    reason="unreachable destination handset (simulated)"
                    if draw.undelivered
                    else None,
                ),
            )


class _ReceiptPump:
    """Hands receipts to the sink once due, from one background task.

    The delay is the same for every receipt of a channel, so due times only grow and a FIFO is
    a priority queue: one task and one small tuple per pending receipt, where a task per receipt
    would cost a coroutine each at benchmark rates.
    """

    def __init__(self, channel: str, context: ChannelContext) -> None:
        self._channel = channel
        self._context = context
        self._queue: deque[tuple[float, Receipt]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.delivered = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    def schedule(self, delay_s: float, receipt: Receipt) -> None:
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        if not self._queue:
            self._wake.set()
        self._queue.append((loop.time() + delay_s, receipt))
        if self._task is None:
            self._task = loop.create_task(self._run(), name=f"simulator-receipts-{self._channel}")

    async def close(self) -> None:
        self._closing = True
        self._queue.clear()
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        # Let a receipt already in the sink finish (it may be writing to the database), but do
        # not wait forever on a stuck sink.
        done, _ = await asyncio.wait({task}, timeout=_CLOSE_GRACE_S)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = self._queue[0][0] - loop.time()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            # Hand every due receipt over at once (up to a bound): a sink that commits them to a
            # database can then do so in one transaction instead of one each.
            now = loop.time()
            due: list[Receipt] = []
            while self._queue and self._queue[0][0] <= now and len(due) < _RECEIPTS_AT_ONCE:
                due.append(self._queue.popleft()[1])
            await asyncio.gather(*(self._deliver(receipt) for receipt in due))

    async def _deliver(self, receipt: Receipt) -> None:
        stamped = Receipt(
            channel=receipt.channel,
            provider_id=receipt.provider_id,
            status=receipt.status,
            error_code=receipt.error_code,
            reason=receipt.reason,
            at=datetime.now(UTC),
        )
        try:
            await self._context.receipt_sink(stamped)
        except Exception:
            # A failing sink must not stop the receipts that follow.
            self._context.logger.exception(
                "channel %s: receipt sink failed for %s", self._channel, receipt.provider_id
            )
        else:
            self.delivered += 1


class _SendLog:
    """A JSON-lines log of what the simulated provider sent, written off the event loop.

    Lines collect in memory and a background task writes them at least every
    `LOG_FLUSH_INTERVAL_S` and on close, in a worker thread, without fsync: it is a record for
    benchmarks and rehearsals, not the source of truth (the database is).
    """

    def __init__(self, path: Path, context: ChannelContext) -> None:
        self._path = path
        self._context = context
        self._lines: list[str] = []
        self._file: IO[str] | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failed = False

    async def open(self, channel: str) -> None:
        try:
            self._file = await asyncio.to_thread(_open_append, self._path)
        except OSError as exc:
            raise ChannelError(
                f"channel {channel!r}: cannot open send log {self._path}: {exc.strerror or exc}"
            ) from exc
        self._task = asyncio.get_running_loop().create_task(
            self._flush_periodically(), name=f"simulator-log-{channel}"
        )

    def append(self, record: dict[str, Any]) -> None:
        self._lines.append(json.dumps(record, ensure_ascii=False) + "\n")

    async def close(self) -> None:
        # Stopped by an event, not cancelled: a cancelled await of a thread leaves the thread
        # writing, and the final flush below could then interleave with it.
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self._flush()
        if self._file is not None:
            await asyncio.to_thread(self._file.close)
            self._file = None

    async def _flush_periodically(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), LOG_FLUSH_INTERVAL_S)
            await self._flush()

    async def _flush(self) -> None:
        if not self._lines or self._file is None:
            return
        chunk = "".join(self._lines)
        self._lines = []
        try:
            await asyncio.to_thread(_write_and_flush, self._file, chunk)
        except OSError as exc:
            # Reported once: a full disk would otherwise log five times a second.
            if not self._failed:
                self._failed = True
                self._context.logger.error(
                    "simulator send log %s: cannot write (%s); lines are being dropped",
                    self._path,
                    exc.strerror or exc,
                )
        else:
            self._failed = False


def _open_append(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8", newline="\n")


def _write_and_flush(file: IO[str], chunk: str) -> None:
    file.write(chunk)
    file.flush()
