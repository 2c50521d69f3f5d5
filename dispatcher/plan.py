"""Stages to APScheduler triggers to firings: one schedule shared by `plan`, `rehearse` and `run`.

The daemon schedules exactly the trigger objects built here, and `plan` lists what the same
objects yield, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from dispatcher.config.loader import Config
from dispatcher.config.models import CampaignConfig, SendWindow, StageConfig
from dispatcher.crontab import crontab_fields

# A stage on a short interval over a long campaign must not make `plan` run forever.
MAX_FIRINGS_PER_STAGE = 10_000


@dataclass(frozen=True, slots=True)
class Firing:
    """One scheduled run of a stage: its UTC-aware time and its 0-based index among its firings."""

    campaign: str
    stage: str
    at: datetime
    index: int

    @property
    def key(self) -> tuple[str, str, datetime]:
        return (self.campaign, self.stage, self.at)


def _local(value: date | datetime, tz: ZoneInfo, end: bool) -> datetime:
    if isinstance(value, datetime):
        naive = value.replace(tzinfo=None)
    else:
        naive = datetime.combine(value, time.max if end else time.min)
    return naive.replace(tzinfo=tz)


def stage_bounds(campaign: CampaignConfig, stage: StageConfig) -> tuple[datetime, datetime]:
    """The local, aware [start, end] within which the stage may fire."""
    tz = campaign.tz
    start = _local(
        stage.start if stage.start is not None else campaign.campaign.start, tz, end=False
    )
    end = _local(stage.end if stage.end is not None else campaign.campaign.end, tz, end=True)
    return start, end


def build_trigger(campaign: CampaignConfig, stage: StageConfig) -> BaseTrigger:
    """The APScheduler trigger for a stage, bounded by the stage's (or campaign's) dates."""
    tz = campaign.tz
    start, end = stage_bounds(campaign, stage)
    if stage.at is not None:
        return DateTrigger(run_date=stage.at.replace(tzinfo=tz), timezone=tz)
    if stage.cron is not None:
        return CronTrigger(
            **crontab_fields(stage.cron), start_date=start, end_date=end, timezone=tz
        )
    assert stage.every is not None
    return IntervalTrigger(
        seconds=int(stage.every.total_seconds()), start_date=start, end_date=end, timezone=tz
    )


def iter_firings(campaign: CampaignConfig, stage: StageConfig) -> Iterator[Firing]:
    """Every firing of a stage in time order, from the trigger itself."""
    trigger = build_trigger(campaign, stage)
    start, _ = stage_bounds(campaign, stage)
    previous: datetime | None = None
    now = start
    for index in range(MAX_FIRINGS_PER_STAGE):
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None:
            return
        yield Firing(campaign.id, stage.id, fire.astimezone(UTC), index)
        previous = fire
        now = fire + timedelta(microseconds=1)


def firings(
    config: Config, since: datetime | None = None, until: datetime | None = None
) -> list[Firing]:
    """All firings of all stages in time order, optionally limited to [since, until)."""
    out: list[Firing] = []
    for campaign, stage in config.stages():
        for firing in iter_firings(campaign, stage):
            if until is not None and firing.at >= until:
                break
            if since is None or firing.at >= since:
                out.append(firing)
    out.sort(key=lambda f: (f.at, f.campaign, f.stage))
    return out


def firing_at(campaign: CampaignConfig, stage: StageConfig, at: datetime) -> Firing | None:
    """The firing of `stage` scheduled exactly at `at`, if there is one."""
    for firing in iter_firings(campaign, stage):
        if firing.at == at:
            return firing
        if firing.at > at:
            return None
    return None


def latest_firing(campaign: CampaignConfig, stage: StageConfig, now: datetime) -> Firing | None:
    """The last firing at or before `now`."""
    latest = None
    for firing in iter_firings(campaign, stage):
        if firing.at > now:
            break
        latest = firing
    return latest


def in_window(window: SendWindow, tz: ZoneInfo, moment: datetime) -> bool:
    """Whether `moment` falls inside the daily send window (end exclusive; may span midnight)."""
    local = moment.astimezone(tz).time()
    if window.start < window.end:
        return window.start <= local < window.end
    return local >= window.start or local < window.end


def next_window_opening(window: SendWindow, tz: ZoneInfo, moment: datetime) -> datetime:
    """The first instant at or after `moment` that is inside the send window (UTC-aware)."""
    if in_window(window, tz, moment):
        return moment
    local = moment.astimezone(tz)
    candidate = datetime.combine(local.date(), window.start, tzinfo=tz)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), window.start, tzinfo=tz)
    return candidate.astimezone(UTC)
