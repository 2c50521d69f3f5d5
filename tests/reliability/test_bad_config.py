"""Bad configuration files: every outcome is a loaded Config or a ConfigError naming its file.

The inputs are the real `config.example.toml` and Quality Month campaign, mutated the way files
get damaged in practice (a line deleted or duplicated, a value of the wrong type, stray bytes,
a NUL, a truncated save, two keys swapped) or re-written with random values of any TOML type at
any key, plus plain random text. `load_config` may accept the result or refuse it with a
`ConfigError`; any other exception is a bug. A few mutated files also go through
`dispatcher check` in a subprocess: exit status 0 or 2, never a traceback.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.config import Config, load_config
from dispatcher.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MAIN = "config.toml"
CAMPAIGN = "campaigns/quality-month-2010.toml"
ORIGINAL = {
    MAIN: (REPO / "config.example.toml").read_bytes(),
    CAMPAIGN: (REPO / CAMPAIGN).read_bytes(),
}

# Reproducible in CI (derandomize: the examples depend only on the test), nothing written to
# the repository (derandomize implies no example database).
FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the example deployment: main file, campaigns (audiences, templates), slogans."""
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(REPO / "campaigns", root / "campaigns")
    shutil.copytree(REPO / "slogans", root / "slogans")
    (root / MAIN).write_bytes(ORIGINAL[MAIN])
    return root


def outcome(site: Path, files: dict[str, bytes]) -> Config | ConfigError:
    """Write `files` over the site and load it: a Config, or the ConfigError, checked."""
    contents = {**ORIGINAL, **files}
    for name, data in contents.items():
        (site / name).write_bytes(data)
    try:
        return load_config(site / MAIN, env={})
    except ConfigError as exc:
        assert exc.problems, "a ConfigError without problems"
        lines = {str(site / name): data.count(b"\n") + 1 for name, data in contents.items()}
        for problem in exc.problems:
            assert problem.file, f"a problem without a file: {problem}"
            assert problem.message.strip(), f"a problem without a message: {problem}"
            if problem.line is not None and problem.file in lines:
                assert 1 <= problem.line <= lines[problem.file], f"line out of range: {problem}"
        assert "Traceback" not in str(exc)
        return exc


def test_the_originals_load(site: Path) -> None:
    assert isinstance(outcome(site, {}), Config)


# -- mutations of the text, line by line ---------------------------------------------------------

# Values of every TOML type, to put where another type is expected.
LITERALS = [
    "1", "-1", "0", "1.5", "-0.0", "nan", "inf", "-inf", "1e400", "99999999999999999999999",
    "true", '""', '"x"', '"-5s"', '"99999999999999999d"', '"a\\u0000b"', '"${NOT_SET}"',
    "2010-09-01", "2010-09-01T10:00:00", "2010-09-01T10:00:00+08:00", "08:00:00", "[]",
    '[1, "a"]', "[[]]", "{}", "{ a = 1 }", '"{{ unclosed"', '"0 25 * * *"', '"nowhere/zone"',
]  # fmt: skip


def _assignments(lines: list[bytes]) -> list[int]:
    return [
        i for i, line in enumerate(lines) if b"=" in line and not line.lstrip().startswith(b"#")
    ]


def _mutate_lines(data: bytes, op: str, a: int, b: int, extra: bytes, literal: str) -> bytes:
    lines = data.split(b"\n")
    assignments = _assignments(lines)
    if op == "delete":
        del lines[a % len(lines)]
    elif op == "duplicate":
        i = a % len(lines)
        lines.insert(i, lines[i])
    elif op == "retype" and assignments:
        i = assignments[a % len(assignments)]
        key = lines[i].split(b"=", 1)[0]
        lines[i] = key + b"= " + literal.encode()
    elif op == "swap" and assignments:
        i, j = assignments[a % len(assignments)], assignments[b % len(assignments)]
        key_i, value_i = lines[i].split(b"=", 1)
        key_j, value_j = lines[j].split(b"=", 1)
        lines[i], lines[j] = key_j + b"=" + value_i, key_i + b"=" + value_j
    text = b"\n".join(lines)
    position = a % (len(text) + 1)
    if op == "bytes":
        return text[:position] + extra + text[position:]
    if op == "nul":
        return text[:position] + b"\x00" + text[position:]
    if op == "truncate":
        return text[:position]
    return text


