"""Pydantic models of the TOML configuration: the main file and campaign files.

Validation that needs only one value lives on the field; checks across keys (a stage's channel
exists, its dates fall inside the campaign) live in `loader.cross_check`, which knows files.
"""

from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from dispatcher.config.durations import parse_duration

Duration = Annotated[timedelta, BeforeValidator(parse_duration)]

#: A channel's default burst, in seconds of its rate.
DEFAULT_BURST_S = 0.1


def _no_nul(value: str) -> str:
    # No file system takes a NUL in a name; pathlib would raise ValueError far from the key.
    if "\x00" in value:
        raise ValueError("contains a NUL character (\\u0000), which no file name can hold")
    return value


PathText = Annotated[str, AfterValidator(_no_nul)]
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]


def _timezone(value: object) -> str:
    if not isinstance(value, str):
        # ZoneInfo raises TypeError on non-strings, which pydantic would not catch.
        raise ValueError("expected a time zone name such as 'Asia/Shanghai'")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"unknown time zone {value!r} (use an IANA name such as 'Asia/Shanghai')"
        ) from exc
    return value


TimeZoneName = Annotated[str, BeforeValidator(_timezone)]


def _clock_time(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return time.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a time of day: write '08:00' or '21:30'") from exc
    return value


ClockTime = Annotated[time, BeforeValidator(_clock_time)]


class Model(BaseModel):
    """Strict base: unknown keys are errors, values are not coerced across types silently."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SendWindow(Model):
    """Daily hours (local to the campaign) during which messages may go out."""

    start: ClockTime = time(8, 0)
    end: ClockTime = time(21, 0)

    @model_validator(mode="after")
    def _not_empty(self) -> SendWindow:
        if self.start == self.end:
            raise ValueError("the send window is empty: start and end are the same time")
        return self


class AudienceConfig(Model):
    """A CSV audience: where it is and how to read its addresses."""

    file: PathText
    kind: Literal["phone", "email"] = "phone"
    address_column: str
    region: str = Field(default="CN", pattern=r"^[A-Z]{2}$")
    encoding: str | None = None
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    columns: dict[str, str] = Field(default_factory=dict)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return None
        import codecs

        try:
            codecs.lookup(value)
        except LookupError as exc:
            raise ValueError(
                f"unknown encoding {value!r} (try utf-8, utf-8-sig or gb18030)"
            ) from exc
        return value


class SloganChoice(Model):
    """Which slogan a stage carries: one fixed `id`, or a rotation through a set."""

    set: str
    id: str | None = None
    order: Literal["in_order", "shuffled"] = "in_order"
    seed: int = 0
    ids: list[str] | None = None

    @model_validator(mode="after")
    def _id_or_rotation(self) -> SloganChoice:
        if self.id is not None and self.ids is not None:
            raise ValueError("give either 'id' (one slogan) or 'ids' (a rotation), not both")
        if self.ids is not None and not self.ids:
            raise ValueError("'ids' is empty: list at least one slogan id")
        return self


class StageConfig(Model):
    """One stage: what to send, to whom, through which channel, and when."""

    id: Identifier
    name: str | None = None
    channel: str
    audience: str
    # When: exactly one of `at` (one-shot), `cron` (crontab expression) or `every` (interval).
    at: datetime | None = None
    cron: str | None = None
    every: Duration | None = None
    start: date | datetime | None = None
    end: date | datetime | None = None
    grace: Duration = timedelta(hours=1)
    validity: Duration = timedelta(hours=24)
    template: str | None = None
    template_file: PathText | None = None
    subject: str | None = None
    html_template_file: PathText | None = None
    slogans: SloganChoice | None = None
    max_segments: int = Field(default=3, ge=1, le=10)
    max_attempts: int | None = Field(default=None, ge=1, le=100)

    @model_validator(mode="after")
    def _one_schedule_one_template(self) -> StageConfig:
        schedules = [k for k in ("at", "cron", "every") if getattr(self, k) is not None]
        if len(schedules) != 1:
            which = ", ".join(schedules) if schedules else "none"
            raise ValueError(f"give exactly one of 'at', 'cron' or 'every' (found: {which})")
        if (self.template is None) == (self.template_file is None):
            raise ValueError("give exactly one of 'template' (inline) or 'template_file'")
        if self.every is not None and self.every < timedelta(minutes=1):
            raise ValueError("'every' must be at least 1m")
        if self.at is not None and self.at.tzinfo is not None:
            raise ValueError(
                "'at' is a local date-time in the campaign's time zone: drop the offset"
            )
        return self

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from dispatcher.crontab import crontab_fields

        try:
            crontab_fields(value)
        except ValueError as exc:
            raise ValueError(
                f"bad cron expression {value!r}: {exc} (five fields: minute hour day month weekday)"
            ) from exc
        return value


class CampaignInfo(Model):
    """The `[campaign]` table: identity, dates, time zone, send window, SMS decorations."""

    id: Identifier
    name: str
    timezone: TimeZoneName | None = None
    start: date
    end: date
    send_window: SendWindow = Field(default_factory=SendWindow)
    signature: str | None = None
    unsubscribe: str | None = None

    @model_validator(mode="after")
    def _dates_in_order(self) -> CampaignInfo:
        if self.end < self.start:
            raise ValueError(f"the campaign ends ({self.end}) before it starts ({self.start})")
        return self


class CampaignConfig(Model):
    """A whole campaign: info, audiences and stages (one file under `campaigns/`, or inline)."""

    campaign: CampaignInfo
    audiences: dict[Identifier, AudienceConfig] = Field(default_factory=dict)
    stages: list[StageConfig] = Field(default_factory=list)

    # Set by the loader: the file it came from, to resolve relative paths and name errors.
    _source: Path = PrivateAttr(default=Path("."))
    _timezone: str = PrivateAttr(default="UTC")

    @property
    def id(self) -> str:
        return self.campaign.id

    @property
    def source(self) -> Path:
        return self._source

    @property
    def base_dir(self) -> Path:
        return self._source.parent

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.campaign.timezone or self._timezone)

    def stage(self, stage_id: str) -> StageConfig | None:
        """The stage with this id, or None."""
        return next((s for s in self.stages if s.id == stage_id), None)


class ChannelConfig(Model):
    """A named channel: its adapter `type`, pacing, cost, and adapter settings (other keys)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    type: str
    rate: float = Field(default=10.0, gt=0, le=100_000, description="messages per second")
    burst: int | None = Field(default=None, ge=1)
    # The cap holds over every window of 1 s plus this margin at the sender: room for the
    # variation in how long requests take to reach the provider.
    rate_margin: Duration = timedelta(milliseconds=10)
    concurrency: int = Field(default=10, ge=1, le=10_000)
    price_per_segment: Decimal = Decimal("0")
    currency: str = "CNY"

    @field_validator("rate_margin")
    @classmethod
    def _margin_in_range(cls, value: timedelta) -> timedelta:
        if not timedelta(0) <= value <= timedelta(seconds=1):
            raise ValueError('must be between 0 and 1s (e.g. "10ms")')
        return value

    @property
    def settings(self) -> dict[str, Any]:
        """The adapter's own keys: everything that is not a common channel key."""
        return dict(self.model_extra or {})

    @property
    def bucket_size(self) -> int:
        # A tenth of a second's sends by default: a burst of a whole second's worth goes out
        # as fast as this process can build the requests, which spreads its arrivals at the
        # provider over tens of milliseconds and lets them crowd into the next second there.
        if self.burst is not None:
            return self.burst
        return max(1, math.ceil(self.rate * DEFAULT_BURST_S))


class EngineConfig(Model):
    """How the send workers behave."""

    batch_size: int = Field(default=200, ge=1, le=10_000)
    lease: Duration = timedelta(seconds=60)
    heartbeat: Duration = timedelta(seconds=5)
    max_attempts: int = Field(default=5, ge=1, le=100)
    max_age: Duration = timedelta(hours=6)
    backoff_base: Duration = timedelta(seconds=2)
    backoff_max: Duration = timedelta(minutes=10)
    shutdown_timeout: Duration = timedelta(seconds=30)
    poll_interval: Duration = timedelta(seconds=1)


class ServerConfig(Model):
    """The HTTP endpoint inside the daemon (receipts, inbound replies, health, metrics)."""

    enabled: bool = True
    listen: str = Field(
        default="127.0.0.1:8080", pattern=r"^[^:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$"
    )
    public_url: str | None = None
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)


class DispatcherSection(Model):
    """The `[dispatcher]` table."""

    database: PathText | None = None
    timezone: TimeZoneName = "Asia/Shanghai"
    slogans: PathText = "slogans"
    campaigns: list[PathText] = Field(default_factory=lambda: ["campaigns/*.toml"])


class RootConfig(Model):
    """The main configuration file."""

    dispatcher: DispatcherSection = Field(default_factory=DispatcherSection)
    server: ServerConfig = Field(default_factory=ServerConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    channels: dict[Identifier, ChannelConfig] = Field(default_factory=dict)
    campaign: list[dict[str, Any]] = Field(
        default_factory=list, description="inline campaigns, validated like campaign files"
    )
