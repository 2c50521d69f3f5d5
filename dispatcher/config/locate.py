"""Find the line of a key path in a TOML text, so a validation error can name it.

`tomllib` gives values but no positions; this scanner follows table headers, arrays of tables
and dotted keys well enough to point an operator at the right line. When a path cannot be
found exactly, the line of its longest known prefix is returned.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*(\]\]?)\s*(?:#.*)?$")
_KEY = re.compile(
    r"^\s*((?:[A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*'))*)\s*="
)
_INLINE_KEY = re.compile(r"([A-Za-z0-9_\-]+)\s*=")

PathPart = str | int


def _split_dotted(text: str) -> list[str]:
    parts = re.findall(r"\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_\-]+)", text)
    return [a or b or c for a, b, c in parts]


class KeyLocator:
    """Index of the first line (1-based) where each key path is defined in one TOML text."""

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[PathPart, ...], int] = {}
        array_counts: dict[tuple[PathPart, ...], int] = {}
        table: tuple[PathPart, ...] = ()
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_multiline:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            header = _HEADER.match(line)
            if header and not _KEY.match(line):
                names = _split_dotted(header.group(2))
                if header.group(1) == "[[":
                    base = (*self._resolve(names[:-1], array_counts), names[-1])
                    index = array_counts.get(base, 0)
                    array_counts[base] = index + 1
                    table = (*base, index)
                else:
                    table = self._resolve(names, array_counts)
                self.lines.setdefault(table, number)
                continue
            key = _KEY.match(line)
            if key:
                path = (*table, *_split_dotted(key.group(1)))
                self.lines.setdefault(path, number)
                rest = line[key.end() :]
                # Inline tables: record their keys on the same line.
                if rest.lstrip().startswith("{"):
                    for inner in _INLINE_KEY.finditer(rest):
                        self.lines.setdefault((*path, inner.group(1)), number)
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2 == 1:
                        in_multiline = quote

    @staticmethod
    def _resolve(
        names: Sequence[str], array_counts: dict[tuple[PathPart, ...], int]
    ) -> tuple[PathPart, ...]:
        # A header inside an array of tables ([[stages]] then [stages.slogans]) refers to its
        # latest element, as TOML says.
        out: list[PathPart] = []
        for name in names:
            out.append(name)
            count = array_counts.get(tuple(out))
            if count:
                out.append(count - 1)
        return tuple(out)

    def line_of(self, path: Sequence[PathPart]) -> int | None:
        """The line of `path`, or of its longest defined prefix; None when nothing matches."""
        parts = tuple(path)
        while parts:
            if parts in self.lines:
                return self.lines[parts]
            parts = parts[:-1]
        return None
