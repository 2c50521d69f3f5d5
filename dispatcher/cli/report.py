"""`dispatcher report`: who was sent what, when, on which channel, and what became of it."""

from __future__ import annotations

import asyncio
import getpass
import io
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

import click
from rich.console import Console

from dispatcher import audit
from dispatcher.cli.audit import open_existing
from dispatcher.cli.common import console, load, run
from dispatcher.config.loader import Config
from dispatcher.errors import OperatorError
from dispatcher.reports import queries
from dispatcher.reports.html import render_report
from dispatcher.reports.queries import DeliveryRow, ReportFilter, ReportSummary
from dispatcher.reports.writers import (
    CsvWriter,
    JsonLinesWriter,
    RowWriter,
    rows_table,
    summary_tables,
)

FORMATS = ("table", "csv", "jsonl", "html")
DEFAULT_LIMITS = {"table": 100, "html": 5000}
BATCH = 2000


@click.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=str))
@click.option("--campaign", help="Only this campaign.")
@click.option("--stage", help="Only this stage (STAGE or CAMPAIGN/STAGE).")
@click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
    help="table: summaries and the first rows on the terminal; csv (UTF-8 with BOM, for Excel) "
         "and jsonl: every recipient; html: one self-contained page with charts.",
)  # fmt: skip
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file.")
@click.option(
    "--unmasked",
    is_flag=True,
    help="Show full addresses (personal data: recorded in the audit log).",
)
@click.option(
    "--limit", type=click.IntRange(min=0),
    help="At most this many recipient rows (default: table 100, html 5000, csv/jsonl all; 0: all).",
)  # fmt: skip
def report(
    config: str,
    campaign: str | None,
    stage: str | None,
    fmt: str,
    out: Path | None,
    unmasked: bool,
    limit: int | None,
) -> None:
    """Per-recipient delivery report with a funnel and breakdowns by channel, error and region."""
    cfg = load(config)
    if fmt == "html" and out is None and sys.stdout.isatty():
        raise OperatorError("--format html writes a page: give --out FILE (e.g. --out report.html)")
    if limit is None:
        limit = DEFAULT_LIMITS.get(fmt, 0)
    where = _filter(campaign, stage)
    tz = ZoneInfo(cfg.root.dispatcher.timezone)
    export_hint = (
        f"dispatcher report {shlex.quote(config)}{_filter_args(where)} "
        "--format csv --out deliveries.csv"
    )
    summary = run(_report(cfg, where, fmt, out, unmasked, limit or None, tz, export_hint))
    err = console(stderr=True)
    if summary.empty:
        err.print(f"no deliveries recorded yet for {where.describe()}: nothing to report")
    elif out is not None:
        err.print(
            f"wrote {fmt} report of {summary.totals.total} deliveries ({where.describe()}) to {out}"
        )
    if unmasked:
        err.print("addresses are unmasked: handle this output as personal data "
                  "(recorded in the audit log)")  # fmt: skip


def _filter(campaign: str | None, stage: str | None) -> ReportFilter:
    """The filter from --campaign and --stage (which may be CAMPAIGN/STAGE)."""
    if stage and "/" in stage:
        stage_campaign, _, stage = stage.rpartition("/")
        if campaign and campaign != stage_campaign:
            raise OperatorError(f"--stage {stage_campaign}/{stage} is not in --campaign {campaign}")
        campaign = stage_campaign
    return ReportFilter(campaign or None, stage or None)


def _filter_args(where: ReportFilter) -> str:
    campaign = f" --campaign {shlex.quote(where.campaign)}" if where.campaign else ""
    return campaign + (f" --stage {shlex.quote(where.stage)}" if where.stage else "")


def _check_filter(cfg: Config, where: ReportFilter, recorded: set[tuple[str, str]]) -> None:
    """Refuse a campaign or stage that neither the database nor the config knows (a typo)."""
    known = recorded | {(c.id, s.id) for c, s in cfg.stages()}
    if where.campaign and not any(c == where.campaign for c, _ in known):
        names = ", ".join(sorted({c for c, _ in known})) or "none"
        raise OperatorError(f"--campaign {where.campaign}: no such campaign (known: {names})")
    in_scope = [(c, s) for c, s in known if not where.campaign or c == where.campaign]
    if where.stage and not any(s == where.stage for _, s in in_scope):
        names = ", ".join(sorted(f"{c}/{s}" for c, s in in_scope)) or "none"
        raise OperatorError(f"--stage {where.stage}: no such stage (known: {names})")


