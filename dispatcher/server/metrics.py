"""`/metrics`: the engine's counters and the queue's depth in Prometheus' text format (0.0.4).

Counters live in the process (per channel worker: provider answers, error codes, latency,
rate-limiter waits; per engine: receipts); the queue depth is one `COUNT ... GROUP BY` over
the deliveries, cheap enough for every scrape. When the database does not answer, the
process counters are still served, with `dispatcher_database_up 0`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from dispatcher.channels.base import Outcome, ReceiptStatus
from dispatcher.engine.engine import Engine
from dispatcher.engine.worker import LATENCY_BUCKETS_S
from dispatcher.store.database import Database
from dispatcher.store.tables import Delivery, DeliveryStatus, OptOut

__all__ = ["CONTENT_TYPE", "Exposition", "HttpCounts", "render"]

log = logging.getLogger("dispatcher.server")
D = Delivery.__table__  # type: ignore[attr-defined]
OPT = OptOut.__table__  # type: ignore[attr-defined]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: A scrape never waits longer than this for the database.
QUERY_TIMEOUT_S: Final = 5.0

Labels = Mapping[str, str]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


@dataclass
class Exposition:
    """A Prometheus text exposition, built family by family."""

    lines: list[str] = field(default_factory=list)

    def family(self, name: str, kind: str, help_text: str) -> None:
        """Start a metric family: its HELP and TYPE lines."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: Labels | None = None) -> None:
        """Add one sample line."""
        if labels:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass
class HttpCounts:
    """Requests the endpoint answered, by route and status (forged callbacks show up here)."""

    counts: Counter[tuple[str, int]] = field(default_factory=Counter)

    def count(self, route: str, status: int) -> None:
        self.counts[(route, status)] += 1


async def render(engine: Engine, db: Database, http: HttpCounts | None = None) -> str:
    """Every metric, as Prometheus text."""
    out = Exposition()
    _workers(out, engine)
    _receipts(out, engine)
    if http is not None:
        out.family(
            "dispatcher_http_requests_total",
            "counter",
            "Requests answered by the HTTP endpoint, by route and status.",
        )
        for (route, status), n in sorted(http.counts.items()):
            out.sample("dispatcher_http_requests_total", n, {"route": route, "status": str(status)})
    await _database(out, db)
    return out.text()


def _workers(out: Exposition, engine: Engine) -> None:
    workers = sorted(engine.workers.items())
    out.family(
        "dispatcher_sends_total",
        "counter",
        "Provider calls by channel and outcome (accepted, retry, failed, opted_out, ambiguous).",
    )
    for name, worker in workers:
        for outcome in Outcome:
            out.sample(
                "dispatcher_sends_total",
                worker.stats.outcomes.get(outcome.value, 0),
                {"channel": name, "outcome": outcome.value},
            )
    out.family(
        "dispatcher_send_errors_total",
        "counter",
        "Provider calls that answered with an error code, by channel and code.",
    )
    for name, worker in workers:
        for code, n in sorted(worker.stats.error_codes.items()):
            out.sample("dispatcher_send_errors_total", n, {"channel": name, "code": code})
    out.family(
        "dispatcher_worker_events_total",
        "counter",
        "What the send workers did with deliveries, by channel and event.",
    )
    for name, worker in workers:
        stats = worker.stats
        events = {
            "claimed": stats.claimed,
            "sent": stats.sent,
            "retried": stats.retried,
            "failed": stats.failed,
            "unknown": stats.unknown,
            "suppressed": stats.suppressed,
            "deferred": stats.deferred,
        }
        for event, n in events.items():
            out.sample("dispatcher_worker_events_total", n, {"channel": name, "event": event})
    out.family(
        "dispatcher_send_latency_seconds",
        "histogram",
        "Time from calling a provider to its answer, by channel.",
    )
    for name, worker in workers:
        cumulative = 0
        for bound, n in zip(
            (*LATENCY_BUCKETS_S, math.inf), worker.stats.latency_buckets, strict=True
        ):
            cumulative += n
            le = "+Inf" if math.isinf(bound) else repr(bound)
            out.sample(
                "dispatcher_send_latency_seconds_bucket", cumulative, {"channel": name, "le": le}
            )
        out.sample(
            "dispatcher_send_latency_seconds_sum", worker.stats.latency_sum_s, {"channel": name}
        )
        out.sample("dispatcher_send_latency_seconds_count", cumulative, {"channel": name})
    out.family(
        "dispatcher_rate_limit_wait_seconds_total",
        "counter",
        "Seconds sends waited for the channel's rate limiter.",
    )
    for name, worker in workers:
        out.sample(
            "dispatcher_rate_limit_wait_seconds_total",
            float(worker.limiter.waited_s),
            {"channel": name},
        )
    out.family("dispatcher_sends_in_flight", "gauge", "Provider calls in progress, by channel.")
    for name, worker in workers:
        out.sample("dispatcher_sends_in_flight", worker.in_flight, {"channel": name})


