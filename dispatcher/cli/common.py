"""Helpers shared by the commands: loading config, dates, running coroutines, a console."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from datetime import UTC, date, datetime, time
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import click
from rich.console import Console

from dispatcher.config.loader import Config, load_config
from dispatcher.errors import OperatorError

T = TypeVar("T")

config_argument = click.argument("config", type=click.Path(dir_okay=False, path_type=str))


def load(path: str) -> Config:
    return load_config(path)


def console(stderr: bool = False) -> Console:
    # Not a TTY (CI, a pipe, a log file): no colours or cursor tricks, wide enough for tables.
    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(
        stderr=stderr,
        highlight=False,
        soft_wrap=not tty,
        width=None if tty else 160,
        force_terminal=None if tty else False,
    )


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def parse_when(
    value: str | None, tz: ZoneInfo, *, end: bool = False, option: str = "--from"
) -> datetime | None:
    """A date or date-time given on the command line, in the config's time zone, as UTC."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime.combine(day, time.max if end else time.min, tzinfo=tz)
        else:
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=tz)
    except ValueError as exc:
        raise OperatorError(
            f"{option} {value!r}: expected a date (2010-09-01) or date-time (2010-09-01T10:00)"
        ) from exc
    return moment.astimezone(UTC)
