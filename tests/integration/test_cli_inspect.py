"""`check`, `plan` and `preview` as an operator runs them: real subprocesses, exit codes, output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def dispatcher(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def copy_example(tmp_path: Path) -> Path:
    for name in ("campaigns", "slogans"):
        shutil.copytree(REPO / name, tmp_path / name)
    shutil.copy(REPO / "config.example.toml", tmp_path / "config.toml")
    return tmp_path / "config.toml"


def test_check_the_quality_month_campaign() -> None:
    result = dispatcher("check", "config.example.toml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "quality-month-2010" in result.stdout
    # Audience counts: 66 rows, 58 valid, 5 invalid, 3 duplicates (see the sample CSV).
    assert "66" in result.stdout and "58" in result.stdout
    assert "landline, not a mobile number" in result.stdout
    assert "13800138000" not in result.stdout  # nothing unmasked


def test_check_reports_every_problem_and_exits_2(tmp_path: Path) -> None:
    config = copy_example(tmp_path)
    campaign = tmp_path / "campaigns" / "quality-month-2010.toml"
    text = campaign.read_text(encoding="utf-8")
    text = text.replace('cron = "0 10 * * 1,4"', 'cron = "0 10 * * 8"').replace(
        "rate = 50", "rate = 50"
    )
    campaign.write_text(text, encoding="utf-8")
    result = dispatcher("check", str(config))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        "quality-month-2010.toml:" in result.stderr
        and "stages[3].cron: bad cron expression" in result.stderr
    )


def test_check_enforces_max_segments(tmp_path: Path) -> None:
    config = copy_example(tmp_path)
    campaign = tmp_path / "campaigns" / "quality-month-2010.toml"
    text = campaign.read_text(encoding="utf-8").replace(
        'template = "质量月宣传口号：{{ slogan }}"',
        'template = "质量月宣传口号：{{ slogan }}{{ slogan }}{{ slogan }}"',
    )
    campaign.write_text(text, encoding="utf-8")
    result = dispatcher("check", str(config))
    assert result.returncode == 2
    assert (
        "stages[3].max_segments" in result.stderr and "more than max_segments = 1" in result.stderr
    )


def test_check_reports_undefined_template_variable(tmp_path: Path) -> None:
    config = copy_example(tmp_path)
    campaign = tmp_path / "campaigns" / "quality-month-2010.toml"
    text = campaign.read_text(encoding="utf-8").replace("{{ city }}“质量月”", "{{ town }}“质量月”")
    campaign.write_text(text, encoding="utf-8")
    result = dispatcher("check", str(config))
    assert result.returncode == 2
    assert "undefined variable 'town'" in result.stderr


def test_check_sandbox_escape_is_an_error_not_a_crash(tmp_path: Path) -> None:
    config = copy_example(tmp_path)
    campaign = tmp_path / "campaigns" / "quality-month-2010.toml"
    text = campaign.read_text(encoding="utf-8").replace(
        'template = "质量月宣传口号：{{ slogan }}"',
        "template = \"{{ ''.__class__.__mro__[1].__subclasses__() }}\"",
    )
    campaign.write_text(text, encoding="utf-8")
    result = dispatcher("check", str(config))
    assert result.returncode == 2
    assert "outside the sandbox" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_missing_file() -> None:
    result = dispatcher("check", "no-such.toml")
    assert result.returncode == 2
    assert "no-such.toml: file not found" in result.stderr


def test_plan_lists_every_firing_in_order() -> None:
    result = dispatcher("plan", "config.example.toml", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 13
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    blast = next(r for r in rows if r["stage"] == "opening-blast")
    assert blast["time"] == "2010-08-31T09:00:00+08:00"
    assert blast["recipients"] == 58 and blast["segments_total"] == 58
    assert blast["estimated_cost"] == "2.90" and blast["currency"] == "CNY"
    slogans = [r["slogan"] for r in rows if r["stage"] == "slogans"]
    assert len(slogans) == 9 and len(set(slogans)) == 9  # shuffled without repeats


def test_plan_from_to() -> None:
    result = dispatcher(
        "plan", "config.example.toml", "--json", "--from", "2010-09-06", "--to", "2010-09-13"
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["time"][:10] for r in rows] == ["2010-09-06", "2010-09-09", "2010-09-13"]
    bad = dispatcher("plan", "config.example.toml", "--from", "soon")
    assert bad.returncode == 2 and "--from 'soon'" in bad.stderr


def test_plan_table() -> None:
    result = dispatcher("plan", "config.example.toml")
    assert result.returncode == 0
    assert "13 firings, 658 messages" in result.stdout


def test_preview_masks_numbers_and_counts_segments() -> None:
    result = dispatcher(
        "preview", "config.example.toml", "--stage", "opening-blast", "--limit", "2"
    )
    assert result.returncode == 0, result.stderr
    assert "+86135****7743" in result.stdout
    assert "UCS-2, 1 segment(s)" in result.stdout
    assert "【国家质检总局】" in result.stdout and "回T退订" in result.stdout
    assert "抓质量水平提升　促发展方式转变" in result.stdout


def test_preview_unknown_stage() -> None:
    result = dispatcher("preview", "config.example.toml", "--stage", "nope")
    assert result.returncode == 2
    assert "no stage 'nope'" in result.stderr
