"""Load the configuration: read TOML, resolve ${ENV} secrets, validate, cross-check references.

Every problem found is collected (not just the first) and raised as one `ConfigError`, each
problem naming its file, key path and line.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dispatcher.channels import registry
from dispatcher.channels.base import Channel, ChannelSettings
from dispatcher.config.locate import KeyLocator, PathPart
from dispatcher.config.models import CampaignConfig, RootConfig, StageConfig
from dispatcher.errors import ChannelError, ConfigError, DispatcherError, Problem, ProblemsError
from dispatcher.render import CompiledTemplate, compile_template, load_template_file
from dispatcher.slogans import SloganSet, load_slogan_sets

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")
DATABASE_ENV = "DISPATCHER_DATABASE_URL"


@dataclass(frozen=True, slots=True)
class StageTemplates:
    """A stage's compiled templates: the body, and for e-mail a subject and HTML part."""

    body: CompiledTemplate
    subject: CompiledTemplate | None = None
    html: CompiledTemplate | None = None


@dataclass
class Config:
    """Everything loaded and validated from one main configuration file."""

    path: Path
    root: RootConfig
    campaigns: list[CampaignConfig]
    slogan_sets: dict[str, SloganSet]
    channel_types: dict[str, type[Channel]]
    channel_settings: dict[str, ChannelSettings]
    templates: dict[tuple[str, str], StageTemplates]
    database_url: str
    digest: str
    sources: list[Path] = field(default_factory=list)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def campaign(self, campaign_id: str) -> CampaignConfig | None:
        """The campaign with this id, or None."""
        return next((c for c in self.campaigns if c.id == campaign_id), None)

    def stages(self) -> Iterator[tuple[CampaignConfig, StageConfig]]:
        """Every (campaign, stage) pair in file order."""
        for campaign in self.campaigns:
            for stage in campaign.stages:
                yield campaign, stage

    def find_stage(self, ref: str) -> tuple[CampaignConfig, StageConfig]:
        """Resolve `STAGE` or `CAMPAIGN/STAGE` to one stage, or raise a ConfigError."""
        campaign_id, _, stage_id = ref.rpartition("/")
        matches = [
            (c, s)
            for c, s in self.stages()
            if s.id == stage_id and (not campaign_id or c.id == campaign_id)
        ]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            known = ", ".join(f"{c.id}/{s.id}" for c, s in self.stages()) or "none"
            raise ConfigError([Problem(f"no stage {ref!r} (stages: {known})", file=str(self.path))])
        raise ConfigError(
            [
                Problem(
                    f"stage id {ref!r} is in several campaigns: write CAMPAIGN/STAGE",
                    file=str(self.path),
                )
            ]
        )