def _receipts(out: Exposition, engine: Engine) -> None:
    by_status: Counter[tuple[str, str]] = Counter()
    by_code: Counter[tuple[str, str]] = Counter()
    for (channel, status, code), n in engine.receipt_counts.items():
        by_status[(channel, status)] += n
        if code:
            by_code[(channel, code)] += n
    channels = sorted({*engine.workers, *(c for c, _ in by_status)})
    out.family(
        "dispatcher_receipts_total", "counter", "Delivery receipts received, by channel and status."
    )
    for channel in channels:
        for receipt_status in ReceiptStatus:
            key = (channel, receipt_status.value)
            out.sample(
                "dispatcher_receipts_total",
                by_status.get(key, 0),
                {"channel": channel, "status": receipt_status.value},
            )
    out.family(
        "dispatcher_receipt_errors_total",
        "counter",
        "Delivery receipts carrying an error code, by channel and code.",
    )
    for (channel, code), n in sorted(by_code.items()):
        out.sample("dispatcher_receipt_errors_total", n, {"channel": channel, "code": code})
    out.family(
        "dispatcher_receipts_unmatched_total",
        "counter",
        "Receipts for message ids no delivery has (given up after a grace period).",
    )
    out.sample("dispatcher_receipts_unmatched_total", engine.writer.unmatched_receipts)
    out.family(
        "dispatcher_writer_commits_total", "counter", "Group commits of delivery state changes."
    )
    out.sample("dispatcher_writer_commits_total", engine.writer.commits)


async def _database(out: Exposition, db: Database) -> None:
    try:
        async with asyncio.timeout(QUERY_TIMEOUT_S):
            depth, opt_outs = await _query(db)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        log.warning("metrics: the database did not answer: %s", type(exc).__name__)
        out.family("dispatcher_database_up", "gauge", "1 when the database answered this scrape.")
        out.sample("dispatcher_database_up", 0)
        return
    out.family("dispatcher_database_up", "gauge", "1 when the database answered this scrape.")
    out.sample("dispatcher_database_up", 1)
    out.family(
        "dispatcher_deliveries", "gauge", "Deliveries in the database, by channel and status."
    )
    for (channel, status), n in _with_zeros(depth):
        out.sample("dispatcher_deliveries", n, {"channel": channel, "status": status})
    out.family("dispatcher_opt_outs", "gauge", "Addresses on the opt-out list.")
    out.sample("dispatcher_opt_outs", opt_outs)


async def _query(db: Database) -> tuple[dict[tuple[str, str], int], int]:
    async with db.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(D.c.channel, D.c.status, func.count()).group_by(D.c.channel, D.c.status)
            )
        ).all()
        opt_outs = int((await conn.execute(select(func.count()).select_from(OPT))).scalar_one())
    return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}, opt_outs


def _with_zeros(depth: Mapping[tuple[str, str], int]) -> Iterable[tuple[tuple[str, str], int]]:
    # Every status of every channel seen, zeros included, so series do not come and go.
    channels = sorted({channel for channel, _ in depth})
    for channel in channels:
        for status in DeliveryStatus.ALL:
            yield (channel, status), depth.get((channel, status), 0)
