"""The operator-facing exception hierarchy.

Every error an operator can cause or fix (bad config, bad CSV, bad template, unreachable
provider, database trouble) is a `DispatcherError`. The CLI catches this one class, prints
its message and exits with `exit_code`; anything else is a bug.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    """One located problem: where it is (file, key path, line) and what is wrong."""

    message: str
    file: str | None = None
    key: str | None = None
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.file or ""
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        parts = [p for p in (where, self.key) if p]
        prefix = ": ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class DispatcherError(Exception):
    """Base of every error meant for an operator; `str()` is the message to show."""

    exit_code: int = 2


class ProblemsError(DispatcherError):
    """An error made of one or more located problems, each shown on its own line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ConfigError(ProblemsError):
    """The configuration (TOML, secrets, references between keys) is invalid."""


class AudienceError(ProblemsError):
    """An audience file cannot be read at all (missing, unknown encoding, no address column)."""


class TemplateError(ProblemsError):
    """A message template does not compile or does not render."""


class ChannelError(DispatcherError):
    """A channel cannot be set up or used (unknown type, bad settings, unreachable peer)."""


class StorageError(DispatcherError):
    """The database cannot be reached, migrated or written."""


class OperatorError(DispatcherError):
    """An operator's command cannot be carried out as asked (unknown stage, nothing to retry)."""


class AuditError(DispatcherError):
    """The audit chain (in the database or an export) is broken or cannot be read."""
