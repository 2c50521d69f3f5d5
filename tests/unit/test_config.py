"""Config validation: every kind of mistake gives one located problem (file, key, line)."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from dispatcher.config import load_config
from dispatcher.config.durations import parse_duration
from dispatcher.config.locate import KeyLocator
from dispatcher.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

MAIN = """\
[dispatcher]
database = "sqlite:///var/test.db"
timezone = "Asia/Shanghai"
campaigns = ["campaigns/*.toml"]

[channels.sms]
type = "simulator"
rate = 10

[channels.email]
type = "simulator"
rate = 5
"""

CAMPAIGN = """\
[campaign]
id = "qm"
name = "Quality Month"
start = 2010-08-31
end = 2010-09-30
send_window = { start = "08:00", end = "21:00" }

[audiences.public]
file = "people.csv"
address_column = "phone"

[[stages]]
id = "blast"
channel = "sms"
audience = "public"
at = 2010-08-31T09:00:00
template = "{{ name }}: {{ slogan }}"
slogans = { set = "quality-month-2010", id = "qm2010-01" }

[[stages]]
id = "weekly"
channel = "sms"
audience = "public"
cron = "0 10 * * 1"
template = "hello {{ name }}"
"""


def make_config(tmp_path: Path, main: str = MAIN, campaign: str = CAMPAIGN) -> Path:
    (tmp_path / "campaigns").mkdir(exist_ok=True)
    (tmp_path / "campaigns" / "qm.toml").write_text(campaign, encoding="utf-8")
    (tmp_path / "campaigns" / "people.csv").write_text(
        "name,phone\n张三,13800138000\n李四,13900139000\n", encoding="utf-8"
    )
    shutil.copytree(REPO / "slogans", tmp_path / "slogans", dirs_exist_ok=True)
    (tmp_path / "main.toml").write_text(main, encoding="utf-8")
    return tmp_path / "main.toml"


def problems_of(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return [str(p) for p in info.value.problems]


def test_valid_config_loads(tmp_path: Path) -> None:
    config = load_config(make_config(tmp_path), env={})
    assert [c.id for c in config.campaigns] == ["qm"]
    assert config.database_url == f"sqlite:///{(tmp_path / 'var/test.db').resolve()}"
    assert set(config.channel_settings) == {"sms", "email"}
    assert ("qm", "blast") in config.templates


def test_the_example_config_loads() -> None:
    config = load_config(REPO / "config.example.toml", env={})
    assert config.campaign("quality-month-2010") is not None


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = make_config(tmp_path, main=MAIN + "\n[channels.bad\nrate = 1\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:14:")
    assert "TOML syntax error" in problem


def test_toml_syntax_error_in_campaign_file(tmp_path: Path) -> None:
    path = make_config(tmp_path, campaign=CAMPAIGN.replace('name = "Quality Month"', "name = "))
    (problem,) = problems_of(path)
    assert "qm.toml:3:" in problem


def test_unknown_key_names_key_and_line(tmp_path: Path) -> None:
    path = make_config(tmp_path, main=MAIN.replace("rate = 10", "rate = 10\nrat = 3"))
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:9: channels.sms.rat: unknown key")


def test_unknown_key_in_campaign(tmp_path: Path) -> None:
    path = make_config(
        tmp_path, campaign=CAMPAIGN.replace('id = "weekly"', 'id = "weekly"\nchanel = "sms"')
    )
    problems = problems_of(path)
    assert any("qm.toml:22: stages[1].chanel: unknown key" in p for p in problems), problems


def test_wrong_type(tmp_path: Path) -> None:
    path = make_config(tmp_path, main=MAIN.replace("rate = 10", 'rate = "fast"'))
    (problem,) = problems_of(path)
    assert f"{path}:8: channels.sms.rate:" in problem
    assert "number" in problem


def test_stage_outside_campaign_dates(tmp_path: Path) -> None:
    path = make_config(
        tmp_path, campaign=CAMPAIGN.replace("at = 2010-08-31T09:00:00", "at = 2010-10-01T09:00:00")
    )
    (problem,) = problems_of(path)
    assert "qm.toml:16: stages[0].at: 2010-10-01 09:00 is outside the campaign" in problem


def test_stage_start_outside_campaign(tmp_path: Path) -> None:
    path = make_config(
        tmp_path,
        campaign=CAMPAIGN.replace('cron = "0 10 * * 1"', 'cron = "0 10 * * 1"\nstart = 2010-08-01'),
    )
    (problem,) = problems_of(path)
    assert "stages[1].start" in problem and "outside the campaign" in problem


def test_unknown_channel(tmp_path: Path) -> None:
    path = make_config(
        tmp_path,
        campaign=CAMPAIGN.replace(
            'channel = "sms"\naudience = "public"\nat', 'channel = "fax"\naudience = "public"\nat'
        ),
    )
    (problem,) = problems_of(path)
    assert "qm.toml:14: stages[0].channel: unknown channel 'fax' (channels: sms, email)" in problem


def test_unknown_audience(tmp_path: Path) -> None:
    path = make_config(
        tmp_path,
        campaign=CAMPAIGN.replace('cron = "0 10', 'audience = "x"\ncron = "0 10', 1).replace(
            'audience = "public"\naudience = "x"', 'audience = "x"'
        ),
    )
    (problem,) = problems_of(path)
    assert "stages[1].audience: unknown audience 'x' (audiences: public)" in problem


def test_unknown_slogan_set_and_id(tmp_path: Path) -> None:
    path = make_config(
        tmp_path, campaign=CAMPAIGN.replace('set = "quality-month-2010"', 'set = "qm-2011"')
    )
    (problem,) = problems_of(path)
    assert "stages[0].slogans.set: unknown slogan set 'qm-2011'" in problem
    path = make_config(tmp_path, campaign=CAMPAIGN.replace('id = "qm2010-01"', 'id = "qm2010-99"'))
    (problem,) = problems_of(path)
    assert "unknown slogan id 'qm2010-99'" in problem


def test_bad_cron_expression(tmp_path: Path) -> None:
    path = make_config(
        tmp_path, campaign=CAMPAIGN.replace('cron = "0 10 * * 1"', 'cron = "0 25 * * 1"')
    )
    (problem,) = problems_of(path)
    assert "qm.toml:24: stages[1].cron: bad cron expression '0 25 * * 1'" in problem


def test_empty_send_window(tmp_path: Path) -> None:
    path = make_config(tmp_path, campaign=CAMPAIGN.replace('end = "21:00"', 'end = "08:00"'))
    (problem,) = problems_of(path)
    assert "qm.toml:6: campaign.send_window: the send window is empty" in problem


def test_two_schedules(tmp_path: Path) -> None:
    path = make_config(
        tmp_path,
        campaign=CAMPAIGN.replace('cron = "0 10 * * 1"', 'cron = "0 10 * * 1"\nevery = "1d"'),
    )
    (problem,) = problems_of(path)
    assert "exactly one of 'at', 'cron' or 'every' (found: cron, every)" in problem


def test_missing_secret_names_the_variable(tmp_path: Path) -> None:
    main = (
        MAIN
        + '\n[channels.tw]\ntype = "twilio"\naccount_sid = "${TW_SID}"\nauth_token = "${TW_TOKEN}"\nfrom = "+15005550006"\n'
    )
    path = make_config(tmp_path, main=main)
    problems = problems_of(path, env={"TW_SID": "AC" + "0" * 32})
    assert any(
        "channels.tw.auth_token: environment variable TW_TOKEN is not set" in p for p in problems
    ), problems
    config = load_config(path, env={"TW_SID": "AC" + "0" * 32, "TW_TOKEN": "secret"})
    assert "tw" in config.channel_settings


def test_unknown_channel_type(tmp_path: Path) -> None:
    path = make_config(
        tmp_path,
        main=MAIN.replace('type = "simulator"\nrate = 10', 'type = "carrier-pigeon"\nrate = 10'),
    )
    problems = problems_of(path)
    assert any("channels.sms.type: unknown channel type 'carrier-pigeon'" in p for p in problems), (
        problems
    )


def test_bad_channel_settings_are_validated_by_the_adapter(tmp_path: Path) -> None:
    path = make_config(
        tmp_path, main=MAIN.replace("rate = 5", "rate = 5\nfailure_rates = { x = 2.0 }")
    )
    problems = problems_of(path)
    assert any("channels.email" in p and "failure_rates" in p for p in problems), problems


def test_duplicate_stage_id(tmp_path: Path) -> None:
    path = make_config(tmp_path, campaign=CAMPAIGN.replace('id = "weekly"', 'id = "blast"'))
    (problem,) = problems_of(path)
    assert "stage id 'blast' is used twice" in problem


def test_template_syntax_error_points_into_the_toml(tmp_path: Path) -> None:
    path = make_config(
        tmp_path,
        campaign=CAMPAIGN.replace('template = "hello {{ name }}"', 'template = "hello {{ name }"'),
    )
    (problem,) = problems_of(path)
    assert "qm.toml:25: stages[1].template: template syntax error" in problem


def test_missing_template_file(tmp_path: Path) -> None:
    path = make_config(
        tmp_path,
        campaign=CAMPAIGN.replace('template = "hello {{ name }}"', 'template_file = "nope.j2"'),
    )
    (problem,) = problems_of(path)
    assert "nope.j2" in problem


def test_missing_audience_file(tmp_path: Path) -> None:
    path = make_config(
        tmp_path, campaign=CAMPAIGN.replace('file = "people.csv"', 'file = "gone.csv"')
    )
    (problem,) = problems_of(path)
    assert "qm.toml:9: audiences.public.file: audience file gone.csv not found" in problem


def test_email_channel_on_phone_audience_is_fine_for_any_simulator(tmp_path: Path) -> None:
    # The simulator accepts any address kind; a real e-mail adapter would not.
    load_config(make_config(tmp_path), env={})


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    campaign = CAMPAIGN.replace('id = "blast"', 'id = "blast"\nwhen = "now"')
    campaign = campaign.replace('cron = "0 10 * * 1"', 'cron = "nonsense"')
    problems = problems_of(make_config(tmp_path, campaign=campaign))
    assert len(problems) == 2


def test_database_env_override(tmp_path: Path) -> None:
    config = load_config(
        make_config(tmp_path), env={"DISPATCHER_DATABASE_URL": "postgresql://u:p@127.0.0.1/db"}
    )
    assert config.database_url == "postgresql://u:p@127.0.0.1/db"


def test_find_stage(tmp_path: Path) -> None:
    config = load_config(make_config(tmp_path), env={})
    assert config.find_stage("qm/blast")[1].id == "blast"
    assert config.find_stage("weekly")[1].id == "weekly"
    with pytest.raises(ConfigError, match="no stage 'nope'"):
        config.find_stage("nope")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("2h", 7200),
        ("3d", 259200),
        ("1h30m", 5400),
        (45, 45),
        ("250ms", 0.25),
    ],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "soon", "10x", "1h 2", "-5s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_locator_follows_arrays_of_tables_and_inline_tables() -> None:
    text = textwrap.dedent("""\
        [campaign]
        id = "x"
        send_window = { start = "08:00", end = "21:00" }

        [[stages]]
        id = "a"

        [[stages]]
        id = "b"
        note = '''
        id = "not a key"
        '''
        cron = "* * * * *"
        """)
    locator = KeyLocator(text)
    assert locator.line_of(("campaign", "send_window", "end")) == 3
    assert locator.line_of(("stages", 1, "id")) == 9
    assert locator.line_of(("stages", 1, "cron")) == 13
    assert locator.line_of(("stages", 1, "missing")) == 8