line_mutation = st.tuples(
    st.sampled_from([MAIN, CAMPAIGN]),
    st.sampled_from(
        ["delete", "duplicate", "retype", "retype", "swap", "bytes", "nul", "truncate"]
    ),
    st.integers(min_value=0, max_value=10_000),
    st.integers(min_value=0, max_value=10_000),
    st.binary(min_size=1, max_size=8),
    st.sampled_from(LITERALS),
)


def apply_line_mutations(
    mutations: list[tuple[str, str, int, int, bytes, str]],
) -> dict[str, bytes]:
    files = dict(ORIGINAL)
    for name, op, a, b, extra, literal in mutations:
        files[name] = _mutate_lines(files[name], op, a, b, extra, literal)
    return files


@settings(FUZZ, max_examples=250)
@given(st.lists(line_mutation, min_size=1, max_size=3))
def test_damaged_lines_give_a_config_or_a_located_error(
    site: Path, mutations: list[tuple[str, str, int, int, bytes, str]]
) -> None:
    outcome(site, apply_line_mutations(mutations))


# -- random values of any type at any key --------------------------------------------------------


def toml_value(value: Any) -> str:
    """`value` as a TOML literal (inline tables and arrays: one line, whatever the nesting)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_document(data: dict[str, Any]) -> bytes:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in data.items()).encode()


def key_paths(value: Any, prefix: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Every key path in a parsed TOML document, tables and array items included."""
    items: Any = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in items:
        yield (*prefix, key)
        if isinstance(child, dict | list):
            yield from key_paths(child, (*prefix, key))


PARSED = {name: tomllib.loads(data.decode()) for name, data in ORIGINAL.items()}
PATHS = {name: sorted(key_paths(doc), key=repr) for name, doc in PARSED.items()}

# Strings that mean something to some key: durations, times, zones, globs, paths, templates.
AWKWARD_STRINGS = [
    "", "1s", "-5s", "1e308s", "99999999999d", "08:00", "25:00", "Asia/Shanghai", "not/a-zone",
    "*", "**/*", "../../../etc/passwd", "${NOT_SET}", "a\x00b", "sqlite:///x\x00y", "{{ name",
    "{{ ''.__class__ }}", "0 10 * * 1", "61 * * * *", "utf-16", "no-such-codec", "email",
    "phone", "ZZ", "127.0.0.1:99999", "[::1]:0",
]  # fmt: skip
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
scalars = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),
    st.booleans(),
    text,
    st.sampled_from(AWKWARD_STRINGS),
    st.dates(),
    st.datetimes(),
    st.datetimes(timezones=st.just(UTC)),
    st.times(),
)
toml_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(text, children, max_size=3)
    ),
    max_leaves=6,
)


def _change(doc: Any, path: tuple[str | int, ...], op: str, value: Any, extra_key: str) -> None:
    """Set, delete or add beside the key at `path`; nothing if an earlier change removed it."""
    parent = doc
    try:
        for part in path[:-1]:
            parent = parent[part]
        if op == "set":
            parent[path[-1]] = value
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][extra_key] = value
    except (KeyError, IndexError, TypeError):
        return


@st.composite
def value_mutations(draw: st.DrawFn) -> dict[str, bytes]:
    docs = copy.deepcopy(PARSED)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        name = draw(st.sampled_from(sorted(PATHS)))
        path = draw(st.sampled_from(PATHS[name]))
        op = draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
        _change(docs[name], path, op, draw(toml_values), draw(text))
    return {name: toml_document(doc) for name, doc in docs.items()}


@FUZZ
@given(value_mutations())
def test_any_value_at_any_key_gives_a_config_or_a_located_error(
    site: Path, files: dict[str, bytes]
) -> None:
    outcome(site, files)


def test_rewritten_originals_still_load(site: Path) -> None:
    """The one-line-per-key writer above keeps the meaning: the fuzzing starts from valid files."""
    files = {name: toml_document(doc) for name, doc in PARSED.items()}
    assert isinstance(outcome(site, files), Config)


# -- random text ---------------------------------------------------------------------------------

toml_ish = st.text(st.sampled_from(list("[]{}=\".,\n #_-01:TZabcxyz'\\")), max_size=400)


@FUZZ
@given(
    st.sampled_from([MAIN, CAMPAIGN]),
    st.one_of(
        st.text(max_size=400).map(lambda s: s.encode("utf-8", "surrogatepass")),
        toml_ish.map(str.encode),
        st.binary(max_size=400),
    ),
)
def test_random_text_gives_a_config_or_a_located_error(site: Path, name: str, data: bytes) -> None:
    outcome(site, {name: data})


