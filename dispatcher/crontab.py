"""Crontab lines as operators write them, turned into APScheduler 3 `CronTrigger` fields.

APScheduler 3 counts weekdays from Monday (0) and treats a step on a named range loosely, while
crontab counts from Sunday (0 or 7). Passing the field through would fire on the wrong days, so
the weekday field is expanded here into an explicit list of day names.
"""

from __future__ import annotations

from apscheduler.triggers.cron import CronTrigger

_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FIELDS = ("minute", "hour", "day", "month", "day_of_week")


def _day(token: str) -> int:
    token = token.strip().lower()
    if token in _NAMES:
        return _NAMES.index(token)
    if not token.isdigit() or int(token) > 7:
        raise ValueError(
            f"unknown weekday {token!r} (use 0-7, where 0 and 7 are Sunday, or sun..sat)"
        )
    return int(token)


def crontab_weekdays(field: str) -> str:
    """Translate a crontab weekday field (0 or 7 = Sunday) into APScheduler day names."""
    days: set[int] = set()
    for part in field.split(","):
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"bad step {step_text!r} in weekday field {field!r}")
            step = int(step_text)
        if base == "*":
            low, high = 0, 6
        elif "-" in base:
            first, _, last = base.partition("-")
            low, high = _day(first), _day(last)
            if high < low:
                raise ValueError(f"weekday range {base!r} runs backwards")
        else:
            low = _day(base)
            high = 6 if step_text else low  # crontab: "a/n" means from a to the end, every n
        days.update(day % 7 for day in range(low, high + 1, step))
    if len(days) == 7:
        return "*"
    return ",".join(_NAMES[day] for day in sorted(days))


def crontab_fields(expr: str) -> dict[str, str]:
    """The CronTrigger keyword arguments for a five-field crontab line; ValueError if invalid."""
    parts = expr.split()
    if len(parts) != 5:
        raise ValueError(f"expected five fields (minute hour day month weekday), got {len(parts)}")
    fields = dict(zip(_FIELDS, parts, strict=True))
    fields["day_of_week"] = crontab_weekdays(fields["day_of_week"])
    CronTrigger(**fields, timezone="UTC")  # APScheduler validates the other fields
    return fields
