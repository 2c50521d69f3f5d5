"""Commands that look before anything is sent: `check`, `plan`, `preview`."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from decimal import Decimal

import click
from rich.table import Table

from dispatcher.addresses import mask_address
from dispatcher.audience import AudienceCounts, Recipient, Rejection, dedupe, read_audience
from dispatcher.cli.common import config_argument, console, load, parse_when
from dispatcher.config.loader import Config
from dispatcher.config.models import CampaignConfig, StageConfig
from dispatcher.errors import ConfigError, DispatcherError, OperatorError, Problem, ProblemsError
from dispatcher.messages import StageFiring, audience_source, stage_firing
from dispatcher.plan import Firing, firings, iter_firings
from dispatcher.sms import TWILIO_MAX_SEGMENTS

CHECK_SAMPLE = 5
PLAN_SAMPLE = 20_000


@dataclass
class AudienceReport:
    counts: AudienceCounts
    rejections: list[Rejection]


def scan_audience(campaign: CampaignConfig, audience_id: str, keep: int = 20) -> AudienceReport:
    """Count an audience in constant memory, keeping the first `keep` rejected rows."""
    counts = AudienceCounts(0, 0, 0, 0)
    kept: list[Rejection] = []
    source = audience_source(campaign, audience_id)
    for row in dedupe(read_audience(source), file=str(source.path)):
        counts.rows += 1
        if isinstance(row, Recipient):
            counts.valid += 1
            continue
        if row.duplicate_of is not None:
            counts.duplicates += 1
        else:
            counts.invalid += 1
        if len(kept) < keep:
            kept.append(row)
    return AudienceReport(counts, kept)


def check_stage(
    config: Config, campaign: CampaignConfig, index: int, stage: StageConfig
) -> list[Problem]:
    """Render a stage against the first rows of its audience, for every slogan its firings carry.

    Problems name the stage's keys: a template that fails on real rows, or a message longer than
    `max_segments` (or the providers' ceiling) for any of its slogans.
    """
    key = f"stages[{index}]"
    jobs: dict[str | None, StageFiring] = {}
    for firing in iter_firings(campaign, stage):
        job = stage_firing(config, campaign, stage, firing)
        jobs.setdefault(job.slogan.id if job.slogan else None, job)
    if not jobs:
        return [
            Problem("the stage never fires within its dates", file=str(campaign.source), key=key)
        ]
    source = audience_source(campaign, stage.audience)
    recipients = list(
        itertools.islice(
            (r for r in read_audience(source) if isinstance(r, Recipient)), CHECK_SAMPLE
        )
    )
    for job in jobs.values():
        for recipient in recipients:
            try:
                message = job.render(recipient)
            except ProblemsError as exc:
                return list(exc.problems)
            if job.kind != "phone":
                continue
            with_slogan = f" with slogan {job.slogan.id}" if job.slogan else ""
            if message.segments > TWILIO_MAX_SEGMENTS:
                return [
                    Problem(
                        f"the message for line {recipient.line}{with_slogan} needs "
                        f"{message.segments} segments; providers refuse more than "
                        f"{TWILIO_MAX_SEGMENTS}",
                        file=str(campaign.source),
                        key=f"{key}.template",
                    )
                ]
            if message.segments > stage.max_segments:
                return [
                    Problem(
                        f"the message for line {recipient.line}{with_slogan} needs "
                        f"{message.segments} segments ({message.encoding}), more than "
                        f"max_segments = {stage.max_segments}: shorten the "
                        "template, or raise max_segments",
                        file=str(campaign.source),
                        key=f"{key}.max_segments",
                    )
                ]
    return []


@click.command()
@config_argument
def check(config: str) -> None:
    """Validate a configuration; print every problem (exit 2) or a summary (exit 0)."""
    cfg = load(config)
    problems: list[Problem] = []
    reports: dict[tuple[str, str], AudienceReport] = {}
    for campaign in cfg.campaigns:
        for audience_id in campaign.audiences:
            try:
                reports[(campaign.id, audience_id)] = scan_audience(campaign, audience_id)
            except ProblemsError as exc:
                problems.extend(exc.problems)
        for index, stage in enumerate(campaign.stages):
            if (campaign.id, stage.audience) not in reports:
                continue
            problems.extend(check_stage(cfg, campaign, index, stage))
    if problems:
        raise ConfigError(problems)
    out = console()
    out.print(f"[bold]{cfg.path}[/bold]: OK")
    out.print(f"database: {_safe_url(cfg.database_url)}")
    table = Table(title="channels", show_edge=False)
    for column in ("channel", "type", "rate/s", "burst", "concurrency", "price/segment"):
        table.add_column(column)
    for name, channel in cfg.root.channels.items():
        table.add_row(
            name,
            channel.type,
            f"{channel.rate:g}",
            str(channel.bucket_size),
            str(channel.concurrency),
            f"{channel.price_per_segment} {channel.currency}",
        )
    out.print(table)
    for campaign in cfg.campaigns:
        info = campaign.campaign
        out.print(
            f"\n[bold]campaign {campaign.id}[/bold] {info.name}: {info.start} to {info.end} "
            f"({campaign.tz.key}), send window "
            f"{info.send_window.start:%H:%M}-{info.send_window.end:%H:%M}"
        )
        audiences = Table(title="audiences", show_edge=False)
        for column in ("audience", "file", "rows", "valid", "invalid", "duplicates"):
            audiences.add_column(column)
        for audience_id, audience in campaign.audiences.items():
            report = reports[(campaign.id, audience_id)]
            c = report.counts
            audiences.add_row(
                audience_id,
                audience.file,
                str(c.rows),
                str(c.valid),
                str(c.invalid),
                str(c.duplicates),
            )
        out.print(audiences)
        for audience_id in campaign.audiences:
            for rejection in reports[(campaign.id, audience_id)].rejections:
                out.print(
                    f"  {rejection.file}:{rejection.line}: {rejection.masked}: {rejection.reason}"
                )
        stages = Table(title="stages", show_edge=False)
        for column in ("stage", "channel", "audience", "schedule", "firings", "first"):
            stages.add_column(column)
        for stage in campaign.stages:
            fires = list(iter_firings(campaign, stage))
            first = fires[0].at.astimezone(campaign.tz).strftime("%Y-%m-%d %H:%M") if fires else "-"
            stages.add_row(
                stage.id, stage.channel, stage.audience, _schedule(stage), str(len(fires)), first
            )
        out.print(stages)


def _schedule(stage: StageConfig) -> str:
    if stage.at is not None:
        return f"at {stage.at:%Y-%m-%d %H:%M}"
    if stage.cron is not None:
        return f"cron {stage.cron}"
    return f"every {stage.every}"


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@dataclass
class FiringEstimate:
    firing: Firing
    job: StageFiring
    recipients: int
    segments_per_message: float
    segments_total: int
    cost: Decimal
    exact: bool

    def as_dict(self, currency: str) -> dict[str, object]:
        return {
            "time": self.firing.at.astimezone(self.job.campaign.tz).isoformat(),
            "campaign": self.firing.campaign,
            "stage": self.firing.stage,
            "channel": self.job.stage.channel,
            "recipients": self.recipients,
            "segments_per_message": round(self.segments_per_message, 2),
            "segments_total": self.segments_total,
            "estimated_cost": str(self.cost),
            "currency": currency,
            "exact": self.exact,
            "slogan": self.job.slogan.id if self.job.slogan else None,
        }


def estimate(
    config: Config, firing: Firing, counts: dict[tuple[str, str], AudienceCounts]
) -> FiringEstimate:
    """Recipients, segments and cost of one firing (exact up to PLAN_SAMPLE recipients)."""
    campaign = config.campaign(firing.campaign)
    assert campaign is not None
    stage = campaign.stage(firing.stage)
    assert stage is not None
    job = stage_firing(config, campaign, stage, firing)
    key = (campaign.id, stage.audience)
    if key not in counts:
        counts[key] = scan_audience(campaign, stage.audience, keep=0).counts
    recipients = counts[key].valid
    rendered = 0
    segments = 0
    source = audience_source(campaign, stage.audience)
    for row in dedupe(read_audience(source), file=str(source.path)):
        if not isinstance(row, Recipient):
            continue
        if rendered >= PLAN_SAMPLE:
            break
        try:
            segments += job.render(row).segments
        except DispatcherError:
            segments += 1
        rendered += 1
    per_message = segments / rendered if rendered else 0.0
    exact = rendered == recipients
    total = segments if exact else round(per_message * recipients)
    cost = (Decimal(total) * job.price_per_segment).quantize(Decimal("0.01"))
    return FiringEstimate(firing, job, recipients, per_message, total, cost, exact)


@click.command()
@config_argument
@click.option("--json", "as_json", is_flag=True, help="One JSON object per firing, on stdout.")
@click.option(
    "--from", "since", metavar="DATE", help="Only firings at or after this date (config time zone)."
)
@click.option("--to", "until", metavar="DATE", help="Only firings up to this date, inclusive.")
def plan(config: str, as_json: bool, since: str | None, until: str | None) -> None:
    """List every firing in time order with recipients, segments and estimated cost."""
    cfg = load(config)
    from zoneinfo import ZoneInfo

    tz = ZoneInfo(cfg.root.dispatcher.timezone)
    start = parse_when(since, tz, option="--from")
    end = parse_when(until, tz, end=True, option="--to")
    counts: dict[tuple[str, str], AudienceCounts] = {}
    rows = [estimate(cfg, f, counts) for f in firings(cfg, since=start, until=end)]
    currencies = {name: ch.currency for name, ch in cfg.root.channels.items()}
    if as_json:
        for row in rows:
            data = row.as_dict(currencies[row.job.stage.channel])
            click.echo(json.dumps(data, ensure_ascii=False))
        return
    out = console()
    table = Table(show_edge=False)
    for column in (
        "time",
        "campaign",
        "stage",
        "channel",
        "recipients",
        "seg/msg",
        "segments",
        "cost",
    ):
        table.add_column(
            column,
            justify="right" if column in ("recipients", "seg/msg", "segments", "cost") else "left",
        )
    totals: dict[str, Decimal] = {}
    for row in rows:
        currency = currencies[row.job.stage.channel]
        totals[currency] = totals.get(currency, Decimal(0)) + row.cost
        approx = "" if row.exact else "~"
        table.add_row(
            row.firing.at.astimezone(row.job.campaign.tz).strftime("%Y-%m-%d %H:%M %Z"),
            row.firing.campaign,
            row.firing.stage,
            row.job.stage.channel,
            str(row.recipients),
            f"{row.segments_per_message:.2f}",
            f"{approx}{row.segments_total}",
            f"{approx}{row.cost} {currency}",
        )
    out.print(table)
    total_text = ", ".join(f"{v} {k}" for k, v in totals.items()) or "0"
    out.print(
        f"{len(rows)} firings, {sum(r.recipients for r in rows)} messages, "
        f"{sum(r.segments_total for r in rows)} segments, estimated cost {total_text}"
    )


@click.command()
@config_argument
@click.option("--stage", "stage_ref", required=True, help="Stage id, or CAMPAIGN/STAGE.")
@click.option("--limit", default=5, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--at", "at", metavar="DATETIME", help="Which firing (default: the first).")
def preview(config: str, stage_ref: str, limit: int, at: str | None) -> None:
    """Show the rendered messages for the first recipients of a stage, numbers masked."""
    cfg = load(config)
    campaign, stage = cfg.find_stage(stage_ref)
    fires = list(iter_firings(campaign, stage))
    if not fires:
        raise OperatorError(f"stage {stage.id} never fires within its dates")
    firing = fires[0]
    if at is not None:
        moment = parse_when(at, campaign.tz, option="--at")
        match = [f for f in fires if f.at == moment]
        if not match:
            listed = ", ".join(
                f.at.astimezone(campaign.tz).strftime("%Y-%m-%dT%H:%M") for f in fires[:10]
            )
            raise OperatorError(f"stage {stage.id} does not fire at {at} (firings: {listed}…)")
        firing = match[0]
    job = stage_firing(cfg, campaign, stage, firing)
    out = console()
    out.print(
        f"[bold]{campaign.id}/{stage.id}[/bold] firing {firing.index + 1} at "
        f"{firing.at.astimezone(campaign.tz):%Y-%m-%d %H:%M %Z} via {stage.channel}"
        + (f", slogan {job.slogan.id}" if job.slogan else "")
    )
    shown = 0
    source = audience_source(campaign, stage.audience)
    for row in dedupe(read_audience(source), file=str(source.path)):
        if shown >= limit:
            break
        if not isinstance(row, Recipient):
            continue
        shown += 1
        try:
            message = job.render(row)
        except ProblemsError as exc:
            out.print(f"line {row.line} {mask_address(row.address)}: [red]{exc}[/red]")
            continue
        meta = (
            f"{message.encoding}, {message.segments} segment(s)"
            if job.kind == "phone"
            else "e-mail"
        )
        out.print(f"\n[bold]line {row.line}[/bold] {mask_address(row.address)} ({meta})")
        if message.subject:
            out.print(f"Subject: {message.subject}")
        out.print(message.body, markup=False)


COMMANDS = [check, plan, preview]
