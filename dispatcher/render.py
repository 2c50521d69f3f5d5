"""Message templates: sandboxed Jinja2, compiled once and rendered per recipient.

Templates come from operators' campaign files, so they run in Jinja2's sandbox with strict
undefined variables: a typo in a column name fails loudly instead of sending a message with a
hole in it. Every failure, at compile or render time, is a `TemplateError` naming the template
and the line; no Jinja2 or Python exception leaves this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import Path
from types import CodeType
from typing import Any, Final, Literal

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, UndefinedError, meta
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from dispatcher.addresses import mask_address
from dispatcher.errors import Problem, TemplateError

TemplateKind = Literal["text", "html"]

# A message is short; a template that builds a huge string or number is a mistake (or an
# attempt to exhaust memory), not a message.
MAX_REPEATED_LENGTH: Final = 100_000
MAX_EXPONENT: Final = 10_000

_UNDEFINED_NAME: Final = re.compile(r"^'(?P<name>[^']+)' is undefined$")


class TemplateRenderer:
    """Compiles message templates; owns one sandboxed environment per template kind."""

    def __init__(self) -> None:
        self._environments: dict[TemplateKind, _MessageSandbox] = {
            "text": _MessageSandbox(autoescape=False),
            "html": _MessageSandbox(autoescape=True),
        }

    def compile_template(
        self, source: str, *, name: str, kind: TemplateKind = "text", first_line: int = 1
    ) -> CompiledTemplate:
        """Compile `source` once for many renders, or raise TemplateError with the line.

        `name` is what errors show (a file path, or `file.toml: stages.x.template` for an
        inline template); `first_line` is the line of the file where the template starts, so
        that errors in inline templates point at the right line of the TOML file.
        """
        if kind not in self._environments:
            raise ValueError(f"unknown template kind {kind!r}: expected 'text' or 'html'")
        environment = self._environments[kind]
        try:
            tree = environment.parse(source, name=name, filename=name)
            variables = frozenset(meta.find_undeclared_variables(tree)) - environment.globals.keys()
            code: CodeType = environment.compile(tree, name=name, filename=name)
            template = environment.template_class.from_code(
                environment, code, environment.make_globals(None)
            )
        except TemplateSyntaxError as exc:
            line = _file_line(exc.lineno, first_line)
            raise TemplateError(
                [Problem(f"template syntax error: {exc.message or exc}", file=name, line=line)]
            ) from exc
        except Exception as exc:  # e.g. RecursionError on absurdly nested templates
            raise TemplateError(
                [Problem(f"template cannot be compiled: {_describe(exc)}", file=name)]
            ) from exc
        return CompiledTemplate(
            template, name=name, kind=kind, first_line=first_line, variables=variables
        )

    def load_template_file(self, path: Path, *, kind: TemplateKind = "text") -> CompiledTemplate:
        """Read a UTF-8 template file and compile it, or raise TemplateError naming the path."""
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise TemplateError([Problem("template file not found", file=str(path))]) from exc
        except OSError as exc:
            raise TemplateError(
                [Problem(f"template file cannot be read: {exc.strerror or exc}", file=str(path))]
            ) from exc
        try:
            # utf-8-sig: templates saved by Windows editors often start with a BOM.
            source = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise TemplateError(
                [
                    Problem(
                        "template file is not valid UTF-8; save it as UTF-8",
                        file=str(path),
                        line=line,
                    )
                ]
            ) from exc
        return self.compile_template(source, name=str(path), kind=kind)


class CompiledTemplate:
    """A compiled template: render it with one recipient's variables, as often as needed."""

    __slots__ = ("_template", "first_line", "kind", "name", "variables")

    def __init__(
        self,
        template: Template,
        *,
        name: str,
        kind: TemplateKind,
        first_line: int,
        variables: frozenset[str],
    ) -> None:
        self._template = template
        self.name = name
        self.kind = kind
        self.first_line = first_line
        self.variables = variables
        """Names the template reads from its variables (columns, slogan, ...), for `check`."""

    def render(self, variables: Mapping[str, object]) -> str:
        """Return the rendered text, stripped, or raise TemplateError naming the line."""
        try:
            return self._template.render(variables).strip()
        except SecurityError as exc:
            message = f"template tries to reach outside the sandbox: {exc}"
            raise self._error(message, exc) from exc
        except UndefinedError as exc:
            found = _UNDEFINED_NAME.match(str(exc))
            message = (
                f"undefined variable {found['name']!r}" if found else f"undefined value: {exc}"
            )
            raise self._error(message, exc) from exc
        except Exception as exc:
            raise self._error(f"error while rendering: {_describe(exc)}", exc) from exc

    def _error(self, message: str, exc: BaseException) -> TemplateError:
        line = _file_line(_template_line(exc, self.name), self.first_line)
        return TemplateError([Problem(message, file=self.name, line=line)])

    def __repr__(self) -> str:
        return f"CompiledTemplate(name={self.name!r}, kind={self.kind!r})"


def compile_template(
    source: str,
    *,
    name: str,
    kind: TemplateKind = "text",
    first_line: int = 1,
    renderer: TemplateRenderer | None = None,
) -> CompiledTemplate:
    """Compile `source` with `renderer` (a fresh one by default); see TemplateRenderer."""
    renderer = renderer or TemplateRenderer()
    return renderer.compile_template(source, name=name, kind=kind, first_line=first_line)


def load_template_file(
    path: Path, *, kind: TemplateKind = "text", renderer: TemplateRenderer | None = None
) -> CompiledTemplate:
    """Read and compile a template file with `renderer` (a fresh one by default)."""
    return (renderer or TemplateRenderer()).load_template_file(path, kind=kind)


def mask(value: object) -> str:
    """Return `value` masked as the logs mask addresses: `+86138****8000`, `z***@example.com`."""
    return mask_address(str(value).strip())


def format_date(value: object, fmt: str = "%Y-%m-%d") -> str:
    """Format a date or datetime (or an ISO 8601 string, as CSV columns are) with strftime."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"date filter: {value!r} is not an ISO 8601 date") from None
    if not isinstance(value, date):  # datetime is a date too
        raise TypeError(f"date filter expects a date or datetime, got {type(value).__name__}")
    return value.strftime(fmt)


class _MessageSandbox(SandboxedEnvironment):
    """Jinja2's sandbox, strict about undefined names, capping oversized results."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(
            undefined=StrictUndefined, autoescape=autoescape, keep_trailing_newline=False
        )
        self.filters["mask"] = mask
        self.filters["date"] = format_date

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if (
                    isinstance(sequence, str | list | tuple)
                    and isinstance(count, int)
                    and len(sequence) * count > MAX_REPEATED_LENGTH
                ):
                    # OverflowError, as Jinja2's own cap on range() raises.
                    raise OverflowError(
                        f"repetition would build more than {MAX_REPEATED_LENGTH} items"
                    )
        elif operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise OverflowError(f"exponent larger than {MAX_EXPONENT}")
        return super().call_binop(context, operator, left, right)


def _template_line(exc: BaseException, filename: str) -> int | None:
    """Return the template line where `exc` was raised, from Jinja2's rewritten traceback."""
    line = None
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename == filename:
            line = frame.tb_lineno
        frame = frame.tb_next
    return line


def _file_line(template_line: int | None, first_line: int) -> int | None:
    return None if template_line is None else first_line + template_line - 1


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
