"""Slogan sets: the seed's annex as data, loading errors, and rotation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher.errors import ConfigError, Problem
from dispatcher.slogans import (
    Slogan,
    SloganOrder,
    SloganSet,
    load_slogan_file,
    load_slogan_sets,
    pick_slogan,
)

REPO = Path(__file__).resolve().parents[2]
SLOGANS = REPO / "slogans"
SEED_NAME = "000_24e59343c5fd224e.txt"
THEME = "抓质量水平提升\u3000促发展方式转变"


def _seed_path() -> Path:
    """The seed document: $DISPATCHER_SEED, else shared/seeds beside the repository."""
    candidates = [
        Path(os.environ.get("DISPATCHER_SEED", "")),
        REPO.parent / "shared" / "seeds" / SEED_NAME,
        Path("/work/shared/seeds") / SEED_NAME,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    pytest.skip(f"seed document {SEED_NAME} not found (set DISPATCHER_SEED)")


def _seed_annex() -> tuple[str, list[str]]:
    """Return the annex's title and its slogans, parsed from the seed document."""
    text = _seed_path().read_text(encoding="utf-8")
    annex = text[text.rindex("附件：") + len("附件：") :]
    # Paragraphs are indented with ideographic spaces; the theme also has one inside.
    lines = [line.strip() for line in annex.splitlines() if line.strip()]
    return lines[0], lines[1:]


@pytest.fixture(scope="module")
def quality_month() -> SloganSet:
    return load_slogan_sets(SLOGANS)["quality-month-2010"]


def test_the_quality_month_set_is_the_seed_annex_verbatim(quality_month: SloganSet) -> None:
    title, texts = _seed_annex()
    assert len(texts) == 21
    assert quality_month.title == title == "2010年全国“质量月”活动宣传口号"
    assert [slogan.text for slogan in quality_month.slogans] == texts


def test_the_theme_comes_first_with_its_ideographic_space(quality_month: SloganSet) -> None:
    assert quality_month.theme == Slogan("qm2010-01", THEME, "quality-month-2010")
    assert quality_month.slogans[0] == quality_month.theme
    assert quality_month.source == "国质检质联〔2010〕351号 附件"


def test_ids_are_stable_and_numbered_in_annex_order(quality_month: SloganSet) -> None:
    assert quality_month.ids == tuple(f"qm2010-{n:02d}" for n in range(1, 22))
    assert quality_month.get("qm2010-21").text == "树立质量法制观念，提高全民质量意识"
    assert {slogan.set for slogan in quality_month.slogans} == {"quality-month-2010"}


def test_unknown_id_names_the_id_and_the_set(quality_month: SloganSet) -> None:
    with pytest.raises(ConfigError) as caught:
        quality_month.get("qm2010-22")
    assert "'qm2010-22'" in str(caught.value)
    assert "'quality-month-2010'" in str(caught.value)


def _picks(
    slogan_set: SloganSet,
    count: int,
    *,
    order: SloganOrder,
    seed: int,
    ids: list[str] | None = None,
) -> list[str]:
    return [
        pick_slogan(slogan_set, order=order, seed=seed, firing_index=index, ids=ids).id
        for index in range(count)
    ]


def test_in_order_cycles_through_the_set(quality_month: SloganSet) -> None:
    picks = _picks(quality_month, 44, order="in_order", seed=0)
    assert picks[:21] == list(quality_month.ids)
    assert picks[21:42] == list(quality_month.ids)
    assert picks[42:] == ["qm2010-01", "qm2010-02"]


def test_in_order_cycles_through_a_subset_in_the_order_given(quality_month: SloganSet) -> None:
    ids = ["qm2010-05", "qm2010-01", "qm2010-12"]
    assert _picks(quality_month, 7, order="in_order", seed=0, ids=ids) == [*ids, *ids, ids[0]]


