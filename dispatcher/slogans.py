"""Slogan sets (data files under `slogans/`) and the rotation that picks one per firing.

A slogan set is a TOML file: `name`, `title`, optional `source`, and `[[slogans]]` tables with
a stable `id`, the `text` and, on one of them, `theme = true`. Rotation is a pure function of
the set, the stage's order and seed, and the firing's index, so `plan` and the daemon agree on
which slogan each firing sends without sharing any state.
"""

from __future__ import annotations

import random
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from dispatcher.errors import ConfigError, Problem

SloganOrder = Literal["in_order", "shuffled"]
# Records one problem at a key path of the file being checked.
_Report = Callable[[str, str], None]

_SET_KEYS: Final = ("name", "title", "source", "slogans")
_SLOGAN_KEYS: Final = ("id", "text", "theme")
_TOML_POSITION: Final = re.compile(
    r"^(?P<message>.*?) \((?:at line (?P<line>\d+), column (?P<column>\d+)|at end of document)\)$"
)


@dataclass(frozen=True, slots=True)
class Slogan:
    """One slogan: its stable id, its exact text, and the name of the set it belongs to."""

    id: str
    text: str
    set: str


@dataclass(frozen=True)
class SloganSet:
    """A named, ordered set of slogans, one of which may be the campaign's theme."""

    name: str
    title: str
    slogans: tuple[Slogan, ...]
    source: str | None = None
    theme_id: str | None = None

    def get(self, slogan_id: str) -> Slogan:
        """Return the slogan with `slogan_id`, or raise ConfigError naming the id and the set."""
        for slogan in self.slogans:
            if slogan.id == slogan_id:
                return slogan
        raise ConfigError([Problem(f"unknown slogan id {slogan_id!r} in slogan set {self.name!r}")])

    @property
    def ids(self) -> tuple[str, ...]:
        """The ids of the set's slogans, in file order."""
        return tuple(slogan.id for slogan in self.slogans)

    @property
    def theme(self) -> Slogan:
        """The slogan marked `theme = true`; a set without one leads with its theme."""
        if self.theme_id is not None:
            return self.get(self.theme_id)
        if not self.slogans:
            raise ConfigError([Problem(f"slogan set {self.name!r} has no slogans")])
        return self.slogans[0]


def load_slogan_sets(directory: Path) -> dict[str, SloganSet]:
    """Load every `*.toml` slogan set in `directory`, keyed by its `name`.

    Raises one ConfigError listing every problem found, each with its file and key path
    (`slogans[3].text`) or, for TOML syntax errors, its line and column.
    """
    if not directory.is_dir():
        raise ConfigError([Problem("slogan directory not found", file=str(directory))])
    sets: dict[str, SloganSet] = {}
    origins: dict[str, Path] = {}
    problems: list[Problem] = []
    for path in sorted(directory.glob("*.toml")):
        try:
            slogan_set = load_slogan_file(path)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if slogan_set.name in sets:
            problems.append(
                Problem(
                    f"slogan set {slogan_set.name!r} is already defined in "
                    f"{origins[slogan_set.name]}",
                    file=str(path),
                    key="name",
                )
            )
            continue
        sets[slogan_set.name] = slogan_set
        origins[slogan_set.name] = path
    if problems:
        raise ConfigError(problems)
    return sets


def load_slogan_file(path: Path) -> SloganSet:
    """Load one slogan set file, or raise ConfigError naming the file and the bad keys."""
    file = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            [Problem(f"slogan file cannot be read: {exc.strerror or exc}", file=file)]
        ) from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [Problem("slogan file is not valid UTF-8; save it as UTF-8", file=file, line=line)]
        ) from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_problem(exc, file, text)]) from exc
    return _build_set(document, file)


def pick_slogan(
    slogan_set: SloganSet,
    *,
    order: SloganOrder,
    seed: int,
    firing_index: int,
    ids: Sequence[str] | None = None,
) -> Slogan:
    """Return the slogan the `firing_index`-th (0-based) firing of a stage sends.

    `in_order` cycles through the set (or through `ids`, in the order given). `shuffled` walks
    a permutation fixed by `seed` and the cycle number, so no slogan repeats before all have
    been used, and every process computes the same sequence.
    """
    if firing_index < 0:
        raise ValueError(f"firing_index must not be negative, got {firing_index}")
    pool = list(slogan_set.ids if ids is None else ids)
    if not pool:
        raise ConfigError([Problem(f"no slogans to pick from in slogan set {slogan_set.name!r}")])
    slogans = [slogan_set.get(slogan_id) for slogan_id in pool]
    cycle, position = divmod(firing_index, len(slogans))
    if order == "shuffled":
        # A string seed is hashed with SHA-512 by `random`, not with hash(): the permutation
        # is the same in every process whatever PYTHONHASHSEED is.
        random.Random(f"{seed}:{cycle}").shuffle(slogans)
    elif order != "in_order":
        raise ValueError(f"unknown slogan order {order!r}: expected 'in_order' or 'shuffled'")
    return slogans[position]


