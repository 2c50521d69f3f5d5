"""The plan: stages to triggers to firings, and the daily send window (pure functions, no I/O)."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.config.models import CampaignConfig, SendWindow, StageConfig
from dispatcher.plan import (
    firing_at,
    in_window,
    iter_firings,
    latest_firing,
    next_window_opening,
    stage_bounds,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")


def campaign(
    *stages: dict[str, Any], start: str = "2010-09-01", end: str = "2010-09-30"
) -> CampaignConfig:
    """A Quality Month campaign in Asia/Shanghai holding `stages` (schedule keys only)."""
    return CampaignConfig.model_validate(
        {
            "campaign": {
                "id": "qm",
                "name": "质量月",
                "timezone": "Asia/Shanghai",
                "start": start,
                "end": end,
            },
            "audiences": {"public": {"file": "public.csv", "address_column": "手机"}},
            "stages": [
                {
                    "id": f"s{i}",
                    "channel": "sms",
                    "audience": "public",
                    "template": "质量月",
                    **stage,
                }
                for i, stage in enumerate(stages)
            ],
        }
    )


def local_firings(camp: CampaignConfig, stage: StageConfig | None = None) -> list[datetime]:
    return [
        f.at.astimezone(SHANGHAI).replace(tzinfo=None)
        for f in iter_firings(camp, stage or camp.stages[0])
    ]


def weekdays(cron_weekday: str) -> list[str]:
    """The weekday names a crontab weekday field fires on, over the first two weeks of September 2010."""
    camp = campaign({"cron": f"0 10 * * {cron_weekday}"}, end="2010-09-14")
    return [moment.strftime("%a") for moment in local_firings(camp)]


# -- cron: crontab's weekday numbers (0 or 7 = Sunday, 1 = Monday) ------------------------------


def test_crontab_weekday_numbers_count_from_sunday() -> None:
    # APScheduler counts Monday as 0; a crontab line counts Sunday as 0. 2010-09-06 is a Monday.
    assert weekdays("1") == ["Mon", "Mon"]
    assert local_firings(campaign({"cron": "0 10 * * 1"}, end="2010-09-14"))[0] == datetime(
        2010, 9, 6, 10
    )
    assert weekdays("0") == ["Sun", "Sun"]
    assert weekdays("6") == ["Sat", "Sat"]
    assert weekdays("5,0") == ["Fri", "Sun", "Fri", "Sun"]


def test_seven_is_sunday_too() -> None:
    assert weekdays("7") == ["Sun", "Sun"]


def test_the_quality_month_slogans_go_out_on_mondays_and_thursdays() -> None:
    camp = campaign({"cron": "0 10 * * 1,4"})
    assert local_firings(camp) == [
        datetime(2010, 9, d, 10) for d in (2, 6, 9, 13, 16, 20, 23, 27, 30)
    ]


def test_weekday_ranges_and_names() -> None:
    assert weekdays("1-5") == ["Wed", "Thu", "Fri", "Mon", "Tue", "Wed", "Thu", "Fri", "Mon", "Tue"]
    assert weekdays("mon-fri") == weekdays("1-5")
    assert weekdays("sun") == weekdays("0")
    assert weekdays("2-4") == ["Wed", "Thu", "Tue", "Wed", "Thu", "Tue"]


def test_a_stepped_weekday_range() -> None:
    assert weekdays("1-5/2") == ["Wed", "Fri", "Mon", "Wed", "Fri", "Mon"]


def test_a_weekday_step_counts_from_sunday() -> None:
    assert weekdays("*/2") == ["Thu", "Sat", "Sun", "Tue", "Thu", "Sat", "Sun", "Tue"]


def test_a_weekday_range_starting_on_sunday() -> None:
    assert weekdays("0-3") == ["Wed", "Sun", "Mon", "Tue", "Wed", "Sun", "Mon", "Tue"]


def test_cron_fires_only_within_the_stage_dates() -> None:
    camp = campaign({"cron": "30 9 * * *", "start": "2010-09-10", "end": "2010-09-12"})
    assert local_firings(camp) == [datetime(2010, 9, d, 9, 30) for d in (10, 11, 12)]


def test_cron_fires_only_within_the_campaign_dates_when_the_stage_has_none() -> None:
    camp = campaign({"cron": "0 0,23 * * *"}, start="2010-09-01", end="2010-09-02")
    # The end date is inclusive up to its last minute: 23:00 on the last day still fires.
    assert local_firings(camp) == [
        datetime(2010, 9, 1, 0),
        datetime(2010, 9, 1, 23),
        datetime(2010, 9, 2, 0),
        datetime(2010, 9, 2, 23),
    ]


# -- at and every ---------------------------------------------------------------------------------


def test_a_one_shot_stage_fires_once_at_its_local_time() -> None:
    camp = campaign({"at": "2010-09-01T09:00:00"})
    [firing] = list(iter_firings(camp, camp.stages[0]))
    assert firing.at == datetime(2010, 9, 1, 1, 0, tzinfo=UTC)  # 09:00 in Shanghai (UTC+8)
    assert firing.at.tzinfo is not None and firing.index == 0
    assert (firing.campaign, firing.stage) == ("qm", "s0")


def test_an_interval_stage_fires_from_its_start_to_its_end() -> None:
    camp = campaign({"every": "6h", "start": "2010-09-10T08:00:00", "end": "2010-09-11T12:00:00"})
    expected = [
        datetime(2010, 9, 10, 8),
        datetime(2010, 9, 10, 14),
        datetime(2010, 9, 10, 20),
        datetime(2010, 9, 11, 2),
        datetime(2010, 9, 11, 8),
    ]
    assert local_firings(camp) == expected


def test_firings_are_indexed_in_time_order() -> None:
    camp = campaign({"every": "1d"})
    fired = list(iter_firings(camp, camp.stages[0]))
    assert len(fired) == 30
    assert [f.index for f in fired] == list(range(30))
    assert all(b.at - a.at == timedelta(days=1) for a, b in itertools.pairwise(fired))
    start, end = stage_bounds(camp, camp.stages[0])
    assert all(start <= f.at <= end for f in fired)


def test_latest_firing_and_firing_at() -> None:
    camp = campaign({"cron": "0 10 * * 1,4"})
    stage = camp.stages[0]
    monday = datetime(2010, 9, 6, 10, tzinfo=SHANGHAI)
    latest = latest_firing(camp, stage, monday + timedelta(hours=5))
    assert latest is not None and latest.at == monday and latest.index == 1
    assert latest_firing(camp, stage, monday - timedelta(seconds=1)).index == 0  # type: ignore[union-attr]
    assert latest_firing(camp, stage, datetime(2010, 9, 1, tzinfo=SHANGHAI)) is None
    assert firing_at(camp, stage, monday) == latest
    assert firing_at(camp, stage, monday + timedelta(minutes=1)) is None


# -- the send window -----------------------------------------------------------------------------


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2010, 9, day, hour, minute, tzinfo=SHANGHAI)


DAY = SendWindow(start=time(8, 0), end=time(21, 0))
NIGHT = SendWindow(start=time(22, 0), end=time(6, 0))  # across midnight


def test_in_window_includes_the_start_and_excludes_the_end() -> None:
    assert in_window(DAY, SHANGHAI, at(1, 8))
    assert in_window(DAY, SHANGHAI, at(1, 20, 59))
    assert not in_window(DAY, SHANGHAI, at(1, 21))
    assert not in_window(DAY, SHANGHAI, at(1, 7, 59))
    # The same instant given in UTC: the window is local to the campaign.
    assert in_window(DAY, SHANGHAI, datetime(2010, 9, 1, 0, 0, tzinfo=UTC))  # 08:00 local
    assert not in_window(DAY, SHANGHAI, datetime(2010, 9, 1, 13, 0, tzinfo=UTC))  # 21:00 local


def test_a_window_across_midnight() -> None:
    assert in_window(NIGHT, SHANGHAI, at(1, 23))
    assert in_window(NIGHT, SHANGHAI, at(2, 5, 59))
    assert in_window(NIGHT, SHANGHAI, at(1, 22))
    assert not in_window(NIGHT, SHANGHAI, at(2, 6))
    assert not in_window(NIGHT, SHANGHAI, at(2, 12))
    assert next_window_opening(NIGHT, SHANGHAI, at(2, 6)) == at(2, 22)
    assert next_window_opening(NIGHT, SHANGHAI, at(2, 3)) == at(2, 3)


def test_next_window_opening() -> None:
    assert next_window_opening(DAY, SHANGHAI, at(1, 6)) == at(1, 8)
    assert next_window_opening(DAY, SHANGHAI, at(1, 21)) == at(2, 8)
    assert next_window_opening(DAY, SHANGHAI, at(1, 23, 30)) == at(2, 8)
    assert next_window_opening(DAY, SHANGHAI, at(1, 12)) == at(1, 12)
    # Asia/Shanghai has no daylight saving time: 08:00 is 00:00 UTC every day of the year.
    for day in (date(2010, 1, 15), date(2010, 3, 28), date(2010, 7, 1), date(2010, 10, 31)):
        evening = datetime.combine(day, time(22, 0), tzinfo=SHANGHAI)
        opening = next_window_opening(DAY, SHANGHAI, evening)
        assert opening.tzinfo is not None
        assert opening.astimezone(UTC) == datetime.combine(
            day + timedelta(days=1), time(0, 0), tzinfo=UTC
        )


@given(
    moment=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
    ),
    start=st.times(),
    end=st.times(),
)
def test_the_next_opening_is_in_the_window_and_nothing_before_it_is(
    moment: datetime, start: time, end: time
) -> None:
    if start == end:
        return
    window = SendWindow(start=start, end=end)
    opening = next_window_opening(window, SHANGHAI, moment)
    assert opening >= moment
    assert in_window(window, SHANGHAI, opening)
    assert opening - moment < timedelta(days=1)
    if opening > moment:  # the instant just before the opening is outside the window
        assert not in_window(window, SHANGHAI, opening - timedelta(microseconds=1))


@pytest.mark.parametrize(
    ("field", "names"),
    [
        ("*", "*"),
        ("0", "sun"),
        ("7", "sun"),
        ("1,4", "mon,thu"),
        ("5-7", "sun,fri,sat"),
        ("*/3", "sun,wed,sat"),
        ("2/2", "tue,thu,sat"),
        ("mon-fri", "mon,tue,wed,thu,fri"),
    ],
)
def test_crontab_weekday_translation(field: str, names: str) -> None:
    from dispatcher.crontab import crontab_weekdays

    assert crontab_weekdays(field) == names


@pytest.mark.parametrize("field", ["8", "5-2", "*/0", "funday", "1-"])
def test_bad_crontab_weekdays(field: str) -> None:
    from dispatcher.crontab import crontab_weekdays

    with pytest.raises(ValueError):
        crontab_weekdays(field)