def test_shuffled_uses_every_slogan_once_per_cycle(quality_month: SloganSet) -> None:
    picks = _picks(quality_month, 21 * 4, order="shuffled", seed=2010)
    cycles = [picks[start : start + 21] for start in range(0, len(picks), 21)]
    for cycle in cycles:
        assert sorted(cycle) == list(quality_month.ids)
    assert cycles[0] != list(quality_month.ids)
    assert len({tuple(cycle) for cycle in cycles}) == 4


def test_shuffled_is_deterministic_and_depends_on_the_seed(quality_month: SloganSet) -> None:
    first = _picks(quality_month, 42, order="shuffled", seed=7)
    assert _picks(quality_month, 42, order="shuffled", seed=7) == first
    assert _picks(quality_month, 42, order="shuffled", seed=8) != first
    # One firing alone gives the same answer as the whole sequence: a pure function.
    assert pick_slogan(quality_month, order="shuffled", seed=7, firing_index=30).id == first[30]


def test_shuffled_is_the_same_in_another_process_with_other_hash_seeds(
    quality_month: SloganSet,
) -> None:
    script = (
        "import json, pathlib\n"
        "from dispatcher.slogans import load_slogan_sets, pick_slogan\n"
        f"s = load_slogan_sets(pathlib.Path({str(SLOGANS)!r}))['quality-month-2010']\n"
        "print(json.dumps([pick_slogan(s, order='shuffled', seed=7, firing_index=i).id"
        " for i in range(42)]))\n"
    )
    expected = _picks(quality_month, 42, order="shuffled", seed=7)
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert json.loads(out) == expected


def test_shuffled_subset_stays_within_the_subset(quality_month: SloganSet) -> None:
    ids = ["qm2010-02", "qm2010-03", "qm2010-04", "qm2010-05"]
    picks = _picks(quality_month, 8, order="shuffled", seed=1, ids=ids)
    assert sorted(picks[:4]) == sorted(picks[4:]) == ids


def test_rotation_over_unknown_or_no_ids_is_a_config_error(quality_month: SloganSet) -> None:
    with pytest.raises(ConfigError, match="qm2010-99"):
        pick_slogan(quality_month, order="in_order", seed=0, firing_index=0, ids=["qm2010-99"])
    with pytest.raises(ConfigError, match="no slogans"):
        pick_slogan(quality_month, order="in_order", seed=0, firing_index=0, ids=[])


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD = """\
name = "safety"
title = "安全口号"

[[slogans]]
id = "s-1"
text = "重视质量安全，促进社会和谐"

[[slogans]]
id = "s-2"
text = "关注民生，重视质量"
"""