# -- regressions found by the properties above ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key", "literal", "expected"),
    [
        # parse_duration raised AttributeError / OverflowError on these.
        (MAIN, "lease", "2010-09-01", "engine.lease"),
        (MAIN, "lease", "1e400", "engine.lease"),
        (MAIN, "heartbeat", "99999999999999999999999", "engine.heartbeat"),
        (MAIN, "backoff_max", '"99999999999999999d"', "engine.backoff_max"),
        (MAIN, "lease", "nan", "engine.lease"),
        (CAMPAIGN, "grace", "{ a = 1 }", "stages[0].grace"),
        # ZoneInfo raised TypeError on non-strings.
        (MAIN, "timezone", "1.5", "dispatcher.timezone"),
        (CAMPAIGN, "timezone", "[1]", "campaign.timezone"),
        # A NUL in a path raised ValueError from pathlib.
        (CAMPAIGN, "template_file", '"templates/a\\u0000b"', "stages[0].template_file"),
        (MAIN, "database", '"sqlite:///var/a\\u0000b.db"', "dispatcher.database"),
        (MAIN, "slogans", '"slo\\u0000gans"', "dispatcher.slogans"),
        (CAMPAIGN, "file", '"audiences/\\u0000.csv"', "audiences.public.file"),
    ],
)
def test_wrong_types_found_by_fuzzing_are_located_errors(
    site: Path, name: str, key: str, literal: str, expected: str
) -> None:
    lines = ORIGINAL[name].decode().split("\n")
    index = next(i for i, line in enumerate(lines) if line.split("=")[0].strip() == key)
    lines[index] = f"{key} = {literal}"
    error = outcome(site, {name: "\n".join(lines).encode()})
    assert isinstance(error, ConfigError)
    [problem] = [p for p in error.problems if p.key == expected]
    assert (problem.file, problem.line) == (str(site / name), index + 1), str(error)


# -- the CLI on damaged files --------------------------------------------------------------------


def assignment(name: str, key: str) -> int:
    """The index, among the assignments of file `name`, of the first one to `key`."""
    lines = ORIGINAL[name].split(b"\n")
    return next(
        n
        for n, i in enumerate(_assignments(lines))
        if lines[i].split(b"=")[0].strip() == key.encode()
    )


CLI_CASES = [
    [(MAIN, "retype", assignment(MAIN, "lease"), 0, b"", "2010-09-01")],
    [(CAMPAIGN, "retype", assignment(CAMPAIGN, "timezone"), 0, b"", "1.5")],
    [(CAMPAIGN, "nul", 400, 0, b"", "")],
    [(CAMPAIGN, "bytes", 900, 0, b"\xff\xfe\x00\x81", "")],
    [(MAIN, "truncate", 1234, 0, b"", "")],
    [(CAMPAIGN, "swap", 3, 17, b"", "")],
]


def check_command(root: Path) -> subprocess.CompletedProcess[str]:
    """`dispatcher check` on the site at `root`, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli.main", "check", str(root / MAIN)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")},
    )


def assert_clear(done: subprocess.CompletedProcess[str], root: Path, case: object) -> None:
    assert done.returncode in (0, 2), (case, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout, (case, done.stderr)
    assert "internal error" not in done.stderr, (case, done.stderr)
    if done.returncode == 2:
        assert done.stderr.startswith("error"), done.stderr
        assert str(root) in done.stderr, done.stderr  # the file is named


def test_check_command_on_damaged_files_exits_0_or_2_without_a_traceback(site: Path) -> None:
    root = site.parent / "cli-site"
    shutil.copytree(site, root)
    for mutations in CLI_CASES:
        for name, data in apply_line_mutations(mutations).items():
            (root / name).write_bytes(data)
        assert_clear(check_command(root), root, mutations)
    for name, data in ORIGINAL.items():
        (root / name).write_bytes(data)
    # An audience saved as UTF-16 with one broken character (check used to end in
    # "internal error: UnicodeDecodeError"): the row is reported, the rest is checked.
    audience = root / "campaigns" / "audiences" / "public.csv"
    text = audience.read_bytes().decode("gb18030")
    header, first, rest = text.split("\n", 2)
    audience.write_bytes(
        f"{header}\n{first}\n".encode("utf-16") + b"\x00\xd8" + f"\n{rest}".encode("utf-16-le")
    )
    done = check_command(root)
    assert_clear(done, root, "broken UTF-16 audience")
    assert "not valid utf-16" in done.stdout + done.stderr, done.stdout
