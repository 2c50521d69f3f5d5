"""Commands that send or report on sending: `run`, `send`, `rehearse`, `retry`, `status`."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import UTC, datetime

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dispatcher import audit
from dispatcher.cli.common import config_argument, console, load, run
from dispatcher.config.loader import Config
from dispatcher.engine import heap
from dispatcher.engine.clock import SystemClock
from dispatcher.engine.engine import Engine
from dispatcher.errors import OperatorError
from dispatcher.logs import configure as configure_logging
from dispatcher.plan import Firing, latest_firing
from dispatcher.rehearsal import INSTANT_SPEED
from dispatcher.rehearsal import rehearse as run_rehearsal
from dispatcher.reports.status import RunSummary, summaries
from dispatcher.store import queue
from dispatcher.store.database import Database

STATUS_COLUMNS = (
    "sent",
    "delivered",
    "failed",
    "suppressed",
    "unknown",
    "pending",
    "claimed",
    "sending",
)


@click.command("run")
@config_argument
@click.option(
    "--log-format", type=click.Choice(["human", "json"]), default="human", show_default=True
)
@click.option(
    "--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO"
)
@click.option(
    "--listen", metavar="HOST:PORT", help="Override server.listen (one port per worker on a host)."
)
@click.option(
    "--no-server", is_flag=True, help="Run without the HTTP endpoint (no receipts or replies)."
)
def run_command(
    config: str, log_format: str, log_level: str, listen: str | None, no_server: bool
) -> None:
    """Run the daemon in the foreground: fire stages on schedule and send (SIGTERM stops it)."""
    cfg = load(config)
    if listen is not None:
        from dispatcher.server.app import parse_listen

        try:
            parse_listen(listen)
        except ValueError as exc:
            raise OperatorError(
                f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8081"
            ) from exc
        cfg.root.server = cfg.root.server.model_copy(update={"listen": listen})
    configure_logging(log_format, log_level)
    from dispatcher.daemon import Daemon
    from dispatcher.server.app import serve

    server = serve if cfg.root.server.enabled and not no_server else None
    run(Daemon(cfg, server=server).run())


async def _open_db(cfg: Config) -> Database:
    db = Database.open(cfg.database_url)
    await db.upgrade()
    return db


@click.command()
@config_argument
@click.option("--stage", "stage_ref", required=True, help="Stage id, or CAMPAIGN/STAGE.")
@click.option(
    "--wait",
    is_flag=True,
    help="Send now from this process and wait until every delivery is settled.",
)
def send(config: str, stage_ref: str, wait: bool) -> None:
    """Fire a stage now (a manual run or a re-run); without --wait a running daemon sends it."""
    cfg = load(config)
    campaign, stage = cfg.find_stage(stage_ref)
    if wait:
        configure_logging("human", "WARNING")
    run(_send(cfg, campaign.id, stage.id, wait))


async def _send(cfg: Config, campaign_id: str, stage_id: str, wait: bool) -> None:
    campaign = cfg.campaign(campaign_id)
    assert campaign is not None
    stage = campaign.stage(stage_id)
    assert stage is not None
    db = await _open_db(cfg)
    clock = SystemClock()
    engine = Engine(cfg, db, clock, actor="operator")
    now = clock.now()
    scheduled = latest_firing(campaign, stage, now)
    firing = Firing(campaign.id, stage.id, now, scheduled.index if scheduled else 0)
    out = console()
    try:
        await engine.start(send=wait)
        heap.settle()
        result = await engine.fire(campaign, stage, firing, trigger="manual", wait=True)
        assert result.run_id is not None and result.materialised is not None
        m = result.materialised
        out.print(
            f"run {m.run_id}: {m.rows_read} rows, {m.deliveries} deliveries, {m.invalid} invalid, "
            f"{m.duplicates} duplicates"
        )
        if wait:
            await _progress(engine, m.run_id, m.deliveries)
    finally:
        await engine.stop()
    async with db.engine.connect() as conn:
        summary = await summaries(conn, now=clock.now(), campaign=campaign.id, stage=stage.id)
    await db.close()
    _print_summaries(out, [s for s in summary if s.run_id == result.run_id])


async def _progress(engine: Engine, run_id: int, total: int) -> None:
    async def settled() -> int:
        return total - await engine.open_deliveries([run_id])

    if sys.stdout.isatty():
        with Progress(
            TextColumn("sending"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
        ) as bar:
            task = bar.add_task("send", total=total)
            while (done := await settled()) < total:
                bar.update(task, completed=done)
                await asyncio.sleep(0.2)
            bar.update(task, completed=total)
        return
    last = time.monotonic()
    while (done := await settled()) < total:
        if time.monotonic() - last >= 5:
            click.echo(f"sending: {done}/{total} settled")
            last = time.monotonic()
        await asyncio.sleep(0.2)
    click.echo(f"sending: {total}/{total} settled")


@click.command()
@config_argument
@click.option("--json", "as_json", is_flag=True, help="One JSON object per stage run.")
@click.option("--campaign", help="Only this campaign.")
@click.option("--stage", help="Only this stage.")
def status(config: str, as_json: bool, campaign: str | None, stage: str | None) -> None:
    """Per stage run: deliveries by status (adding up to the total), rate, ETA, last errors."""
    cfg = load(config)
    result = run(_status(cfg, campaign, stage))
    if as_json:
        for item in result:
            click.echo(json.dumps(item.as_dict(), ensure_ascii=False))
        return
    _print_summaries(console(), result)
    if any(not s.adds_up for s in result):
        raise OperatorError(
            "some stage runs do not add up (see the 'ok' column): run `dispatcher audit verify`"
        )


async def _status(cfg: Config, campaign: str | None, stage: str | None) -> list[RunSummary]:
    db = await _open_db(cfg)
    try:
        async with db.engine.connect() as conn:
            return await summaries(conn, now=datetime.now(UTC), campaign=campaign, stage=stage)
    finally:
        await db.close()


def _print_summaries(out: object, items: list[RunSummary]) -> None:
    from rich.console import Console

    assert isinstance(out, Console)
    if not items:
        out.print("no stage runs yet")
        return
    # Only what varies earns a column: a terminal is narrow and 19 columns would be unreadable.
    campaigns = {s.campaign for s in items}
    always = ("sent", "delivered", "failed", "suppressed", "unknown")
    statuses = [c for c in STATUS_COLUMNS if c in always or any(s.by_status.get(c) for s in items)]
    moving = any(s.open for s in items)
    columns = ["run", "fired (UTC)", "stage", "trigger", "rows", "invalid", "dup", "total"]
    columns += [*statuses, "adds up"] + (["rate/s", "eta"] if moving else [])
    table = Table(show_edge=False, title=next(iter(campaigns)) if len(campaigns) == 1 else None)
    for column in columns:
        table.add_column(column, no_wrap=True)
    for s in items:
        row = [
            str(s.run_id),
            s.fire_time.strftime("%m-%d %H:%M"),
            s.stage if len(campaigns) == 1 else f"{s.campaign}/{s.stage}",
            s.status if s.status != "ready" else s.trigger,
            str(s.rows_read),
            str(s.invalid),
            str(s.duplicates),
            str(s.deliveries),
            *(str(s.by_status.get(c, 0)) for c in statuses),
            "yes" if s.adds_up else "NO",
        ]
        if moving:
            row += [f"{s.rate_per_s:.1f}", f"{s.eta_s:.0f}s" if s.eta_s is not None else "-"]
        table.add_row(*row)
    out.print(table)
    for s in items:
        if s.errors:
            codes = ", ".join(f"{code} ×{n}" for code, n in s.errors)
            out.print(f"run {s.run_id} errors: {codes}")
        if s.error:
            out.print(f"run {s.run_id} failed: {s.error}")
    total = sum(s.deliveries for s in items)
    counted = sum(s.counted for s in items)
    out.print(
        f"{len(items)} stage runs, {total} deliveries, {counted} accounted for "
        f"({'adds up' if total == counted else 'DOES NOT ADD UP'})"
    )


@click.command()
@config_argument
@click.option(
    "--speed",
    type=click.FloatRange(min=1.0),
    help="Virtual seconds per real second (idle time is skipped anyway).",
)
@click.option("--instant", is_flag=True, help="As fast as possible (the default).")
@click.option(
    "--keep",
    "keep",
    type=click.Path(dir_okay=False),
    help="Keep the rehearsal database at this path.",
)
@click.option("--from", "since", metavar="DATE")
@click.option("--to", "until", metavar="DATE")
def rehearse(
    config: str,
    speed: float | None,
    instant: bool,
    keep: str | None,
    since: str | None,
    until: str | None,
) -> None:
    """Run the whole plan on a virtual clock against simulators, on a throwaway database."""
    from pathlib import Path
    from zoneinfo import ZoneInfo

    from dispatcher.cli.common import parse_when

    if speed is not None and instant:
        raise OperatorError("give --speed or --instant, not both")
    cfg = load(config)
    configure_logging("human", "WARNING")
    tz = ZoneInfo(cfg.root.dispatcher.timezone)
    out = console()
    started = time.monotonic()

    def announce(firing: Firing) -> None:
        campaign = cfg.campaign(firing.campaign)
        local = firing.at.astimezone(campaign.tz if campaign else tz)
        out.print(f"{local:%Y-%m-%d %H:%M %Z}  firing {firing.campaign}/{firing.stage}")

    database = Path(keep) if keep else None
    if database is not None and database.exists():
        raise OperatorError(
            f"--keep {keep}: the file exists; rehearsals start from an empty database"
        )
    result = run(
        run_rehearsal(
            cfg,
            speed=speed or INSTANT_SPEED,
            database=database,
            since=parse_when(since, tz, option="--from"),
            until=parse_when(until, tz, end=True, option="--to"),
            on_firing=announce,
        )
    )
    out.print()
    _print_summaries(out, result.summaries)
    out.print(
        f"rehearsed {result.firings} firings from {result.started:%Y-%m-%d %H:%M} to "
        f"{result.ended:%Y-%m-%d %H:%M} UTC in {time.monotonic() - started:.1f}s"
        + (f"; database kept at {result.database}" if keep else "")
    )
    if any(not s.adds_up for s in result.summaries):
        raise OperatorError("the rehearsal's accounting does not add up")


@click.command()
@config_argument
@click.option("--stage", "stage_ref", required=True, help="Stage id, or CAMPAIGN/STAGE.")
@click.option(
    "--unknown",
    is_flag=True,
    required=True,
    help="Resend deliveries whose fate is unknown (you accept that some may arrive twice).",
)
def retry(config: str, stage_ref: str, unknown: bool) -> None:
    """Put a stage's `unknown` deliveries back in the queue, by an operator's decision."""
    cfg = load(config)
    campaign, stage = cfg.find_stage(stage_ref)
    count = run(_retry(cfg, campaign.id, stage.id))
    console().print(f"{count} unknown deliveries of {campaign.id}/{stage.id} queued again")


async def _retry(cfg: Config, campaign_id: str, stage_id: str) -> int:
    db = await _open_db(cfg)
    try:
        now = datetime.now(UTC)
        async with db.engine.begin() as conn:
            from sqlalchemy import select

            from dispatcher.store.tables import StageRun

            table = StageRun.__table__  # type: ignore[attr-defined]
            run_ids = [
                r[0]
                for r in (
                    await conn.execute(
                        select(table.c.id).where(
                            table.c.campaign == campaign_id, table.c.stage == stage_id
                        )
                    )
                ).all()
            ]
            ids = await queue.requeue_unknown(conn, stage_run_ids=run_ids, now=now)
            if ids:
                await audit.append(
                    conn,
                    [
                        audit.AuditEvent(
                            "retry.unknown",
                            "operator",
                            subject=f"{campaign_id}/{stage_id}",
                            data={"deliveries": ids},
                        )
                    ],
                    now,
                )
        return len(ids)
    finally:
        await db.close()


COMMANDS = [run_command, send, status, rehearse, retry]