async def _report(
    cfg: Config,
    where: ReportFilter,
    fmt: str,
    out: Path | None,
    unmasked: bool,
    limit: int | None,
    tz: ZoneInfo,
    export_hint: str,
) -> ReportSummary:
    db = await open_existing(cfg)
    try:
        _check_filter(cfg, where, await queries.known_stages(db.engine))
        now = datetime.now(UTC)
        summary = await queries.summary(db.engine, where, now=now)
        if unmasked and not summary.empty:
            # Recorded before writing: the addresses leave the database even if writing fails.
            async with db.engine.begin() as conn:
                await audit.append(conn, [audit.AuditEvent(
                    "report.unmasked", "operator", subject=where.describe(),
                    data={"user": _user(), "format": fmt, "out": str(out) if out else "stdout",
                          "deliveries": summary.totals.total, "limit": limit},
                )], now)  # fmt: skip
        rows = queries.iter_rows(db.engine, where, batch=BATCH, limit=limit)
        if fmt == "table":
            shown = [row async for batch in rows for row in batch]
            await asyncio.to_thread(_write_table, out, summary, shown, unmasked, tz, export_hint)
        elif fmt == "html":
            shown = [row async for batch in rows for row in batch]
            chunks = render_report(
                summary, shown, tz=tz, unmasked=unmasked, full_export=export_hint
            )
            await asyncio.to_thread(_write_text, out, chunks)
        else:
            with _open_output(out, bom=fmt == "csv") as stream:
                writer: RowWriter = (CsvWriter if fmt == "csv" else JsonLinesWriter)(
                    stream, unmasked=unmasked, tz=tz
                )
                async for batch in rows:
                    await asyncio.to_thread(writer.write, batch)
        return summary
    finally:
        await db.close()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        return f"uid {os.getuid()}"


@contextmanager
def _quiet_broken_pipe() -> Iterator[None]:
    """Stop writing to stdout quietly when its reader goes away (`dispatcher report | head`)."""
    try:
        yield
    except BrokenPipeError:
        # Python flushes stdout again at exit and would complain about the same closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextmanager
def _open_output(out: Path | None, *, bom: bool) -> Iterator[TextIO]:
    """A text stream to `out` (or stdout), UTF-8 (with a BOM for CSV), '\\n' kept as written."""
    encoding = "utf-8-sig" if bom else "utf-8"
    try:
        if out is None:
            stream = io.TextIOWrapper(sys.stdout.buffer, encoding=encoding, newline="",
                                      write_through=False)  # fmt: skip
            try:
                with _quiet_broken_pipe():
                    yield stream
                    stream.flush()
            finally:
                stream.detach()
            return
        with out.open("w", encoding=encoding, newline="") as stream_file:
            yield stream_file
    except OSError as exc:
        target = f"--out {out}" if out is not None else "standard output"
        raise OperatorError(f"{target}: cannot write: {exc.strerror or exc}") from exc


def _write_text(out: Path | None, chunks: Iterator[str]) -> None:
    with _open_output(out, bom=False) as stream:
        stream.writelines(chunks)


def _write_table(
    out: Path | None,
    summary: ReportSummary,
    rows: list[DeliveryRow],
    unmasked: bool,
    tz: ZoneInfo,
    export_hint: str,
) -> None:
    def show(target: Console) -> None:
        target.print(f"report: {summary.filter.describe()}; times in {tz.key}")
        if summary.empty:
            return
        for table in summary_tables(summary, tz):
            target.print()
            target.print(table)
        target.print()
        target.print(rows_table(rows, unmasked=unmasked, tz=tz))
        if len(rows) < summary.totals.total:
            target.print(f"showing {len(rows)} of {summary.totals.total} deliveries; "
                         f"every row: {export_hint}")  # fmt: skip

    if out is None:
        with _quiet_broken_pipe():
            show(console())
        return
    _with_file(out, lambda f: show(Console(file=f, width=200, force_terminal=False)))


def _with_file(out: Path, write: Callable[[TextIO], None]) -> None:
    with _open_output(out, bom=False) as stream:
        write(stream)