class _Collector:
    """Collects problems for one file, locating key paths to lines."""

    def __init__(self, file: Path, text: str, prefix: Sequence[PathPart] = ()) -> None:
        self.file = file
        self.locator = KeyLocator(text)
        self.prefix = tuple(prefix)
        self.problems: list[Problem] = []

    def add(self, message: str, path: Sequence[PathPart] = ()) -> None:
        full = (*self.prefix, *path)
        self.problems.append(
            Problem(
                message,
                file=str(self.file),
                key=_format_path(full) if full else None,
                line=self.locator.line_of(full) if full else None,
            )
        )

    def add_validation(self, error: ValidationError, path: Sequence[PathPart] = ()) -> None:
        for item in error.errors():
            loc = [p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = "unknown key (check its spelling against config.example.toml)"
            elif item["type"] == "missing":
                message = "required key is missing"
            self.add(message, (*path, *loc))


def _format_path(path: Sequence[PathPart]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """Parse one TOML file; syntax errors name the file, line and column."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError([Problem("file not found", file=str(path))]) from exc
    except OSError as exc:
        raise ConfigError([Problem(f"cannot read: {exc.strerror}", file=str(path))]) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad_line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [Problem("not UTF-8 (save the file as UTF-8)", file=str(path), line=bad_line)]
        ) from exc
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _TOML_POSITION.search(message)
        line: int | None = int(position.group(1)) if position else None
        column: int | None = int(position.group(2)) if position else None
        message = _TOML_POSITION.sub("", message).strip()
        raise ConfigError(
            [Problem(f"TOML syntax error: {message}", file=str(path), line=line, column=column)]
        ) from exc


def resolve_secrets(
    value: Any, env: Mapping[str, str], collector: _Collector, path: tuple[PathPart, ...] = ()
) -> Any:
    """Replace every ${VAR} in string values; a missing variable is a problem naming it."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                collector.add(
                    f"environment variable {name} is not set (referenced as ${{{name}}})", path
                )
                return ""
            return env[name]

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: resolve_secrets(v, env, collector, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_secrets(v, env, collector, (*path, i)) for i, v in enumerate(value)]
    return value


def database_url(configured: str | None, base_dir: Path, env: Mapping[str, str]) -> str:
    """The database URL: env override, configured value, or a SQLite file beside the config."""
    url = env.get(DATABASE_ENV) or configured or "sqlite:///var/dispatcher.db"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        relative = url.removeprefix("sqlite:///")
        if relative and relative != ":memory:":
            url = "sqlite:///" + str((base_dir / relative).resolve())
    return url


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Load and validate the main configuration file and every campaign it names."""
    env = os.environ if env is None else env
    path = Path(path)
    data, text = read_toml(path)
    digest = hashlib.sha256(text.encode()).hexdigest()
    root_collector = _Collector(path, text)
    data = resolve_secrets(data, env, root_collector)
    try:
        root = RootConfig.model_validate(data)
    except ValidationError as exc:
        root_collector.add_validation(exc)
        raise ConfigError(root_collector.problems) from exc
    problems = list(root_collector.problems)
    base_dir = path.parent

    # Campaigns: files by glob, then inline [[campaign]] tables.
    campaigns: list[CampaignConfig] = []
    sources: list[Path] = [path]
    collectors: dict[str, _Collector] = {}
    for pattern in root.dispatcher.campaigns:
        matched = sorted(glob.glob(str(base_dir / pattern)))
        if not matched and not glob.has_magic(pattern):
            root_collector.add(f"campaign file {pattern} not found", ("dispatcher", "campaigns"))
        for name in matched:
            campaign_path = Path(name)
            try:
                campaign_data, campaign_text = read_toml(campaign_path)
            except ConfigError as exc:
                problems.extend(exc.problems)
                continue
            digest = hashlib.sha256((digest + campaign_text).encode()).hexdigest()
            sources.append(campaign_path)
            collector = _Collector(campaign_path, campaign_text)
            campaign = _validate_campaign(campaign_data, env, collector, campaign_path, root)
            problems.extend(collector.problems)
            if campaign is not None:
                campaigns.append(campaign)
                collectors[campaign.id] = collector
    for index, inline in enumerate(root.campaign):
        collector = _Collector(path, text, ("campaign", index))
        campaign = _validate_campaign(inline, env, collector, path, root)
        problems.extend(collector.problems)
        if campaign is not None:
            campaigns.append(campaign)
            collectors[campaign.id] = collector
    problems.extend(p for p in root_collector.problems if p not in problems)

    seen_ids: set[str] = set()
    for campaign in campaigns:
        if campaign.id in seen_ids:
            collectors[campaign.id].add(
                f"campaign id {campaign.id!r} is used twice", ("campaign", "id")
            )
        seen_ids.add(campaign.id)

    # Slogans.
    slogan_sets: dict[str, SloganSet] = {}
    slogan_dir = base_dir / root.dispatcher.slogans
    if slogan_dir.is_dir():
        try:
            slogan_sets = load_slogan_sets(slogan_dir)
        except ConfigError as exc:
            problems.extend(exc.problems)
    else:
        root_collector.add(f"slogan directory {slogan_dir} not found", ("dispatcher", "slogans"))

    # Channels: the adapter type must be registered and its settings valid.
    channel_types: dict[str, type[Channel]] = {}
    channel_settings: dict[str, ChannelSettings] = {}
    for name, channel in root.channels.items():
        try:
            cls = registry.load(channel.type)
        except ChannelError as exc:
            root_collector.add(str(exc), ("channels", name, "type"))
            continue
        try:
            channel_settings[name] = cls.settings_model.model_validate(channel.settings)
            channel_types[name] = cls
        except ValidationError as exc:
            root_collector.add_validation(exc, ("channels", name))

    templates: dict[tuple[str, str], StageTemplates] = {}
    for campaign in campaigns:
        collector = collectors[campaign.id]
        _cross_check(campaign, root, slogan_sets, channel_types, collector)
        for index, stage in enumerate(campaign.stages):
            try:
                templates[(campaign.id, stage.id)] = _compile_stage(
                    campaign, index, stage, collector
                )
            except ProblemsError as exc:
                collector.problems.extend(exc.problems)
        problems.extend(p for p in collector.problems if p not in problems)
    problems.extend(p for p in root_collector.problems if p not in problems)
    if problems:
        raise ConfigError(problems)
    return Config(
        path=path,
        root=root,
        campaigns=campaigns,
        slogan_sets=slogan_sets,
        channel_types=channel_types,
        channel_settings=channel_settings,
        templates=templates,
        database_url=database_url(root.dispatcher.database, base_dir, env),
        digest=digest,
        sources=sources,
    )


def _validate_campaign(
    data: dict[str, Any],
    env: Mapping[str, str],
    collector: _Collector,
    source: Path,
    root: RootConfig,
) -> CampaignConfig | None:
    data = resolve_secrets(data, env, collector)
    try:
        campaign = CampaignConfig.model_validate(data)
    except ValidationError as exc:
        collector.add_validation(exc)
        return None
    campaign._source = source
    campaign._timezone = root.dispatcher.timezone
    return campaign


def _as_local_bounds(value: date | datetime, end: bool) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    return datetime.combine(value, time.max if end else time.min)


def _cross_check(
    campaign: CampaignConfig,
    root: RootConfig,
    slogan_sets: Mapping[str, SloganSet],
    channel_types: Mapping[str, type[Channel]],
    collector: _Collector,
) -> None:
    info = campaign.campaign
    first = datetime.combine(info.start, time.min)
    last = datetime.combine(info.end, time.max)
    for audience_id, audience in campaign.audiences.items():
        if not (campaign.base_dir / audience.file).is_file():
            collector.add(
                f"audience file {audience.file} not found (relative to {campaign.base_dir})",
                ("audiences", audience_id, "file"),
            )
    seen: set[str] = set()
    for stage_index, stage in enumerate(campaign.stages):
        where: tuple[PathPart, ...] = ("stages", stage_index)
        if stage.id in seen:
            collector.add(f"stage id {stage.id!r} is used twice", (*where, "id"))
        seen.add(stage.id)
        if stage.channel not in root.channels:
            known = ", ".join(root.channels) or "none configured"
            collector.add(
                f"unknown channel {stage.channel!r} (channels: {known})", (*where, "channel")
            )
        stage_audience = campaign.audiences.get(stage.audience)
        if stage_audience is None:
            known = ", ".join(campaign.audiences) or "none"
            collector.add(
                f"unknown audience {stage.audience!r} (audiences: {known})", (*where, "audience")
            )
        elif stage.channel in channel_types:
            kind = channel_types[stage.channel].address_kind
            if kind != "any" and kind != stage_audience.kind:
                collector.add(
                    f"channel {stage.channel!r} sends to {kind} addresses but audience "
                    f"{stage.audience!r} holds {stage_audience.kind} addresses",
                    (*where, "audience"),
                )
        if stage.at is not None and not first <= stage.at <= last:
            collector.add(
                f"{stage.at:%Y-%m-%d %H:%M} is outside the campaign ({info.start} to {info.end})",
                (*where, "at"),
            )
        for key in ("start", "end"):
            bound = getattr(stage, key)
            if bound is not None and not first <= _as_local_bounds(bound, key == "end") <= last:
                collector.add(
                    f"{bound} is outside the campaign ({info.start} to {info.end})", (*where, key)
                )
        if (
            stage.start is not None
            and stage.end is not None
            and (_as_local_bounds(stage.end, True) < _as_local_bounds(stage.start, False))
        ):
            collector.add("the stage ends before it starts", (*where, "end"))
        if stage.slogans is not None:
            slogan_set = slogan_sets.get(stage.slogans.set)
            if slogan_set is None:
                known = ", ".join(slogan_sets) or "none"
                collector.add(
                    f"unknown slogan set {stage.slogans.set!r} (sets: {known})",
                    (*where, "slogans", "set"),
                )
            else:
                known_ids = {s.id for s in slogan_set.slogans}
                wanted = [stage.slogans.id] if stage.slogans.id else (stage.slogans.ids or [])
                for slogan_id in wanted:
                    if slogan_id not in known_ids:
                        collector.add(
                            f"unknown slogan id {slogan_id!r} in set {slogan_set.name!r}",
                            (*where, "slogans"),
                        )
        if stage_audience is not None and stage_audience.kind == "email" and stage.subject is None:
            collector.add("an e-mail stage needs a 'subject' template", (*where, "subject"))


def _compile_stage(
    campaign: CampaignConfig, index: int, stage: StageConfig, collector: _Collector
) -> StageTemplates:
    where = ("stages", index)
    problems: list[Problem] = []

    def inline(source: str, key: str, kind: str = "text") -> CompiledTemplate | None:
        path = (*collector.prefix, *where, key)
        line = collector.locator.line_of(path) or 1
        try:
            return compile_template(
                source,
                name=str(collector.file),
                kind=kind,  # type: ignore[arg-type]
                first_line=line,
            )
        except ProblemsError as exc:
            # Point at the key in the TOML file; the template's own line is already offset.
            problems.extend(
                Problem(p.message, file=str(collector.file), key=_format_path(path), line=p.line)
                for p in exc.problems
            )
            return None

    def from_file(relative: str, key: str, kind: str = "text") -> CompiledTemplate | None:
        try:
            return load_template_file(campaign.base_dir / relative, kind=kind)  # type: ignore[arg-type]
        except ProblemsError as exc:
            problems.extend(exc.problems)
            return None
        except DispatcherError as exc:
            collector.add(str(exc), (*where, key))
            return None

    if stage.template is not None:
        body = inline(stage.template, "template")
    else:
        assert stage.template_file is not None
        body = from_file(stage.template_file, "template_file")
    subject = inline(stage.subject, "subject") if stage.subject is not None else None
    html = (
        from_file(stage.html_template_file, "html_template_file", "html")
        if stage.html_template_file
        else None
    )
    if problems or body is None:
        raise ProblemsError(problems)
    return StageTemplates(body=body, subject=subject, html=html)
