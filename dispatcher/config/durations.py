"""Durations as operators write them in TOML: "90s", "15m", "2h", "3d", "1h30m"."""

from __future__ import annotations

import re
from datetime import timedelta

_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str | int | float) -> timedelta:
    """Parse "2h", "1h30m", "45s" or a number of seconds into a timedelta; ValueError otherwise."""
    # TOML hands over whatever the operator wrote (a date, a table, a boolean): anything that is
    # not a string or a number is a ValueError, so pydantic reports it against its key.
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError("expected a duration such as '30s', '15m', '2h' or '3d'")
    if isinstance(text, int | float):
        if text != text:  # NaN
            raise ValueError("expected a duration such as '30s', '15m', '2h' or '3d'")
        if text < 0:
            raise ValueError("a duration cannot be negative")
        return _seconds(text, text)
    compact = text.strip().lower().replace(" ", "")
    pos = 0
    seconds = 0.0
    for match in _PART.finditer(compact):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not compact or pos != len(compact):
        raise ValueError(
            f"{text!r} is not a duration: write e.g. '30s', '15m', '2h', '3d' or '1h30m'"
        )
    return _seconds(seconds, text)


def _seconds(seconds: float, text: str | int | float) -> timedelta:
    try:
        return timedelta(seconds=seconds)
    except OverflowError:  # more than timedelta's 999999999 days (or infinite)
        raise ValueError(f"{text!r} is too long a duration") from None


def format_duration(delta: timedelta) -> str:
    """Render a timedelta compactly ("1d2h", "15m", "0s") for summaries."""
    total = int(delta.total_seconds())
    if total == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, total = divmod(total, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)