def _toml_problem(exc: tomllib.TOMLDecodeError, file: str, text: str) -> Problem:
    """Turn tomllib's message, which ends with the position in parentheses, into a Problem."""
    message = str(exc)
    found = _TOML_POSITION.match(message)
    if found is None:
        return Problem(f"invalid TOML: {message}", file=file)
    if found["line"] is None:  # "at end of document"
        return Problem(
            f"invalid TOML: {found['message']} (at end of file)",
            file=file,
            line=text.count("\n") + 1,
        )
    return Problem(
        f"invalid TOML: {found['message']}",
        file=file,
        line=int(found["line"]),
        column=int(found["column"]),
    )


def _build_set(document: Mapping[str, Any], file: str) -> SloganSet:
    problems: list[Problem] = []

    def problem(key: str, message: str) -> None:
        problems.append(Problem(message, file=file, key=key))

    _check_unknown_keys(document, _SET_KEYS, "", problem)
    name = _required_text(document, "name", "name", problem)
    title = _required_text(document, "title", "title", problem)
    source = document.get("source")
    if source is not None and not isinstance(source, str):
        problem("source", f"must be a string, got {_toml_type(source)}")
        source = None

    raw_slogans = document.get("slogans")
    entries: list[tuple[str, str]] = []
    theme_id: str | None = None
    if raw_slogans is None:
        problem("slogans", "missing key: add [[slogans]] tables with `id` and `text`")
    elif not isinstance(raw_slogans, list) or not all(isinstance(s, dict) for s in raw_slogans):
        problem("slogans", "must be an array of tables: write each slogan as [[slogans]]")
    elif not raw_slogans:
        problem("slogans", "must contain at least one slogan")
    else:
        first_seen: dict[str, str] = {}
        theme_key: str | None = None
        for index, raw in enumerate(raw_slogans):
            at = f"slogans[{index}]"
            _check_unknown_keys(raw, _SLOGAN_KEYS, f"{at}.", problem)
            slogan_id = _required_text(raw, "id", f"{at}.id", problem)
            text = _required_text(raw, "text", f"{at}.text", problem)
            theme = raw.get("theme", False)
            if not isinstance(theme, bool):
                problem(f"{at}.theme", f"must be true or false, got {_toml_type(theme)}")
            elif theme and theme_key is not None:
                problem(f"{at}.theme", f"only one slogan can be the theme ({theme_key} is)")
            elif theme:
                theme_key, theme_id = f"{at}.theme", slogan_id
            if slogan_id is None or text is None:
                continue
            if slogan_id in first_seen:
                problem(
                    f"{at}.id",
                    f"duplicate slogan id {slogan_id!r} (first used at {first_seen[slogan_id]})",
                )
                continue
            first_seen[slogan_id] = f"{at}.id"
            entries.append((slogan_id, text))

    if problems or name is None or title is None:
        raise ConfigError(problems)
    return SloganSet(
        name=name,
        title=title,
        slogans=tuple(Slogan(id=slogan_id, text=text, set=name) for slogan_id, text in entries),
        source=source,
        theme_id=theme_id,
    )


def _required_text(table: Mapping[str, Any], key: str, path: str, problem: _Report) -> str | None:
    """Return the stripped string at `key`, or report it missing, mistyped or blank."""
    if key not in table:
        problem(path, "missing key")
        return None
    value = table[key]
    if not isinstance(value, str):
        problem(path, f"must be a string, got {_toml_type(value)}")
        return None
    if not value.strip():
        problem(path, "must not be empty")
        return None
    return value.strip()


def _check_unknown_keys(
    table: Mapping[str, Any], known: tuple[str, ...], prefix: str, problem: _Report
) -> None:
    for key in table:
        if key not in known:
            problem(f"{prefix}{key}", f"unknown key; expected one of: {', '.join(known)}")


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"