def problems_of(directory: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        load_slogan_sets(directory)
    return caught.value.problems


def test_a_set_without_theme_flag_leads_with_its_first_slogan(tmp_path: Path) -> None:
    write(tmp_path, "safety.toml", GOOD)
    write(tmp_path, "notes.txt", "not a slogan set")
    sets = load_slogan_sets(tmp_path)
    assert list(sets) == ["safety"]
    assert sets["safety"].theme.id == "s-1"
    assert sets["safety"].source is None


def test_toml_syntax_error_gives_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.toml", 'name = "x"\ntitle = \n')
    [problem] = problems_of(tmp_path)
    assert (problem.file, problem.line, problem.column) == (str(path), 2, 9)
    assert problem.message.startswith("invalid TOML: ")
    assert "(at line" not in problem.message


def test_toml_error_at_end_of_document_gives_the_last_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.toml", 'name = "x"\ntitle = "unterminated\n')
    [problem] = problems_of(tmp_path)
    assert (problem.file, problem.line) == (str(path), 2)


def test_duplicate_ids_name_the_second_occurrence(tmp_path: Path) -> None:
    path = write(tmp_path, "dup.toml", GOOD + '\n[[slogans]]\nid = "s-1"\ntext = "又一条"\n')
    [problem] = problems_of(tmp_path)
    assert (problem.file, problem.key) == (str(path), "slogans[2].id")
    assert "duplicate slogan id 's-1'" in problem.message
    assert "slogans[0].id" in problem.message


def test_empty_and_missing_keys_are_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "holes.toml",
        'title = "t"\n\n[[slogans]]\nid = "a"\ntext = "　 "\n\n[[slogans]]\ntext = "x"\n'
        '\n[[slogans]]\nid = "c"\n',
    )
    problems = problems_of(tmp_path)
    assert {(p.file, p.key) for p in problems} == {
        (str(path), "name"),
        (str(path), "slogans[0].text"),
        (str(path), "slogans[1].id"),
        (str(path), "slogans[2].text"),
    }
    assert str(problems[0]) == f"{path}: name: missing key"
    assert "must not be empty" in str(problems[1])


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ('name = "x"\ntitle = "t"\n', "slogans", "missing key"),
        ('name = "x"\ntitle = "t"\nslogans = []\n', "slogans", "at least one"),
        ('name = "x"\ntitle = "t"\nslogans = ["a"]\n', "slogans", "array of tables"),
        ('name = 3\ntitle = "t"\n[[slogans]]\nid="a"\ntext="b"\n', "name", "a number"),
        ('name = "x"\ntitle = "t"\n[[slogans]]\nid="a"\ntxt="b"\n', "slogans[0].txt", "unknown"),
        ('name = "x"\ntitel = "t"\n[[slogans]]\nid="a"\ntext="b"\n', "titel", "unknown key"),
        (
            'name = "x"\ntitle = "t"\n[[slogans]]\nid="a"\ntext="b"\ntheme="yes"\n',
            "slogans[0].theme",
            "true or false",
        ),
        (
            'name = "x"\ntitle = "t"\nsource = 1\n[[slogans]]\nid="a"\ntext="b"\n',
            "source",
            "a string",
        ),
    ],
)
def test_bad_slogan_files(tmp_path: Path, text: str, key: str, message: str) -> None:
    path = write(tmp_path, "bad.toml", text)
    problems = problems_of(tmp_path)
    assert [(p.file, p.key) for p in problems if p.key == key] == [(str(path), key)]
    assert any(message in p.message for p in problems if p.key == key)


def test_only_one_slogan_can_be_the_theme(tmp_path: Path) -> None:
    text = GOOD.replace('id = "s-1"', 'id = "s-1"\ntheme = true').replace(
        'id = "s-2"', 'id = "s-2"\ntheme = true'
    )
    write(tmp_path, "themes.toml", text)
    [problem] = problems_of(tmp_path)
    assert problem.key == "slogans[1].theme"
    assert "slogans[0].theme" in problem.message


def test_two_files_with_one_set_name_are_an_error(tmp_path: Path) -> None:
    first = write(tmp_path, "a.toml", GOOD)
    second = write(tmp_path, "b.toml", GOOD)
    [problem] = problems_of(tmp_path)
    assert (problem.file, problem.key) == (str(second), "name")
    assert str(first) in problem.message


def test_problems_of_several_files_are_all_reported(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", "name = \n")
    write(tmp_path, "b.toml", 'name = "x"\n')
    files = {problem.file for problem in problems_of(tmp_path)}
    assert files == {str(tmp_path / "a.toml"), str(tmp_path / "b.toml")}


def test_slogan_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "gbk.toml"
    path.write_bytes('name = "x"\ntitle = "质量月"\n'.encode("gb18030"))
    [problem] = problems_of(tmp_path)
    assert (problem.file, problem.line) == (str(path), 2)


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="slogan directory not found"):
        load_slogan_sets(tmp_path / "nowhere")


def test_load_slogan_file_reads_one_set(tmp_path: Path) -> None:
    slogan_set = load_slogan_file(write(tmp_path, "safety.toml", GOOD))
    assert slogan_set.ids == ("s-1", "s-2")
    assert slogan_set.get("s-2") == Slogan("s-2", "关注民生，重视质量", "safety")
